"""Helpers the tests import (``from tests.helpers import ...``): the repository's root, and
results tables in the scorer's own schema with informative, imperfect predictions.

Fixtures stay in ``conftest.py``; what a test calls with arguments lives here, so that it is
imported like any module rather than from a conftest."""

from __future__ import annotations

import csv
import importlib
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raysky import storage
from raysky.data.images import encode_png, load_mask
from raysky.data.readers import read_dataset
from raysky.data.taxonomy import HAM10000_CLASSES, MALIGNANT_CLASSES

# The checkout's root: tests that read the docs, the deployment files or pyproject.toml, or
# start a process in it.
REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, as ``python benchmarks/<name>.py`` would see it:
    with ``benchmarks/`` importable, since a script may import a module beside it, and the module
    in ``sys.modules`` (dataclasses look their module up there)."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)

# Rows of the sample with special roles in the synthetic results.
ERROR_INDEX = 10  # a melanoma scored with status "error": must be left out of every metric
TIE_INDICES = (3, 11)  # an exact tie for the top probability: counts as wrong
EXTRA_ID = "ISIC_9999999"  # a result with no ground truth


# --------------------------------------------------------------------------------------------
# Results tables in the scorer's schema (review/, train/test_tracking.py, cli/test_contract.py)
# --------------------------------------------------------------------------------------------


def results_schema(classes, with_heatmap: bool = True) -> pa.Schema:
    """The Parquet schema of ``raysky score`` results: the scorer's own definition."""
    from raysky.results.columns import output_schema

    return output_schema(classes, with_heatmap)


def result_row(image_id: str, source_uri: str, classes, probs=None, mask=None, heatmap=None,
               focus: float = math.nan, error: str | None = None) -> dict:
    """One results row; ``probs=None`` with ``error`` makes a failed row (nulls elsewhere)."""
    row = {"image_id": image_id, "source_uri": source_uri, "status": "error" if error else "ok",
           "error": error, "segmenter_version": "seg-test", "classifier_version": "cls-test",
           "scored_at": datetime(2025, 1, 1, tzinfo=timezone.utc)}
    if error:
        return row
    probs = np.asarray(probs, dtype=np.float32)
    height, width = mask.shape
    malignant = [i for i, c in enumerate(classes) if c in MALIGNANT_CLASSES]
    row.update({
        "width": width, "height": height, "predicted_class": classes[int(probs.argmax())],
        **{f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
        "malignant_prob": float(probs[malignant].sum()), "mask_png": encode_png(mask, mask=True),
        "lesion_area_frac": float(mask.mean()),
        "heatmap_png": None if heatmap is None else encode_png(
            np.clip(np.rint(heatmap * 255), 0, 255).astype(np.uint8)),
        "lesion_focus": focus,
    })
    return row


def write_results(uri: str, rows: list[dict], classes, parts: int = 1,
                  with_heatmap: bool = True) -> None:
    """Write rows as Parquet at ``uri``: one file, or a folder of ``parts`` files like Ray Data."""
    schema = results_schema(classes, with_heatmap)
    table = pa.Table.from_pylist(rows, schema=schema)
    fs, path = storage.resolve(uri)
    if parts == 1:
        pq.write_table(table, path, filesystem=fs)
        return
    storage.makedirs(uri)
    step = math.ceil(len(rows) / parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), f"{path}/part-{i:05d}.parquet", filesystem=fs)


def _perturbed_mask(mask: np.ndarray, i: int) -> np.ndarray:
    """A prediction of varying quality: shifted, eroded, dilated, empty or whole-image."""
    kind = i % 7
    if kind == 5:
        return np.zeros_like(mask)
    if kind == 6 and i > 10:
        return np.ones_like(mask)
    if kind in (3, 4):
        # Grow or shrink by a few pixels with max/min over a square neighbourhood.
        r = 2 + i % 5
        padded = np.pad(mask, r, mode="edge")
        stack = [padded[r + dy: r + dy + mask.shape[0], r + dx: r + dx + mask.shape[1]]
                 for dy in range(-r, r + 1, r) for dx in range(-r, r + 1, r)]
        return (np.max if kind == 3 else np.min)(stack, axis=0).astype(np.uint8)
    shift = 3 + 4 * i % 30
    return np.roll(mask, (shift, shift // 2), axis=(0, 1))


def synthetic_rows(sample_dir: Path, seed: int = 0) -> tuple[list, list[dict]]:
    """Records of the sample and results rows with informative, imperfect predictions."""
    records = read_dataset(str(sample_dir), "ham10000")
    classes = list(HAM10000_CLASSES)
    rng = np.random.default_rng(seed)
    rows = []
    for i, record in enumerate(records):
        if i == ERROR_INDEX:
            rows.append(result_row(record.image_id, record.image_uri, classes,
                                   error="truncated image"))
            continue
        truth = classes.index(record.label)
        logits = rng.normal(0.0, 1.0, len(classes))
        logits[truth] += rng.uniform(0.0, 3.5)
        probs = np.exp(logits) / np.exp(logits).sum()
        if i in TIE_INDICES:
            probs = np.full(len(classes), 0.04)
            probs[[truth, (truth + 1) % len(classes)]] = 0.38
        mask = _perturbed_mask(load_mask(record.mask_uri), i)
        rows.append(result_row(record.image_id, record.image_uri, classes, probs, mask,
                               focus=float(rng.uniform(0.1, 1.0)) if i % 9 else math.nan))
    rows.append(result_row(EXTRA_ID, "/nowhere/ISIC_9999999.jpg", classes,
                           np.full(len(classes), 1 / len(classes)), np.zeros((4, 4), np.uint8)))
    return records, rows


# --------------------------------------------------------------------------------------------
# A HAM10000-layout dataset eight times the sample (benchmarks/ tests)
# --------------------------------------------------------------------------------------------

DIHEDRAL_VIEWS = ((False, 0), (False, 1), (False, 2), (False, 3), (True, 0), (True, 1),
                  (True, 2), (True, 3))


def _dihedral_view(array: np.ndarray, mirror: bool, turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(array[:, ::-1] if mirror else array, turns))


def dihedral_dataset(sample_dir: Path, root: Path, val_per_class: int | None = None) -> None:
    """The sample in its eight dihedral views at ``root`` (HAM10000 layout, ``splits.csv``).

    The views keep their lesion's id, so a lesion's views stay on one side of any split.
    ``val_per_class`` lesions of each class go to val and the rest to train; ``None`` puts
    everything in val (a benchmark that only scores).
    """
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(sample_dir / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_lesions: set[str] = set()
    for dx in sorted({r["dx"] for r in rows}):
        lesions = sorted({r["lesion_id"] for r in rows if r["dx"] == dx})
        val_lesions.update(lesions if val_per_class is None else lesions[:val_per_class])
    out_rows, splits = [], []
    for row in rows:
        image = np.asarray(Image.open(sample_dir / "images" / f"{row['image_id']}.jpg"))
        mask = np.asarray(Image.open(sample_dir / "masks" / f"{row['image_id']}_segmentation.png"))
        split = "val" if row["lesion_id"] in val_lesions else "train"
        for k, (mirror, turns) in enumerate(DIHEDRAL_VIEWS):
            new_id = f"{row['image_id']}d{k}"
            Image.fromarray(_dihedral_view(image, mirror, turns)).save(
                root / "images" / f"{new_id}.jpg", quality=95)
            Image.fromarray(_dihedral_view(mask, mirror, turns)).save(
                root / "masks" / f"{new_id}_segmentation.png")
            out_rows.append({**row, "image_id": new_id})
            splits.append(f"{new_id},{split}\n")
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    (root / "splits.csv").write_text("image_id,split\n" + "".join(splits))
