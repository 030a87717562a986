"""Train/validation splits that never put one lesion on both sides.

HAM10000 and ISIC 2019 often have several images of the same lesion. Splitting by image would
leak near-duplicates into validation and inflate every metric, so splits here are made over
lesion groups, stratified by diagnosis. The recipe is the one described for the HAM10000
``splits.csv`` that raysky's data ships with: within each class, lesions are shuffled with the
seed and moved to validation until about ``val_fraction`` of that class's images are there. It
is not guaranteed to reproduce that file's exact assignment, so use :func:`apply_split_file`
when the shipped split matters.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from raysky.data.records import DatasetError, LesionRecord
from raysky.data.tables import load_csv
from raysky.data.taxonomy import CANONICAL_CLASSES

SPLIT_FILE = "splits.csv"
"""The split file a dataset root may hold (``image_id,split``); training and evaluate honour it."""
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""``test`` rows are held out: training never sees them, and ``evaluate --split test`` reads them."""
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "holdout": "test", "held-out": "test"}


def _group_key(record: LesionRecord) -> tuple[str, str]:
    # Tagged so that a lesion id can never collide with an image id.
    if record.lesion_id:
        return ("lesion", record.lesion_id)
    return ("image", record.image_id)


def _stratum_order(label: str | None) -> tuple[int, str]:
    if label in CANONICAL_CLASSES:
        return (CANONICAL_CLASSES.index(label), label)
    return (len(CANONICAL_CLASSES), str(label))


def split_by_lesion(
    records: Sequence[LesionRecord], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[LesionRecord], list[LesionRecord]]:
    """Split records into ``(train, val)`` by lesion, stratified by label, deterministically.

    Records with the same ``lesion_id`` form one group. A record without one is a group of its
    own. A group's stratum is its most common label, and unlabelled groups share one stratum.
    Within each stratum the groups are sorted, shuffled with ``seed``, and moved to validation
    one by one whenever that brings the stratum's validation images closer to
    ``val_fraction`` of its images. Every stratum keeps at least one training group, and when
    ``val_fraction > 0`` every stratum with at least two groups gets a validation group. Both lists
    keep the input order. The result depends only on the records and the seed, not on their
    order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[tuple[str, str], list[LesionRecord]] = defaultdict(list)
    for record in records:
        groups[_group_key(record)].append(record)

    strata: dict[str | None, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(groups):
        labels = Counter(record.label for record in groups[key])
        # Most common label; ties go to the canonical order so the result is reproducible.
        label = min(labels, key=lambda lab: (-labels[lab], _stratum_order(lab)))
        strata[label].append(key)

    val_keys: set[tuple[str, str]] = set()
    for label in sorted(strata, key=_stratum_order):
        keys = strata[label]
        # A per-class generator, so adding a class does not reshuffle the others.
        random.Random(f"{seed}/{label}").shuffle(keys)
        sizes = {key: len(groups[key]) for key in keys}
        target = val_fraction * sum(sizes.values())
        chosen: list[tuple[str, str]] = []
        count = 0
        for key in keys:
            if abs(count + sizes[key] - target) < abs(count - target):
                chosen.append(key)
                count += sizes[key]
        if val_fraction > 0 and len(keys) >= 2 and not chosen:
            chosen.append(keys[0])
        if chosen and len(chosen) == len(keys):
            chosen.pop()  # a class the model never trains on cannot be validated either
        val_keys.update(chosen)

    train = [record for record in records if _group_key(record) not in val_keys]
    val = [record for record in records if _group_key(record) in val_keys]
    return train, val


def read_split_file(uri: str) -> dict[str, str]:
    """Read a ``splits.csv`` (``image_id,split``) into ``{image_id: "train" | "val"}``.

    The id column may also be called ``image``. ``training`` and ``validation`` are accepted
    as spellings of ``train`` and ``val``. An empty or duplicate id, or any other split name,
    raises :class:`DatasetError` naming the file and row.
    """
    table = load_csv(uri)
    id_col = table.column("image_id", "image")
    split_col = table.column("split")
    splits: dict[str, str] = {}
    rows: dict[str, int] = {}
    for row, values in table.rows:
        image_id, raw = values[id_col], values[split_col]
        if image_id is None:
            raise table.error(row, f"empty {id_col!r}")
        if image_id in rows:
            raise table.error(row, f"duplicate image id {image_id!r} (first in row {rows[image_id]})")
        split = _SPLIT_ALIASES.get((raw or "").lower())
        if split is None:
            raise table.error(row, f"split must be one of {', '.join(SPLIT_NAMES)}, got {raw!r}")
        rows[image_id] = row
        splits[image_id] = split
    return splits


def select_split(records: Sequence[LesionRecord], uri: str, split: str) -> list[LesionRecord]:
    """The records that the ``splits.csv`` at ``uri`` puts in ``split`` (train, val or test)."""
    name = _SPLIT_ALIASES.get(split.lower())
    if name is None:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    splits = read_split_file(uri)
    return [record for record in records if splits.get(record.image_id) == name]


def apply_split_file(
    records: Sequence[LesionRecord], uri: str
) -> tuple[list[LesionRecord], list[LesionRecord]]:
    """Split records into ``(train, val)`` as a ``splits.csv`` says, keeping input order.

    Rows for images that are not among ``records`` are ignored, so the full dataset's file
    also works for a subset, and ``test`` rows are in neither list: they stay unseen. A record that the file does not mention raises
    :class:`DatasetError`, because silently training on it could leak validation data.
    """
    splits = read_split_file(uri)
    missing = [record.image_id for record in records if record.image_id not in splits]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(uri, f"{len(missing)} image(s) have no split: {shown}")
    train = [record for record in records if splits[record.image_id] == "train"]
    val = [record for record in records if splits[record.image_id] == "val"]
    return train, val
