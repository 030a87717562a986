"""Lesion-grouped, label-stratified splits and the splits.csv reader."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from raysky.data import (
    DatasetError,
    LesionRecord,
    apply_split_file,
    read_ham10000,
    read_split_file,
    split_by_lesion,
)
from raysky.data.taxonomy import CANONICAL_CLASSES

# Roughly HAM10000 + SCC class balance, so rare classes are tested too.
WEIGHTS = {"nv": 60, "mel": 11, "bkl": 11, "bcc": 5, "akiec": 3, "vasc": 1.2, "df": 0.8,
           "scc": 2}


def _synthetic(n: int = 1000, seed: int = 7) -> list[LesionRecord]:
    """``n`` records in lesion groups of 1 to 4 images; one in ten has no lesion id."""
    rng = random.Random(seed)
    records: list[LesionRecord] = []
    lesion = 0
    while len(records) < n:
        label = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        lesion += 1
        lesion_id = None if rng.random() < 0.1 else f"L{lesion:05d}"
        for _ in range(1 if lesion_id is None else rng.choice([1, 1, 1, 2, 2, 3, 4])):
            if len(records) == n:
                break
            i = len(records)
            records.append(LesionRecord(image_id=f"IMG_{i:05d}", image_uri=f"/x/IMG_{i:05d}.jpg",
                                        label=label, lesion_id=lesion_id))
    return records


def _groups(records: list[LesionRecord]) -> set[str]:
    return {r.lesion_id or f"image:{r.image_id}" for r in records}


def _ids(records: list[LesionRecord]) -> list[str]:
    return [r.image_id for r in records]


@pytest.fixture(scope="module")
def records() -> list[LesionRecord]:
    return _synthetic()


def test_no_lesion_on_both_sides(records):
    train, val = split_by_lesion(records, val_fraction=0.15, seed=0)
    assert len(train) + len(val) == len(records)
    assert sorted(_ids(train) + _ids(val)) == sorted(_ids(records))
    assert not _groups(train) & _groups(val)
    # Input order is kept on both sides.
    position = {r.image_id: i for i, r in enumerate(records)}
    assert [position[i] for i in _ids(train)] == sorted(position[i] for i in _ids(train))


def test_deterministic_and_seed_dependent(records):
    first = split_by_lesion(records, seed=3)
    assert _ids(first[1]) == _ids(split_by_lesion(records, seed=3)[1])
    assert set(_ids(first[1])) != set(_ids(split_by_lesion(records, seed=4)[1]))
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert set(_ids(split_by_lesion(shuffled, seed=3)[1])) == set(_ids(first[1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_by_label(records, seed):
    train, val = split_by_lesion(records, val_fraction=0.15, seed=seed)
    total, in_val, in_train = (Counter(r.label for r in rs) for rs in (records, val, train))
    assert set(in_train) == set(total) == set(CANONICAL_CLASSES)
    assert set(in_val) == set(total)  # every class has several lesions, so each gets one
    assert abs(len(val) / len(records) - 0.15) < 0.02
    for label, count in total.items():
        # Whole lesions move at once, so a class can miss its target by about one lesion.
        assert abs(in_val[label] - 0.15 * count) <= max(3, 0.02 * count), label


def test_small_classes():
    def record(i: int, label: str, lesion: str | None) -> LesionRecord:
        return LesionRecord(image_id=f"I{i}", image_uri=f"I{i}.jpg", label=label, lesion_id=lesion)

    records = [record(0, "df", "A"), record(1, "df", "B"),  # two groups: one goes to val
               record(2, "vasc", "C"), record(3, "vasc", "C"),  # one lesion: stays in train
               record(4, "mel", None)]
    train, val = split_by_lesion(records, val_fraction=0.15, seed=0)
    assert Counter(r.label for r in val) == {"df": 1}
    assert Counter(r.label for r in train) == {"df": 1, "vasc": 2, "mel": 1}
    assert split_by_lesion(records, val_fraction=0.0)[1] == []
    # Even at a huge fraction, every class keeps a training group.
    train, _ = split_by_lesion(records, val_fraction=0.99)
    assert {r.label for r in train} == {"df", "vasc", "mel"}


def test_unlabelled_records_and_bad_fraction():
    records = [LesionRecord(image_id=f"U{i}", image_uri=f"U{i}.png") for i in range(40)]
    train, val = split_by_lesion(records, val_fraction=0.25, seed=1)
    assert (len(train), len(val)) == (30, 10)
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_lesion(records, val_fraction=fraction)


def test_sample_split_is_lesion_disjoint(sample_dir):
    records = read_ham10000(str(sample_dir))
    train, val = split_by_lesion(records)
    assert len(val) == 7 and {r.label for r in val} == {r.label for r in train}


# ------------------------------------------------------------------ splits.csv


def test_split_file(tmp_path, sample_dir):
    records = read_ham10000(str(sample_dir))
    path = tmp_path / "splits.csv"
    lines = ["image_id,split"] + [f"{r.image_id},{'val' if i % 5 == 0 else 'train'}"
                                  for i, r in enumerate(records)]
    lines += ["ISIC_9999999,validation", ""]  # rows for images not in the subset are ignored
    path.write_text("\n".join(lines) + "\n")
    splits = read_split_file(str(path))
    assert splits["ISIC_9999999"] == "val" and len(splits) == 36
    train, val = apply_split_file(records, str(path))
    assert _ids(val) == [r.image_id for i, r in enumerate(records) if i % 5 == 0]
    assert len(train) == 28
    with pytest.raises(DatasetError, match=r"splits\.csv: 1 image\(s\) have no split: extra"):
        apply_split_file([*records, LesionRecord("extra", "extra.jpg")], str(path))


@pytest.mark.parametrize(
    ("body", "row", "problem"),
    [
        ("a,train\nb,tset\n", 3, "split must be one of train, val, test, got 'tset'"),
        ("a,train\nb,val\na,val\n", 4, "duplicate image id 'a' (first in row 2)"),
        ("a,train\n,val\n", 3, "empty 'image_id'"),
    ],
)
def test_split_file_errors(tmp_path, body, row, problem):
    path = tmp_path / "splits.csv"
    path.write_text("image_id,split\n" + body)
    with pytest.raises(DatasetError) as info:
        read_split_file(str(path))
    assert (info.value.file, info.value.row, info.value.problem) == (str(path), row, problem)
    assert f"splits.csv, row {row}: " in str(info.value)


def test_split_file_missing_column_and_file(tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("image_id,fold\na,1\n")
    with pytest.raises(DatasetError, match="missing required column 'split'"):
        read_split_file(str(path))
    with pytest.raises(DatasetError, match="nope.csv: file not found"):
        read_split_file(str(tmp_path / "nope.csv"))
