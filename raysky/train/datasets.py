"""From dataset records to the Ray Datasets that feed the training workers.

Records are turned into small rows (URIs, label index, encoded metadata) on the driver; the
Ray Dataset then reads and decodes each image once, in Ray Data tasks, into a uint8 cache that
every epoch iterates, and the training workers augment, normalise and step. Ray Train splits the training dataset into one
shard per worker; validation is not split (see :mod:`raysky.train.loops`).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from raysky import storage
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import decode_mask, load_rgb
from raysky.data.metadata import MetadataVocab
from raysky.data.readers import read_dataset
from raysky.data.records import LesionRecord
from raysky.data.splits import SPLIT_FILE, apply_split_file, split_by_lesion
from raysky.settings import ParameterError

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)


def load_splits(data_uri: str, format: str, val_fraction: float = 0.15,
                seed: int = 0) -> tuple[list[LesionRecord], list[LesionRecord], str]:
    """Read a dataset and split it into ``(train, val, how)`` without sharing a lesion.

    A ``splits.csv`` at the dataset root wins (the published split is what results are
    compared on); otherwise :func:`raysky.data.splits.split_by_lesion` makes one. ``how``
    says which was used, for the run summary.
    """
    records = read_dataset(data_uri, format)
    if not records:
        raise ValueError(f"{data_uri}: the dataset has no images")
    split_uri = storage.join(data_uri, SPLIT_FILE)
    if storage.exists(split_uri):
        train, val = apply_split_file(records, split_uri)
        how = split_uri
    else:
        train, val = split_by_lesion(records, val_fraction=val_fraction, seed=seed)
        how = f"split_by_lesion(val_fraction={val_fraction}, seed={seed})"
    if not train or not val:
        problem = (f"{data_uri}: the split left {len(train)} training and {len(val)} "
                   "validation images; both need at least one")
        if how == split_uri:  # the split file decides: val_fraction plays no part
            raise ValueError(f"{problem} (fix {split_uri} or use more data)")
        raise ParameterError("val_fraction", val_fraction,
                             problem + " (use more data or another {val_fraction})",
                             mentions={"val_fraction": None})
    return train, val, how


def class_weights(labels: Sequence[int], num_classes: int, power: float = 0.5) -> list[float]:
    """Per-class loss weights proportional to ``frequency ** -power`` (inverse sqrt by default).

    Weights are scaled so that the average weight over the training images is 1, which keeps
    the loss, and so the learning rate, on the same scale as unweighted cross-entropy. The full
    inverse frequency (``power=1``) over-corrects on HAM10000, where ``df`` has 1% of the
    images of ``nv``; the square root is the usual compromise.
    """
    counts = Counter(int(label) for label in labels)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"classes {missing} have no training images; cannot weight them")
    raw = [counts[c] ** -power for c in range(num_classes)]
    mean = sum(raw[c] * counts[c] for c in range(num_classes)) / sum(counts.values())
    return [w / mean for w in raw]


def encode_rows(records: Sequence[LesionRecord], classes: Sequence[str] | None = None,
                vocab: MetadataVocab | None = None) -> list[dict]:
    """Records as Ray Data rows: URIs, the label's index in ``classes``, encoded metadata.

    Labels outside ``classes`` (or records without one) get index -1; the classifier's rows
    are filtered before this, so -1 only appears in segmenter rows, which ignore labels.
    """
    vocab = vocab or MetadataVocab()
    index = {code: i for i, code in enumerate(classes or ())}
    rows = []
    for record in records:
        age_z, age_missing, sex, site = vocab.encode(record.age, record.sex, record.site)
        rows.append({
            "image_id": record.image_id,
            "image_uri": record.image_uri,
            "mask_uri": record.mask_uri or "",
            "label": index.get(record.label, -1),
            "age_z": age_z,
            "age_missing": age_missing,
            "sex": sex,
            "site": site,
        })
    return rows


def cache_side(input_size: int) -> int:
    """Side of the square uint8 cache for a model of ``input_size``: a fifth larger, rounded up
    to 16, so random crops and zooms resample real pixels instead of upsampling."""
    return int(math.ceil(input_size * 1.2 / 16) * 16)


def decode_rows(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: read and decode a batch of rows into the cache.

    Each image is squashed to ``size`` x ``size`` uint8 (as inference squashes its input; the
    training worker augments from there, see :mod:`raysky.train.augment`) and its mask, if
    any, to 0/1 at the same size. An image or mask that cannot be read or decoded keeps its
    row, blank, with ``readable`` 0 and the reason in ``read_error``, rather than failing the
    job: one corrupt file must not stop a run of thousands, yet the training loop must see
    how many it lost (see :func:`readable_rows`). Keeping the row also keeps every worker's
    shard, and so its step count, as planned, which DDP needs.
    """
    images, masks, errors = [], [], []
    for i, (image_uri, mask_uri) in enumerate(zip(batch["image_uri"], batch["mask_uri"], strict=True)):
        try:
            image = load_rgb(str(image_uri))
            mask = decode_mask(storage.read_bytes(str(mask_uri)), source=str(mask_uri)) if mask_uri else None
        except (ImageDecodeError, FileNotFoundError, OSError) as exc:
            logger.warning("cannot read %s: %s", batch["image_id"][i], exc)
            images.append(np.zeros((size, size, 3), np.uint8))
            masks.append(np.zeros((size, size), np.uint8))
            errors.append(f"{batch['image_id'][i]}: {exc}")
            continue
        images.append(np.asarray(image.resize((size, size), Image.BILINEAR, reducing_gap=3.0),
                                 dtype=np.uint8))
        masks.append(np.zeros((size, size), np.uint8) if mask is None else np.asarray(
            Image.fromarray((mask > 0).astype(np.uint8)).resize((size, size), Image.NEAREST)))
        errors.append("")
    return {
        "image_id": np.asarray(batch["image_id"]),
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "mask": np.stack(masks) if masks else np.zeros((0, size, size), np.uint8),
        "readable": np.asarray([not e for e in errors], dtype=np.uint8),
        "read_error": np.asarray(errors, dtype=object),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "age": np.stack([np.asarray(batch["age_z"], dtype=np.float32),
                         np.asarray(batch["age_missing"], dtype=np.float32)], axis=1),
        "sex": np.asarray(batch["sex"], dtype=np.int64),
        "site": np.asarray(batch["site"], dtype=np.int64),
    }


def readable_rows(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The batch without its unreadable rows, and those rows' errors (``image_id: reason``)."""
    if "readable" not in batch:
        return batch, []
    readable = np.asarray(batch["readable"], dtype=bool)
    errors = [str(e) for e in np.asarray(batch["read_error"])[~readable]]
    if readable.all():
        return batch, errors
    return {key: np.asarray(value)[readable] for key, value in batch.items()}, errors


def build_dataset(rows: list[dict], size: int, train: bool, decode_batch_size: int = 8,
                  seed: int = 0) -> ray.data.Dataset:
    """A materialized Ray Dataset of the rows decoded into the uint8 cache at ``size``.

    Images are decoded once, here, and every epoch iterates the cached blocks: decoding and
    resizing JPEGs each epoch cost as much CPU as the model's own step on a small machine.
    Augmentation happens in the training worker (:mod:`raysky.train.augment`), so it still
    differs every epoch. The training rows are shuffled once and their blocks re-ordered every
    epoch, both drawn from ``seed``; the loop's local shuffle buffer mixes across blocks. With
    one worker, two runs with the same seed therefore see the same images in the same order and
    draw the same augmentations for each. (Several workers take blocks as they ask for them,
    which no seed fixes; and the memory layout the loop measures at run time can differ between
    runs, and with it the last bits of the arithmetic.)
    """
    import ray.data

    if train:
        # Dataset CSVs are often sorted by diagnosis.
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    # Small blocks also let the streaming split hand work to every training worker early.
    blocks = max(1, min(len(rows), math.ceil(len(rows) / decode_batch_size)))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(decode_rows, fn_kwargs={"size": size},
                                  batch_size=decode_batch_size, batch_format="numpy", num_cpus=1)
    # The training loop prints its own progress (epoch, step, loss, rate, ETA); Ray Data's
    # bars from every worker would bury it.
    dataset.context.enable_progress_bars = False
    # Decode tasks finish in any order; keeping the rows' order makes the cache, and so the
    # seeded block order below, the same in every run.
    dataset.context.execution_options.preserve_order = True
    dataset = dataset.materialize()
    dataset.context.execution_options.preserve_order = False
    if not train:
        return dataset
    # Reseeded by Ray on every execution, that is every epoch: a new order each epoch, and the
    # same sequence of orders in every run with this seed.
    order = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    return dataset.randomize_block_order(seed=order)
