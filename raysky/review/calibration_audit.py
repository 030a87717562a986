"""The calibration and subgroup parts of ``raysky evaluate``.

Both depend on the classifier checkpoint the results were scored with: its temperature gives
the calibration figures before and after, and its referral threshold is what the subgroup
audit measures sensitivity and specificity at. Both measure the same referral decisions
(:func:`referral_decisions`) with the same intervals, so the overall referral sensitivity is
one figure with one interval wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysky.audit.subgroups import STANDARD, audit_table, subgroup_audit
from raysky.calibration.evaluation import calibration_metrics, results_calibration_version
from raysky.calibration.referral import refer
from raysky.calibration.temperature import recalibrate
from raysky.data.ids import normalize_id
from raysky.data.records import LesionRecord
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.results.columns import PROB_PREFIX
from raysky.review.inputs import BINARY_COLUMNS
from raysky.settings import ParameterError


def referral_decisions(rows: pd.DataFrame, checkpoint_calibration: dict | None
                       ) -> np.ndarray | None:
    """The referral decision of each (``ok``) result row, or None where none can be had.

    The results' own ``refer`` column where every row has one (it is what screening
    decided); else, with a checkpoint calibration, its threshold on the malignant probability
    of the row's ``prob_<class>`` columns, recalibrated by its temperature when the results are
    uncalibrated. Row by row, so any selection of the same rows gets the same decisions.
    """
    if len(rows) and "refer" in rows.columns and rows["refer"].notna().all():
        return rows["refer"].astype(bool).to_numpy()
    record = checkpoint_calibration or {}
    if not record.get("referral"):
        return None
    columns = [c for c in rows.columns if c.startswith(PROB_PREFIX)]
    probs = rows[columns].to_numpy(np.float64)
    if not results_calibration_version(rows):
        probs = recalibrate(probs, float(record["temperature"]))
    malignant = [i for i, c in enumerate(columns) if c[len(PROB_PREFIX):] in MALIGNANT_CLASSES]
    return refer(probs[:, malignant].sum(axis=1), float(record["referral"]["threshold"]))


def _lesions(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' lesion ids, None where the data has none (each image is then its own unit)."""
    if "lesion_id" not in rows.columns or rows["lesion_id"].isna().all():
        return None
    return rows["lesion_id"].to_numpy(object)


def calibration_figures(labelled: pd.DataFrame, classes: Sequence[str], probs: np.ndarray,
                        checkpoint_calibration: dict | None) -> dict:
    """ECE, Brier and referral figures of the labelled ``ok`` rows, whose ``probs[:, i]`` are
    for ``classes[i]``: :func:`raysky.calibration.evaluation.calibration_metrics`, told which
    calibration the results were scored with, the checkpoint's ``checkpoint_calibration`` and
    the rows' :func:`referral_decisions`, with intervals by lesion.
    """
    index = {code: i for i, code in enumerate(classes)}
    return calibration_metrics(
        labelled["label"].map(index).to_numpy(dtype=np.int64), probs,
        labelled["label"].isin(list(MALIGNANT_CLASSES)).to_numpy(),
        results_calibration_version(labelled),
        referral_decisions(labelled, checkpoint_calibration), checkpoint_calibration,
        _lesions(labelled))


_NOT_GROUPS = frozenset({"image_id", "source_uri", "error", "width", "height", "scored_at",
                         *BINARY_COLUMNS})
"""Results columns that hold one value per image, never a group."""


def calibrated_subgroups(frame: pd.DataFrame, records: Sequence[LesionRecord],
                         checkpoint_calibration: dict | None, by: Sequence[str],
                         metadata: pd.DataFrame | None) -> dict:
    """The subgroup audit, on calibrated probabilities wherever a calibration is known.

    The referral threshold belongs to calibrated ``malignant_prob``: uncalibrated results
    scored with a checkpoint that has a calibration are recalibrated first, as for the
    calibration figures.
    """
    table = audit_table(frame, records)
    wanted = [name for name in by if name not in table.columns and name not in STANDARD]
    if wanted and metadata is not None:
        extra = metadata[["image_id", *[c for c in wanted if c in metadata.columns]]].copy()
        extra["image_id"] = extra["image_id"].map(normalize_id)
        table = table.merge(extra.drop_duplicates("image_id"), on="image_id", how="left")
    missing = [name for name in wanted if name not in table.columns]
    if missing:
        # Results columns can be grouped by too (a classifier version, the OOD flag); only the
        # categorical ones are worth naming: probabilities, images and per-row text are not.
        categorical = [c for c in frame.columns if c not in _NOT_GROUPS
                       and not c.startswith(PROB_PREFIX) and not pd.api.types.is_float_dtype(
                           frame[c]) and not pd.api.types.is_datetime64_any_dtype(frame[c])]
        there = sorted({*STANDARD, "lesion_id", "age", "sex", "site", *categorical,
                        *(metadata.columns if metadata is not None else ())} - {"image_id"})
        source = (f" or {metadata.attrs.get('source', 'the metadata')}" if metadata is not None
                  else " (this layout has no metadata file)")
        raise ParameterError("by", missing, f"no such column in the results, the records"
                             f"{source}; columns to group by: {', '.join(there)}")
    record = checkpoint_calibration or {}
    threshold = float(record["referral"]["threshold"]) if record.get("referral") else None
    ok = (table["status"] == "ok").to_numpy()
    # The decisions the calibration figures measure, taken before the probabilities below are
    # recalibrated in place: the same rows, so the same decisions.
    measured = ok & table["label"].notna().to_numpy()
    decisions = referral_decisions(table[measured], record)
    if decisions is not None:
        table["refer"] = pd.Series(pd.NA, index=table.index, dtype="boolean")
        table.loc[measured, "refer"] = decisions
    if record.get("temperature") and not results_calibration_version(table[ok]):
        columns = [c for c in table.columns if c.startswith(PROB_PREFIX)]
        table[[*columns, "malignant_prob"]] = table[[*columns, "malignant_prob"]].astype(np.float64)
        probs = recalibrate(table.loc[ok, columns].to_numpy(np.float64), float(record["temperature"]))
        table.loc[ok, columns] = probs
        malignant = [i for i, c in enumerate(columns) if c[len(PROB_PREFIX):] in MALIGNANT_CLASSES]
        table.loc[ok, "malignant_prob"] = probs[:, malignant].sum(axis=1)
    return subgroup_audit(table, by=list(by), threshold=threshold)


def checkpoint_calibration_for(frame: pd.DataFrame, classifier_uri: str) -> dict:
    """The calibration record (``{}`` if none) of the classifier the results were scored with.

    The checkpoint's weights version must be the results' ``classifier_version``.
    """
    # Here, not at the top: the checkpoint module loads torch, which evaluate needs only when
    # it is given a checkpoint.
    from raysky.models.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(classifier_uri)
    if "classifier_version" in frame.columns:
        scored = sorted({str(v) for v in frame["classifier_version"].dropna()})
        if scored and scored != [meta["version"]]:
            raise ValueError(f"{classifier_uri} is classifier {meta['version']}, but the results "
                             f"were scored with {', '.join(scored)}")
    return meta.get("calibration") or {}
