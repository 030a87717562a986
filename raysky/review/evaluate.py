"""``raysky evaluate``: score a results table against ground truth, the way ISIC does.

A results table is the Parquet that ``raysky score`` writes (one row per image: ``image_id``,
``status``, ``prob_<class>`` per class, ``malignant_prob``, ``mask_png``, ``lesion_focus`` ...).
Ground truth comes from any layout :func:`raysky.data.readers.read_dataset` reads. Rows are
joined on ``image_id``; rows that failed to score, results without ground truth and ground
truth without results are counted in ``coverage`` and left out of every metric.

Every number follows the ISIC Challenge's scoring code (``isic-challenge-scoring``), and the
output uses its names: ``balanced_accuracy``, ``auc``, ``auc_sens_80``, ``ap``, ``dice``,
``jaccard``, ``threshold_jaccard``. Two deliberate differences, both for ill-defined cases that
ISIC never meets on its own ground truth: a per-class rate or AUC with no positives (or no
negatives) is ``null`` rather than an error or a free 1.0, and macro averages are over the
defined values only.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from raysky import results, storage
from raysky.data.images import ImageDecodeError, decode_mask, load_mask
from raysky.data.readers import metadata_frame, read_dataset, read_isic2018
from raysky.data.records import LesionRecord
from raysky.data.taxonomy import MALIGNANT_CLASSES, canonical_label, order_classes
from raysky.jsonable import to_jsonable
from raysky.results import PROB_PREFIX
from raysky.review.metrics import (
    argmax_strict,
    balanced_accuracy,
    binary_metrics,
    confusion_matrix,
    dice_score,
    jaccard_score,
    thresholded_jaccard,
)

REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "status")
LOW_FOCUS_THRESHOLD = 0.5
"""Default lesion focus below which an image is flagged: most Grad-CAM evidence is off-lesion."""

BINARY_COLUMNS: tuple[str, ...] = ("mask_png", "heatmap_png")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------
# Reading results and ground truth
# --------------------------------------------------------------------------------------------


def _normalize_id(image_id: object) -> str:
    # ISIC's own scorer accepts ids with a ".jpg" suffix; accept any image suffix the same way.
    text = str(image_id).strip()
    stem, ext = posixpath.splitext(text)
    return stem if ext.lower() in _IMAGE_SUFFIXES else text


def results_columns(uri: str) -> list[str]:
    """Column names of results (a Parquet file or folder), from the first file's footer only."""
    return list(results.schema(uri).names)


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
        image_ids = [*image_ids, *(f"{i}{suffix}" for i in image_ids for suffix in
                                   (*_IMAGE_SUFFIXES, *(x.upper() for x in _IMAGE_SUFFIXES)))]
    frame = results.read(uri, wanted, image_ids=image_ids)
    frame["image_id"] = frame["image_id"].map(_normalize_id)
    result_classes(frame, uri)  # validates the class columns early, with the URI in the error
    return frame.reset_index(drop=True)


def result_classes(frame: pd.DataFrame, source: str = "results") -> tuple[str, ...]:
    """The model's classes, from the ``prob_<class>`` columns, in canonical order."""
    codes = []
    for name in frame.columns:
        if name.startswith(PROB_PREFIX):
            suffix = name[len(PROB_PREFIX):]
            try:
                code = canonical_label(suffix)
            except ValueError as exc:
                raise ValueError(f"{source}: column {name!r}: {exc}") from None
            if code != suffix:
                raise ValueError(f"{source}: column {name!r} should be {PROB_PREFIX}{code}")
            codes.append(code)
    return order_classes(codes)


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
    """Attach ``label`` and ``mask_uri`` from ``records`` to the result rows with ground truth.

    Returns the joined rows (all statuses) and a ``coverage`` dict counting results, ground
    truth, matches, scoring errors among the matches, and unmatched ids on either side (with
    the first few of each listed so that a wrong ``--data`` folder is obvious).
    """
    truth = pd.DataFrame(
        {"image_id": [_normalize_id(r.image_id) for r in records],
         "label": [r.label for r in records],
         "mask_uri": [r.mask_uri for r in records]},
        columns=["image_id", "label", "mask_uri"],
    ).drop_duplicates("image_id")
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


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                           malignant_prob: np.ndarray | None = None) -> dict:
    """ISIC Task 3 / 2019 metrics for string labels against ``probs[:, i]`` of ``classes[i]``.

    Returns balanced accuracy (strict argmax: ties count as wrong), accuracy, the macro
    averages of the per-class ``auc``, ``auc_sens_80``, ``ap``, ``sensitivity`` and
    ``specificity`` (ISIC thresholds each class probability at 0.5 for the last two), the
    per-class values with ``support`` and argmax ``recall``, and the argmax confusion matrix
    with a column of ``undecided`` (tied) rows. Labels outside ``classes`` are an error: extend
    ``classes`` with zero-probability columns first (as :func:`evaluate_frame` does). With
    ``malignant_prob``, the same binary metrics are given for malignant versus benign.
    """
    classes = list(classes)
    index = {code: i for i, code in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes}")
    y = np.array([index[label] for label in labels], dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    per_class = {}
    pred = argmax_strict(probs)
    for i, code in enumerate(classes):
        truth = y == i
        values = binary_metrics(truth, probs[:, i])
        values["recall"] = float((pred[truth] == i).mean()) if truth.any() else float("nan")
        per_class[code] = values
    matrix = confusion_matrix(y, probs, len(classes))
    undecided = [int(((y == i) & (pred < 0)).sum()) for i in range(len(classes))]
    out = {
        "n": int(len(y)),
        "classes": classes,
        "balanced_accuracy": balanced_accuracy(y, probs),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        **{key: _mean(v[key] for v in per_class.values())
           for key in ("auc", "auc_sens_80", "ap", "sensitivity", "specificity")},
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "matrix": matrix.tolist(), "undecided": undecided},
    }
    if malignant_prob is not None:
        truth = np.array([label in MALIGNANT_CLASSES for label in labels], dtype=bool)
        out["malignant"] = binary_metrics(truth, np.asarray(malignant_prob, dtype=np.float64))
    return out


def segmentation_metrics(image_ids: Sequence[str], preds: Sequence[np.ndarray],
                         truths: Sequence[np.ndarray]) -> dict:
    """Per-image and mean Dice, Jaccard and ISIC's thresholded Jaccard (0 below 0.65).

    A prediction whose size differs from its ground truth is resized to it (nearest
    neighbour) and counted in ``resized``: results keep masks at the scored image's size,
    which can differ from a mask set distributed at another resolution.
    """
    from PIL import Image

    per_image, resized = [], 0
    for image_id, pred, truth in zip(image_ids, preds, truths, strict=True):
        if pred.shape != truth.shape:
            resized += 1
            pred = np.asarray(Image.fromarray(pred.astype(np.uint8)).resize(
                (truth.shape[1], truth.shape[0]), Image.NEAREST))
        jac = jaccard_score(pred, truth)
        per_image.append({"image_id": image_id, "dice": dice_score(pred, truth), "jaccard": jac,
                          "threshold_jaccard": thresholded_jaccard(jac)})
    return {
        "n": len(per_image),
        **{key: _mean(row[key] for row in per_image)
           for key in ("dice", "jaccard", "threshold_jaccard")},
        "resized": resized,
        "per_image": per_image,
    }


def focus_statistics(focus: Sequence[float], area_frac: Sequence[float] | None = None,
                     correct: Sequence[bool | None] | None = None,
                     low_threshold: float = LOW_FOCUS_THRESHOLD) -> dict:
    """Distribution of ``lesion_focus`` (share of Grad-CAM mass on the lesion mask).

    ``mean_area_frac`` is what a heatmap spread evenly over the image would score, the chance
    level to compare ``mean`` with. With ``correct`` (None where there is no ground truth), the
    mean focus of right and wrong predictions is given too. NaN focus values (no heatmap) are
    counted as ``missing``.
    """
    values = np.asarray(focus, dtype=np.float64)
    valid = ~np.isnan(values)
    v = values[valid]
    out: dict = {"n": int(valid.sum()), "missing": int((~valid).sum()),
                 "low_focus_threshold": float(low_threshold)}
    if v.size:
        q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
        out.update({
            "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
            "p90": float(q[4]), "max": float(v.max()),
            "low_focus": int((v < low_threshold).sum()),
            "low_focus_share": float((v < low_threshold).mean()),
        })
    else:
        out.update({key: float("nan") for key in ("mean", "std", "min", "p10", "p25", "median",
                                                  "p75", "p90", "max", "low_focus_share")})
        out["low_focus"] = 0
    if area_frac is not None:
        areas = np.asarray(area_frac, dtype=np.float64)[valid]
        out["mean_area_frac"] = _mean(areas.tolist())
    if correct is not None:
        known = np.array([c is not None for c in correct])[valid]
        right = np.array([bool(c) for c in correct])[valid]
        out["mean_correct"] = _mean(v[known & right].tolist())
        out["mean_wrong"] = _mean(v[known & ~right].tolist())
    return out


def _load_truth_masks(uris: Sequence[str]) -> list[np.ndarray]:
    # Masks are small and S3 round trips dominate, so a few threads overlap the waits.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(load_mask, uris))


def class_probabilities(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """``[N, C]`` float64 probabilities for ``classes``; a class the model lacks gets zeros."""
    columns = [frame[f"{PROB_PREFIX}{code}"].to_numpy(dtype=np.float64)
               if f"{PROB_PREFIX}{code}" in frame.columns else np.zeros(len(frame))
               for code in classes]
    return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0))


def evaluate_frame(frame: pd.DataFrame, records: Sequence[LesionRecord],
                   low_focus: float = LOW_FOCUS_THRESHOLD,
                   checkpoint_calibration: dict | None = None, by: Sequence[str] = (),
                   metadata: pd.DataFrame | None = None) -> dict:
    """All metrics for an in-memory results table against ground-truth records (JSON-ready).

    Classification uses the matched ``ok`` rows with a label, segmentation those with a
    ground-truth mask and a ``mask_png``, lesion focus every ``ok`` result. Ground-truth
    classes the model does not predict are added with probability 0, and listed in
    ``classification.classes_not_predicted``. ``calibration`` holds ECE, Brier and referral
    figures (see :func:`raysky.calibration.evaluation.calibration_metrics`);
    ``checkpoint_calibration`` is the classifier checkpoint's calibration record (``{}``
    for a checkpoint without one, None when no checkpoint was given). ``subgroups`` is the
    audit of :func:`raysky.audit.subgroups.subgroup_audit` by sex, age band, site, skin tone
    and the ``by`` columns, taken from the results, the records or ``metadata`` (the dataset's
    metadata table, :func:`raysky.data.readers.metadata_frame`).
    """
    model_classes = result_classes(frame)
    joined, coverage = join_ground_truth(frame, records)
    ok = joined[joined["status"] == "ok"]
    out: dict = {"coverage": coverage, "model_classes": list(model_classes)}

    labelled = ok[ok["label"].notna()]
    if len(labelled):
        classes = order_classes(set(model_classes) | set(labelled["label"]))
        probs = class_probabilities(labelled, classes)
        malignant = (labelled["malignant_prob"].to_numpy(dtype=np.float64)
                     if "malignant_prob" in labelled.columns else None)
        out["classification"] = classification_metrics(
            labelled["label"].tolist(), probs, classes, malignant)
        out["classification"]["classes_not_predicted"] = [
            c for c in classes if c not in model_classes]
        out["calibration"] = _calibration(labelled, classes, probs, checkpoint_calibration)
        out["subgroups"] = _subgroups(frame, records, checkpoint_calibration, by, metadata)

    if "mask_png" in ok.columns:
        segmented = ok[ok["mask_uri"].notna() & ok["mask_png"].notna()]
        if len(segmented):
            preds, ids, bad = [], [], []
            for image_id, data in zip(segmented["image_id"], segmented["mask_png"], strict=True):
                try:
                    preds.append(decode_mask(bytes(data), f"mask_png of {image_id}"))
                    ids.append(image_id)
                except ImageDecodeError as exc:
                    bad.append({"image_id": image_id, "error": exc.reason})
            truths = _load_truth_masks(
                segmented.set_index("image_id").loc[ids, "mask_uri"].tolist())
            out["segmentation"] = segmentation_metrics(ids, preds, truths)
            out["segmentation"]["undecodable_masks"] = bad

    results_ok = frame[frame["status"] == "ok"]
    if "lesion_focus" in results_ok.columns and len(results_ok):
        correct = None
        if len(labelled) and "predicted_class" in results_ok.columns:
            truth_by_id = dict(zip(labelled["image_id"], labelled["label"], strict=True))
            correct = [None if i not in truth_by_id else truth_by_id[i] == p for i, p in
                       zip(results_ok["image_id"], results_ok["predicted_class"], strict=True)]
        out["lesion_focus"] = focus_statistics(
            results_ok["lesion_focus"].to_numpy(dtype=np.float64),
            results_ok["lesion_area_frac"].to_numpy(dtype=np.float64)
            if "lesion_area_frac" in results_ok.columns else None,
            correct, low_focus)
    return out


def _calibration(labelled: pd.DataFrame, classes: Sequence[str], probs: np.ndarray,
                 checkpoint_calibration: dict | None) -> dict:
    from raysky.calibration.evaluation import calibration_metrics, results_calibration_version

    index = {code: i for i, code in enumerate(classes)}
    stored = results_calibration_version(labelled)
    refer = labelled["refer"].to_numpy() if "refer" in labelled.columns else None
    if refer is not None and pd.isna(refer).any():
        refer = None
    return calibration_metrics(
        labelled["label"].map(index).to_numpy(dtype=np.int64), probs,
        labelled["label"].isin(list(MALIGNANT_CLASSES)).to_numpy(),
        [i for i, code in enumerate(classes) if code in MALIGNANT_CLASSES], stored, refer,
        checkpoint_calibration)


_NOT_GROUPS = frozenset({"image_id", "source_uri", "error", "width", "height", "scored_at",
                         *BINARY_COLUMNS})
"""Results columns that hold one value per image, never a group."""


def _subgroups(frame: pd.DataFrame, records: Sequence[LesionRecord],
               checkpoint_calibration: dict | None, by: Sequence[str],
               metadata: pd.DataFrame | None) -> dict:
    """The subgroup audit, on calibrated probabilities wherever a calibration is known.

    The referral threshold belongs to calibrated ``malignant_prob``: uncalibrated results
    scored with a checkpoint that has a calibration are recalibrated first, as for the
    calibration figures.
    """
    from raysky.audit.subgroups import STANDARD, audit_table, subgroup_audit
    from raysky.calibration.evaluation import results_calibration_version
    from raysky.calibration.temperature import recalibrate

    table = audit_table(frame, records)
    wanted = [name for name in by if name not in table.columns and name not in STANDARD]
    if wanted and metadata is not None:
        extra = metadata[["image_id", *[c for c in wanted if c in metadata.columns]]].copy()
        extra["image_id"] = extra["image_id"].map(_normalize_id)
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
        raise ValueError(f"--by {', '.join(missing)}: no such column in the results, the records"
                         f"{source}; columns to group by: {', '.join(there)}")
    record = checkpoint_calibration or {}
    threshold = float(record["referral"]["threshold"]) if record.get("referral") else None
    ok = (table["status"] == "ok").to_numpy()
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
    from raysky.models.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(classifier_uri)
    if "classifier_version" in frame.columns:
        scored = sorted({str(v) for v in frame["classifier_version"].dropna()})
        if scored and scored != [meta["version"]]:
            raise ValueError(f"{classifier_uri} is classifier {meta['version']}, but the results "
                             f"were scored with {', '.join(scored)}")
    return meta.get("calibration") or {}


def evaluate(results_uri: str, data_uri: str, format: str, metadata_uri: str | None = None,
             split: str | None = None, low_focus: float = LOW_FOCUS_THRESHOLD,
             classifier_uri: str | None = None, by: Sequence[str] = ()) -> dict:
    """Read results and ground truth (local or ``s3://``) and compute every metric.

    See :func:`evaluate_frame` for what is computed; the returned dict also records its inputs.
    Heatmaps are not read. ``classifier_uri``, the checkpoint the results were scored with,
    supplies the temperature for the calibration figures before and after, and the referral
    threshold of the subgroup audit; ``by`` adds groupings by metadata columns.
    """
    columns = [name for name in results_columns(results_uri) if name != "heatmap_png"]
    frame = read_results(results_uri, columns)
    records = read_ground_truth(data_uri, format, metadata_uri, split)
    calibration = checkpoint_calibration_for(frame, classifier_uri) if classifier_uri else None
    metadata = metadata_frame(data_uri, format, metadata_uri) if by else None
    metrics = evaluate_frame(frame, records, low_focus, calibration, by, metadata)
    if metrics["coverage"]["matched"] == 0:
        raise ValueError(
            f"no result in {results_uri} matches an image of {data_uri} ({format}); examples: "
            f"results {metrics['coverage']['examples_without_ground_truth'][:3]}, ground truth "
            f"{metrics['coverage']['examples_without_results'][:3]}")
    return {"results": str(results_uri), "data": str(data_uri), "format": format,
            **({"split": split} if split else {}), **metrics}


def card_sections(metrics: dict) -> dict[str, dict]:
    """The model-card sections of :func:`evaluate`'s output: the headline figures (what was
    evaluated, classification, segmentation and calibration without the per-bin details) and
    the subgroup audit."""
    cls = metrics.get("classification") or {}
    calibration = metrics.get("calibration") or {}
    evaluation = {
        "data": metrics.get("data"), "format": metrics.get("format"), "split": metrics.get("split"),
        "images": metrics.get("coverage", {}).get("matched"),
        "balanced_accuracy": cls.get("balanced_accuracy"), "auc": cls.get("auc"),
        "malignant_auc": (cls.get("malignant") or {}).get("auc"),
        "dice": (metrics.get("segmentation") or {}).get("dice"),
        "ece_before": (calibration.get("before") or {}).get("ece"),
        "ece_after": (calibration.get("after") or {}).get("ece"),
        "referral": {k: v for k, v in (calibration.get("referral") or {}).items()
                     if k in ("threshold", "sensitivity", "sensitivity_ci95", "specificity",
                              "specificity_ci95", "n_malignant", "n_benign")} or None,
    }
    sections = {"evaluation": to_jsonable(evaluation)}
    if metrics.get("subgroups"):
        sections["subgroups"] = to_jsonable(metrics["subgroups"])
    return sections


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_json(metrics: dict, uri: str) -> None:
    """Write ``metrics`` as indented strict JSON (NaN as null) to a local path or ``s3://``."""
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False)
    storage.write_bytes(uri, (text + "\n").encode())


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict) -> str:
    """A plain-text summary of :func:`evaluate`'s output, for the terminal."""
    cov = metrics["coverage"]
    lines = [f"results {cov['results']}, ground truth {cov['ground_truth']}, matched "
             f"{cov['matched']}, scoring errors {cov['scoring_errors']}, results without "
             f"ground truth {cov['results_without_ground_truth']}, ground truth without "
             f"results {cov['ground_truth_without_results']}"]
    seg = metrics.get("segmentation")
    if seg:
        lines += ["", f"Segmentation ({seg['n']} images)",
                  "  " + "  ".join(f"{k} {_fmt(seg[k])}"
                                   for k in ("dice", "jaccard", "threshold_jaccard"))]
    cls = metrics.get("classification")
    if cls:
        keys = ("auc", "auc_sens_80", "ap", "sensitivity", "specificity", "recall", "support")
        lines += ["", f"Classification ({cls['n']} images)",
                  f"  balanced_accuracy {_fmt(cls['balanced_accuracy'])}  accuracy "
                  f"{_fmt(cls['accuracy'])}  auc {_fmt(cls['auc'])}  auc_sens_80 "
                  f"{_fmt(cls['auc_sens_80'])}  ap {_fmt(cls['ap'])}",
                  "  " + f"{'class':<10}" + "".join(f"{k:>12}" for k in keys)]
        rows = list(cls["per_class"].items())
        if "malignant" in cls:
            rows.append(("malignant", {**cls["malignant"], "recall": None}))
        for code, values in rows:
            lines.append("  " + f"{code:<10}" + "".join(f"{_fmt(values.get(k)):>12}" for k in keys))
        cm = cls["confusion_matrix"]
        lines += ["", "  confusion matrix (rows: truth, columns: prediction)",
                  "  " + f"{'':<10}" + "".join(f"{c:>7}" for c in cm["classes"]) + f"{'tied':>7}"]
        for code, row, tied in zip(cm["classes"], cm["matrix"], cm["undecided"], strict=True):
            lines.append("  " + f"{code:<10}" + "".join(f"{n:>7}" for n in row) + f"{tied:>7}")
    if metrics.get("calibration"):
        from raysky.calibration.evaluation import format_calibration

        lines += format_calibration(metrics["calibration"])
    if metrics.get("subgroups"):
        from raysky.audit.subgroups import format_subgroups

        lines += ["", "Subgroups (malignant vs benign; bootstrap 95% intervals)",
                  *("  " + line for line in format_subgroups(metrics["subgroups"]).splitlines())]
    focus = metrics.get("lesion_focus")
    if focus:
        lines += ["", f"Lesion focus ({focus['n']} explained, {focus['missing']} without heatmap)",
                  f"  mean {_fmt(focus['mean'])}  median {_fmt(focus['median'])}  p10 "
                  f"{_fmt(focus['p10'])}  p90 {_fmt(focus['p90'])}  below "
                  f"{focus['low_focus_threshold']:g}: {focus['low_focus']}"
                  + (f"  chance level (mean lesion area) {_fmt(focus['mean_area_frac'])}"
                     if "mean_area_frac" in focus else "")]
    return "\n".join(lines)
