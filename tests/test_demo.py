"""The demo's held-out split: its figures must come from images training never saw."""

from __future__ import annotations

from collections import Counter, defaultdict

from raysky.data import read_dataset
from raysky.local.demo import held_out_split


def test_held_out_split_is_lesion_disjoint_and_keeps_every_class_in_test(sample_copy):
    import csv

    # Pair up images into two-image lesions so that disjointness is actually tested.
    path = sample_copy / "HAM10000_metadata.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["lesion_id"] = f"L{row['dx']}{i % 5 // 2}"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = read_dataset(str(sample_copy), "ham10000")
    splits = held_out_split(records, per_class=(1, 1))
    assert set(splits) == {r.image_id for r in records}
    lesion_splits = defaultdict(set)
    for record in records:
        lesion_splits[record.lesion_id].add(splits[record.image_id])
    assert all(len(s) == 1 for s in lesion_splits.values())
    test_classes = Counter(r.label for r in records if splits[r.image_id] == "test")
    assert set(test_classes) == {r.label for r in records}


def test_held_out_split_of_the_bundled_sample(sample_dir):
    records = read_dataset(str(sample_dir), "ham10000")
    counts = Counter(held_out_split(records).values())
    assert counts == {"train": 21, "val": 7, "test": 7}
