"""``raysky report``: one self-contained HTML page for reviewing a scored archive.

Everything the page shows is inside the file: thumbnails and overlays are JPEG ``data:`` URIs,
plots are inline SVG drawn here, and the style sheet is inline, so the page can be mailed,
archived next to the results, or opened on a machine without network access. The page has no
scripts.

The page is the Jinja2 template ``templates/report.html.j2`` (style sheet ``report.css`` beside
it), rendered with autoescape on. Its sections and SVG plots are macros too
(``sections.html.j2``, ``plots.html.j2``): :mod:`raysky.review.reliability_plot`,
:mod:`raysky.review.audit_plots` and :mod:`raysky.review.pictures` compute only numbers and
plain text for them. So every value, image ids, group names, paths and error messages
included, is escaped exactly once, by the template, and no Python-built markup enters the page.

Sections: a summary of the run; with ground truth, the ISIC metrics, the confusion matrix and
ROC curves; a gallery of the ``top_n`` lesions with the highest ``malignant_prob`` (image with
the predicted mask's outline, Grad-CAM overlay, class probabilities, lesion focus); the
reliability diagram of the calibration (with ground truth); and the images flagged for review
(lesion focus below a threshold, out of distribution, and rows that failed to score).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from PIL import Image

from raysky import storage
from raysky.audit.paired import ROBUSTNESS_FILE
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import decode_mask
from raysky.data.records import DatasetRef
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.isic import binary_metrics, roc_points
from raysky.results.columns import PROB_PREFIX, result_classes
from raysky.review.audit_plots import robustness_view, subgroup_view
from raysky.review.evaluate import evaluate_against
from raysky.review.inputs import read_results, results_columns
from raysky.review.pictures import (
    data_uri,
    decode_heatmap,
    lesion_pictures,
    load_picture,
    roc_plot,
)
from raysky.review.reliability_plot import calibration_view
from raysky.review.settings import ReportOptions
from raysky.review.svg import SquarePlot
from raysky.review.task_metrics import class_probabilities, focus_statistics

_LIGHT_COLUMNS = ("image_id", "source_uri", "status", "error", "width", "height",
                  "predicted_class", "malignant_prob", "lesion_area_frac", "lesion_focus",
                  "segmenter_version", "classifier_version", "refer", "ood_score", "ood",
                  "calibration_version", "scored_at")


@functools.cache
def _environment() -> Environment:
    # StrictUndefined: a name the template expects but build_report forgot fails loudly
    # instead of leaving a silent gap in the page.
    env = Environment(loader=PackageLoader("raysky.review", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    env.filters["fmt"] = _fmt
    return env


def render_macro(template: str, macro: str, *args) -> Markup:
    """One macro of the page's templates rendered alone, exactly as the page renders it (same
    environment, autoescape on): how tests look at one section or plot without a whole page."""
    return getattr(_environment().get_template(template).module, macro)(*args)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def confusion_cells(confusion: dict) -> dict:
    """The confusion matrix as the template draws it: per truth row, each count with its cell
    style (shaded by the count's share of the row, blue on the diagonal, orange off it), and
    the row's tied count."""
    classes, matrix, tied = confusion["classes"], confusion["matrix"], confusion["undecided"]
    rows = []
    for code, counts, ties in zip(classes, matrix, tied, strict=True):
        total = max(1, sum(counts) + ties)
        cells = []
        for j, n in enumerate(counts):
            share = n / total
            color = "0,114,178" if classes[j] == code else "213,94,0"
            text_color = "#fff" if share > 0.6 else "#222"
            cells.append((n, f"background:rgba({color},{share:.2f});color:{text_color}"))
        rows.append((code, cells, ties))
    return {"classes": classes, "rows": rows}


def _card(row: pd.Series, classes: Sequence[str], pictures: tuple, low_focus: float,
          label: str | None) -> dict:
    outlined, overlay = pictures
    probs = sorted(((c, float(row[f"{PROB_PREFIX}{c}"])) for c in classes),
                   key=lambda item: -item[1])
    focus = float(row.get("lesion_focus", math.nan))
    return {
        "image_id": str(row["image_id"]), "malignant_prob": float(row["malignant_prob"]),
        "focus": None if math.isnan(focus) else focus, "low_focus": focus < low_focus,
        "label": label, "right": label == row["predicted_class"],
        "predicted": str(row["predicted_class"]),
        "outlined": None if outlined is None else data_uri(outlined),
        "overlay": None if overlay is None else data_uri(overlay),
        "bars": [(c, p, max(1, round(160 * p)), c in MALIGNANT_CLASSES) for c, p in probs[:4]],
    }


def _per_class_rows(metrics: dict) -> list[tuple[str, dict]]:
    cls = metrics.get("classification")
    if not cls:
        return []
    rows = [*cls["per_class"].items()]
    if "malignant" in cls:
        rows.append(("malignant vs benign", {**cls["malignant"], "recall": None}))
    return rows


def _robustness(folder: str) -> dict:
    """The robustness section's data from ``<folder>/robustness.json`` and its example strips."""
    path = os.path.join(folder, ROBUSTNESS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"robustness_dir {folder}: no {ROBUSTNESS_FILE} (the out folder "
                                "of a raysky robustness run)")
    with open(path) as handle:
        report = json.load(handle)
    strips = {}
    for kind, strip in report.get("examples", {}).items():
        if strip and os.path.exists(strip):
            strips[kind] = data_uri(np.asarray(Image.open(strip).convert("RGB")))
    return robustness_view(report, strips)


def _roc_curves(labelled: pd.DataFrame, classes: Sequence[str]) -> SquarePlot | None:
    probs = class_probabilities(labelled, classes)
    labels = labelled["label"].to_numpy()
    curves = []
    for i, code in enumerate(classes):
        truth = labels == code
        if truth.any() and not truth.all():
            fpr, tpr, _ = roc_points(truth, probs[:, i])
            curves.append((code, fpr, tpr, binary_metrics(truth, probs[:, i])["auc"]))
    truth = np.isin(labels, list(MALIGNANT_CLASSES))
    if "malignant_prob" in labelled.columns and truth.any() and not truth.all():
        scores = labelled["malignant_prob"].to_numpy(dtype=np.float64)
        fpr, tpr, _ = roc_points(truth, scores)
        curves.append(("malignant", fpr, tpr, binary_metrics(truth, scores)["auc"]))
    return roc_plot(curves) if curves else None


def _pictures_for(rows: pd.DataFrame, binaries: pd.DataFrame) -> dict[str, tuple]:
    """Thumbnails for each row, reading the source images concurrently."""
    by_id = binaries.set_index("image_id")

    def one(item) -> tuple[str, tuple]:
        image_id, source = item
        mask_data = by_id.at[image_id, "mask_png"] if "mask_png" in by_id.columns else None
        heat_data = by_id.at[image_id, "heatmap_png"] if "heatmap_png" in by_id.columns else None
        mask = None
        if mask_data is not None:
            try:
                mask = decode_mask(bytes(mask_data), f"mask_png of {image_id}")
            except ImageDecodeError:
                mask = None
        heatmap = decode_heatmap(heat_data)
        image = load_picture(source)
        if image is None and mask is None and heatmap is None:
            return image_id, (None, None)
        return image_id, lesion_pictures(image, mask, heatmap)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, zip(rows["image_id"], rows.get("source_uri", [None] * len(rows)),
                                      strict=True)))


def _ground_truth(results_uri: str, names: Sequence[str], dataset: DatasetRef,
                  options: ReportOptions) -> tuple[dict, dict[str, str]]:
    """The metrics against ``dataset`` and each labelled image's label."""
    with_masks = read_results(results_uri, [n for n in names if n != "heatmap_png"])
    metrics, records = evaluate_against(with_masks, dataset, options.low_focus,
                                        options.classifier_uri, options.by)
    return metrics, {r.image_id: r.label for r in records if r.label is not None}


def _selections(ok: pd.DataFrame, options: ReportOptions) -> dict[str, pd.DataFrame]:
    """The rows each part of the page shows: the gallery (highest ``malignant_prob``), every
    low-focus row and the first ``max_flagged`` of them, every OOD row and the first of them."""
    focus = ok["lesion_focus"] if "lesion_focus" in ok.columns else pd.Series(dtype=float)
    low = ok[focus < options.low_focus].sort_values("lesion_focus", kind="stable")
    ood = (ok[ok["ood"].fillna(False).astype(bool)].sort_values("ood_score", ascending=False,
                                                                kind="stable")
           if "ood" in ok.columns else ok.iloc[:0])
    return {"gallery": ok.sort_values("malignant_prob", ascending=False,
                                      kind="stable").head(options.top_n),
            "low": low, "flagged": low.head(options.max_flagged), "ood": ood,
            "ood_shown": ood.head(options.max_flagged), "focus": focus}


def _summary_rows(frame: pd.DataFrame, ok: pd.DataFrame, errors: pd.DataFrame,
                  focus_stats: dict, low_focus: float) -> list[tuple]:
    return [
        (len(frame), "images"), (len(ok), "scored"), (len(errors), "scoring errors"),
        (_fmt(float(ok["malignant_prob"].mean()) if len(ok) else math.nan),
         "mean malignant probability"),
        (int((ok["malignant_prob"] >= 0.5).sum()), "malignant probability >= 0.5"),
        (_fmt(focus_stats["median"]), "median lesion focus"),
        (focus_stats["low_focus"], f"lesion focus < {low_focus:g}"),
    ]


def _run_facts(ok: pd.DataFrame) -> tuple[str, str]:
    """The checkpoint versions the rows were scored with, and when."""
    versions = sorted({f"{s} / {c}" for s, c in zip(ok.get("segmenter_version", []),
                                                     ok.get("classifier_version", []),
                                                     strict=True)})
    scored_at = ""
    if "scored_at" in ok.columns and ok["scored_at"].notna().any():
        first, last = (f"{t:%Y-%m-%d %H:%M}" for t in (ok["scored_at"].min(), ok["scored_at"].max()))
        scored_at = f"scored {first}" + (f" to {last}" if last != first else "") + "; "
    return ", ".join(versions), scored_at


def _metric_sections(page_data: dict, metrics: dict, ok: pd.DataFrame,
                     labels: dict[str, str]) -> None:
    """Fill the parts of ``page_data`` that need ground truth."""
    page_data["calibration"] = calibration_view(metrics.get("calibration"))
    page_data["subgroups"] = subgroup_view(metrics.get("subgroups"))
    page_data["per_class"] = _per_class_rows(metrics)
    if metrics.get("classification"):
        page_data["confusion"] = confusion_cells(metrics["classification"]["confusion_matrix"])
    matched = ok[ok["image_id"].isin(labels)].copy()
    if len(matched) and "classification" in metrics:
        matched["label"] = matched["image_id"].map(labels)
        page_data["roc"] = _roc_curves(matched, metrics["classification"]["classes"])


def _shown_pictures(results_uri: str, names: list[str], chosen: dict[str, pd.DataFrame]) -> dict:
    """The pictures of the rows the page shows, by image id; only their masks and heatmaps are
    read, so a large results set costs no more than the page."""
    shown = pd.concat([chosen["gallery"], chosen["flagged"], chosen["ood_shown"]]
                      ).drop_duplicates("image_id")
    if not len(shown):
        return {}
    binary_columns = [n for n in ("mask_png", "heatmap_png") if n in names]
    binaries = read_results(results_uri, ["image_id", *binary_columns],
                            image_ids=shown["image_id"].tolist())
    return _pictures_for(shown, binaries)


def build_report(results_uri: str, out_uri: str, dataset: DatasetRef | None = None,
                 options: ReportOptions | None = None) -> dict:
    """Write the HTML review page for ``results_uri`` to ``out_uri`` (local or ``s3://``).

    With a ground-truth ``dataset`` the page adds ISIC metrics, a confusion matrix and ROC
    curves (see :func:`raysky.review.evaluate.evaluate_frame`) and the reliability diagram,
    before and after calibration when ``options.classifier_uri`` names the checkpoint scored
    with, and the subgroup audit (by sex, age band, site, skin tone and the ``options.by``
    metadata columns) with its forest plot. ``options.robustness_dir``, the ``out`` of a
    ``raysky robustness`` run, adds its table and one example strip per artefact type. Only
    the rows shown in the gallery and the flagged list have their masks and heatmaps read, so
    the page builds quickly from large results. Returns counts of what the page shows.
    """
    options = options or ReportOptions()
    names = results_columns(results_uri)
    frame = read_results(results_uri, [name for name in names if name in _LIGHT_COLUMNS])
    classes = result_classes(frame)
    ok = frame[frame["status"] == "ok"]
    errors = frame[frame["status"] != "ok"]
    metrics, labels = (_ground_truth(results_uri, names, dataset, options)
                       if dataset is not None else (None, {}))
    chosen = _selections(ok, options)
    pictures = _shown_pictures(results_uri, names, chosen)

    def cards(rows: pd.DataFrame) -> list[dict]:
        return [_card(row, classes, pictures[row["image_id"]], options.low_focus,
                      labels.get(row["image_id"])) for _, row in rows.iterrows()]

    focus_stats = focus_statistics(chosen["focus"].to_numpy(dtype=np.float64),
                                   low_threshold=options.low_focus)
    versions, scored_at = _run_facts(ok)
    counts = ok["predicted_class"].value_counts() if len(ok) else pd.Series(dtype=int)
    ood_rows = chosen["ood"]
    page_data = {
        "title": options.title, "results_uri": str(results_uri), "scored_at": scored_at,
        "versions": versions, "generated": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "summary": _summary_rows(frame, ok, errors, focus_stats, options.low_focus),
        "class_counts": [(c, int(counts.get(c, 0))) for c in classes],
        "metrics": metrics, "per_class": [], "confusion": None, "roc": None,
        "calibration": None, "subgroups": None,
        "gallery": cards(chosen["gallery"]), "flagged": cards(chosen["flagged"]),
        "low_count": len(chosen["low"]), "low_focus": options.low_focus,
        "errors": [(str(r["image_id"]), str(r.get("source_uri", "")), str(r.get("error", "")))
                   for _, r in errors.iterrows()],
        "ood": None if "ood" not in ok.columns else {
            "count": len(ood_rows), "cards": cards(chosen["ood_shown"]),
            "rows": [(str(r["image_id"]), float(r["ood_score"]), str(r.get("source_uri", "")))
                     for _, r in ood_rows.iterrows()]},
        "robustness": (_robustness(options.robustness_dir)
                       if options.robustness_dir is not None else None),
    }
    if metrics is not None:
        _metric_sections(page_data, metrics, ok, labels)
    page = _environment().get_template("report.html.j2").render(page_data)
    storage.write_bytes(out_uri, page.encode("utf-8"))
    return {"images": len(frame), "errors": len(errors), "gallery": len(chosen["gallery"]),
            "flagged": len(chosen["flagged"]) + len(errors), "ood": len(ood_rows),
            "bytes": len(page)}
