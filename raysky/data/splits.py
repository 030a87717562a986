"""Train/validation splits that never put one lesion on both sides.

HAM10000 and ISIC 2019 often have several images of the same lesion. Splitting by image would
leak near-duplicates into validation and inflate every metric, so splits here are made over
lesion groups, stratified by diagnosis. The recipe is the one described for the HAM10000
``splits.csv`` that raysky's data ships with: within each class, lesions are shuffled with the
seed and moved to validation until about ``val_fraction`` of that class's images are there. It
is not guaranteed to reproduce that file's exact assignment, so use :func:`apply_split_file`
when the shipped split matters.

:func:`read_split` is the one policy deciding which records belong to a named split, for every
command that takes ``split`` (evaluate, report, calibrate, robustness), and
:func:`per_class_split` with :func:`write_split_file` is how the demo holds images out.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from raysky import storage
from raysky.data.layouts import read_isic2018
from raysky.data.readers import read_dataset
from raysky.data.records import DatasetError, DatasetRef, LesionRecord
from raysky.data.tables import load_csv
from raysky.data.taxonomy import CANONICAL_CLASSES
from raysky.settings import ParameterError

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


def read_split(dataset: DatasetRef, val_fraction: float = 0.15, seed: int = 0
               ) -> list[LesionRecord]:
    """The records of ``dataset.split``, or every record of ``dataset`` when it names none.

    ``isic2018`` has its own splits (Training, Validation, Test). For the other layouts a
    ``splits.csv`` at the dataset root decides (train, val, test), so figures can be restricted
    to images the model never trained on. Without one, ``train`` and ``val`` are the
    lesion-grouped split training makes (:func:`split_by_lesion` with ``val_fraction`` and
    ``seed``, training's defaults), and any other split is a ``ValueError`` naming the file
    it needs.
    """
    if dataset.split is not None and str(dataset.format).lower() == "isic2018":
        return read_isic2018(dataset.uri, dataset.split)
    records = read_dataset(dataset.uri, dataset.format, dataset.metadata)
    if dataset.split is None:
        return records
    split_uri = storage.join(dataset.uri, SPLIT_FILE)
    if storage.exists(split_uri):
        return select_split(records, split_uri, dataset.split)
    name = _SPLIT_ALIASES.get(dataset.split.lower())
    if name not in ("train", "val"):
        raise ParameterError("split", dataset.split, f"needs {split_uri} (image_id,split), which "
                             "does not exist (without it only train and val are defined)")
    train, val = split_by_lesion(records, val_fraction=val_fraction, seed=seed)
    return train if name == "train" else val


def per_class_split(records: Sequence[LesionRecord], per_class: tuple[int, int] = (3, 1)
                    ) -> dict[str, str]:
    """A lesion-disjoint train/val/test assignment, ``{image_id: split}``: per class,
    ``per_class`` lesions go to train and val, and the rest to test, which training never sees.

    For small datasets (the demo's sample), where figures must come from test images only: a
    model's score on the images it was fitted to says nothing about how it does on new ones.
    """
    lesions: dict[str | None, list[str]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.image_id):
        key = record.lesion_id or record.image_id
        if key not in lesions[record.label]:
            lesions[record.label].append(key)
    split_of = {}
    n_train, n_val = per_class
    for keys in lesions.values():
        for i, key in enumerate(keys):
            split_of[key] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return {r.image_id: split_of[r.lesion_id or r.image_id] for r in records}


def write_split_file(uri: str, splits: dict[str, str]) -> None:
    """Write ``splits`` (``{image_id: split}``) as the ``splits.csv`` :func:`read_split_file`
    reads."""
    storage.write_bytes(uri, ("image_id,split\n" + "".join(
        f"{image_id},{split}\n" for image_id, split in splits.items())).encode())
