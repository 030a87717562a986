"""Reading what ``raysky evaluate`` scores: a results table and its ground truth.

Result ids are matched as ISIC matches them (:func:`raysky.data.ids.normalize_id`, an image
suffix dropped); :func:`raysky.results.ground_truth.join_ground_truth` joins the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from raysky import storage
from raysky.data.ids import normalize_id, suffixed_ids
from raysky.data.readers import read_dataset, read_isic2018
from raysky.data.records import LesionRecord
from raysky.results import reader
from raysky.results.columns import PROB_PREFIX, result_classes

REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "status")
BINARY_COLUMNS: tuple[str, ...] = ("mask_png", "heatmap_png")


def results_columns(uri: str) -> list[str]:
    """Column names of results (a Parquet file or folder), from the first file's footer only."""
    return list(reader.schema(uri).names)


def read_results(uri: str, columns: Sequence[str] | None = None,
                 image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The results under ``uri`` as evaluation reads them: :func:`raysky.results.read` (one row
    per input; ``columns`` and ``image_ids`` limit what is read, and names absent from the
    file are ignored, so optional columns such as ``heatmap_png`` can be asked for safely),
    with ids matched as ISIC matches them (an image suffix dropped) and checked.

    The table must hold ``image_id`` and ``status`` and at least one ``prob_<class>`` column
    whose suffix is a known diagnosis. Problems raise ``ValueError`` naming the URI.
    """
    names = results_columns(uri)
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ValueError(f"{uri}: results lack required column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(names)})")
    if not any(name.startswith(PROB_PREFIX) for name in names):
        raise ValueError(f"{uri}: results have no {PROB_PREFIX}<class> probability columns")
    wanted = [name for name in (columns or names) if name in names]
    for name in (*REQUIRED_COLUMNS, *(n for n in names if n.startswith(PROB_PREFIX))):
        if name not in wanted:
            wanted.append(name)
    if image_ids is not None:
        # Callers hold matched ids (suffix dropped); the file may store x.png or x.jpeg.
        image_ids = suffixed_ids(image_ids)
    frame = reader.read(uri, wanted, image_ids=image_ids)
    frame["image_id"] = frame["image_id"].map(normalize_id)
    result_classes(frame, uri)  # validates the class columns early, with the URI in the error
    return frame.reset_index(drop=True)


def read_ground_truth(uri: str, format: str, metadata_uri: str | None = None,
                      split: str | None = None) -> list[LesionRecord]:
    """Ground-truth records from any supported layout, optionally one split of them.

    ``split`` picks an ISIC 2018 split (Training, Validation, Test) for ``isic2018``, and for
    the other layouts a split of the ``splits.csv`` at the dataset root (train, val, test), so
    figures can be restricted to images the model never trained on.
    """
    if split is not None and str(format).lower() == "isic2018":
        return read_isic2018(uri, split)
    records = read_dataset(uri, format, metadata_uri)
    if split is None:
        return records
    from raysky.data.splits import SPLIT_FILE, select_split

    split_uri = storage.join(uri, SPLIT_FILE)
    if not storage.exists(split_uri):
        raise ValueError(f"--split {split} needs {split_uri} (image_id,split), which does not exist")
    return select_split(records, split_uri, split)
