"""Results joined to ground truth: the one join that ``raysky evaluate``, the report and the
subgroup audit make, on ``image_id`` as ISIC matches them (:func:`raysky.data.ids.normalize_id`,
an image suffix dropped), counting what did not match in ``coverage``."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from raysky.data.ids import normalize_id
from raysky.data.records import LesionRecord


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
