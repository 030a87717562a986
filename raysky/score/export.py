"""``raysky export``: write scoring results in the ISIC 2018 and ISIC 2019 submission formats.

For each format, two things are written under the output folder (local or ``s3://``):

* ``<FORMAT>_classification.csv`` with the header ``image,<ISIC class columns>`` and one row
  per scored image, each value in [0, 1]. ISIC 2018 uses ``MEL,NV,BCC,AKIEC,BKL,DF,VASC``, and
  ISIC 2019 uses ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``. A class the model does not predict
  (SCC or UNK for a HAM10000 model) gets 0. If the model predicts a class that the format lacks
  (SCC in 2018), the remaining columns are renormalised to sum to 1.
* ``<FORMAT>_segmentation/<image id>_segmentation.png``: the lesion mask as a single-channel
  0/255 PNG at the image's original size.

Rows with ``status='error'`` have no prediction. They are left out, and the count is reported.
Image ids become file names, so the results are refused before anything is written when one
of them could name a path outside the output (see :func:`raysky.storage.name_problem`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from raysky import storage
from raysky.data.taxonomy import ISIC_COLUMN_NAMES
from raysky.results import reader
from raysky.results.columns import PROB_PREFIX, class_columns

if TYPE_CHECKING:
    import pandas as pd

FORMATS: tuple[str, ...] = ("isic2018", "isic2019")
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {"isic2018": (), "isic2019": ("UNK",)}


@dataclass
class ExportSummary:
    """Paths written and counts."""

    csv_uri: str
    masks_uri: str
    images: int
    masks: int
    skipped_errors: int

    def format(self) -> str:
        """One line per output for the CLI."""
        lines = [f"{self.csv_uri}: {self.images} images", f"{self.masks_uri}: {self.masks} masks"]
        if self.skipped_errors:
            lines.append(f"left out {self.skipped_errors} images that could not be scored "
                         "(status 'error'; see `raysky results`)")
        return "\n".join(lines)


def submission_frame(frame: pd.DataFrame, format: str) -> pd.DataFrame:
    """The classification table for ``format`` from a results frame (``image_id``, ``prob_*``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    import pandas as pd

    codes = list(ISIC_COLUMN_NAMES[format])
    probs = np.stack([
        frame[f"{PROB_PREFIX}{code}"].to_numpy(np.float64)
        if f"{PROB_PREFIX}{code}" in frame.columns else np.zeros(len(frame))
        for code in codes
    ], axis=1) if len(frame) else np.zeros((0, len(codes)))
    totals = probs.sum(axis=1, keepdims=True)
    probs = np.clip(np.divide(probs, totals, out=probs.copy(), where=totals > 0), 0.0, 1.0)
    columns = [ISIC_COLUMN_NAMES[format][code] for code in codes]
    table = pd.DataFrame(probs, columns=columns)
    for extra in EXTRA_COLUMNS[format]:
        table[extra] = 0.0
    table.insert(0, "image", frame["image_id"].astype(str).to_numpy())
    return table


def export_results(format: str, results_uri: str, out_dir: str) -> ExportSummary:
    """Write the ``format`` submission files for the results under ``results_uri`` to ``out_dir``."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    probs = class_columns(reader.schema(results_uri))
    if not probs:
        raise ValueError(f"{results_uri}: no prob_<class> columns; are these raysky results?")
    # Only the small columns are loaded whole; the mask PNGs are streamed file by file.
    frame = reader.read(results_uri, ["image_id", "status", *probs])
    ok = frame[frame["status"] == "ok"]
    for image_id in ok["image_id"]:
        storage.check_name(image_id, f"image id in {results_uri}")
    prefix = format.upper()
    csv_uri = storage.join(out_dir, f"{prefix}_classification.csv")
    masks_uri = storage.join(out_dir, f"{prefix}_segmentation")
    storage.makedirs(out_dir)
    csv = submission_frame(ok, format).to_csv(index=False, float_format="%.6f", lineterminator="\n")
    storage.write_bytes(csv_uri, csv.encode())
    written = _write_masks(results_uri, set(ok["image_id"]), masks_uri)
    return ExportSummary(csv_uri=csv_uri, masks_uri=masks_uri, images=len(ok), masks=written,
                         skipped_errors=int(len(frame) - len(ok)))


def _write_masks(results_uri: str, wanted: set[str], masks_uri: str) -> int:
    """Copy each wanted image's mask PNG out of the result files, one row group at a time."""
    storage.makedirs(masks_uri)
    written: set[str] = set()
    for uri in reader.result_files(results_uri):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            columns = ["image_id", "status", "width", "height", "mask_png"]
            for batch in parquet.iter_batches(columns=columns, batch_size=64):
                for row in batch.to_pylist():
                    image_id = row["image_id"]
                    if image_id in written or image_id not in wanted or row["status"] != "ok":
                        continue
                    _check_mask(row, uri)
                    target = storage.safe_join(masks_uri, image_id, "_segmentation.png",
                                               what=f"image id in {uri}")
                    storage.write_bytes(target, row["mask_png"])
                    written.add(image_id)
    return len(written)


def _check_mask(row: dict, uri: str) -> None:
    """A submission mask must be single-channel at the image's size; anything else is a bug."""
    with Image.open(io.BytesIO(row["mask_png"])) as mask:
        if mask.mode != "L" or mask.size != (row["width"], row["height"]):
            raise ValueError(f"{uri}: mask of {row['image_id']} is {mask.mode} {mask.size}, "
                             f"expected L ({row['width']}, {row['height']})")
