"""Reading what ``raysky evaluate`` scores: a results table and its ground truth, and joining them.

Results and ground truth are matched on ``image_id`` as ISIC matches them (an image suffix
dropped); :func:`join_ground_truth` counts what did not match in ``coverage``.
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


def join_ground_truth(frame: pd.DataFrame, records: Sequence[LesionRecord]
                      ) -> tuple[pd.DataFrame, dict]:
    """Attach ``label``, ``mask_uri`` and ``lesion_id`` from ``records`` to the result rows with
    ground truth (the lesion id is the unit of every interval, see
    :mod:`raysky.metrics.intervals`).

    Returns the joined rows (all statuses) and a ``coverage`` dict counting results, ground
    truth, matches, scoring errors among the matches, and unmatched ids on either side (with
    the first few of each listed so that a wrong ``--data`` folder is obvious).
    """
    truth = pd.DataFrame(
        {"image_id": [normalize_id(r.image_id) for r in records],
         "label": [r.label for r in records],
         "mask_uri": [r.mask_uri for r in records],
         "lesion_id": [r.lesion_id for r in records]},
        columns=["image_id", "label", "mask_uri", "lesion_id"],
    ).drop_duplicates("image_id")
    # A results column of the same name (none today) would win over the records'.
    truth = truth.drop(columns=[c for c in ("lesion_id",) if c in frame.columns])
    joined = frame.merge(truth, on="image_id", how="inner", validate="one_to_one")
    result_ids, truth_ids = set(frame["image_id"]), set(truth["image_id"])
    no_truth = sorted(result_ids - truth_ids)
    no_result = sorted(truth_ids - result_ids)
    coverage = {
        "results": int(len(frame)),
        "ground_truth": int(len(truth)),
        "matched": int(len(joined)),
        "scoring_errors": int((joined["status"] != "ok").sum()),
        "results_without_ground_truth": len(no_truth),
        "ground_truth_without_results": len(no_result),
        "examples_without_ground_truth": no_truth[:10],
        "examples_without_results": no_result[:10],
    }
    return joined, coverage
