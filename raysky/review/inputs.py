"""Reading what ``raysky evaluate`` scores: a results table and its ground truth.

Result ids are matched as ISIC matches them (:func:`raysky.data.ids.normalize_id`, an image
suffix dropped); :func:`raysky.results.ground_truth.join_ground_truth` joins the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from raysky.data.ids import normalize_id, suffixed_ids
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
