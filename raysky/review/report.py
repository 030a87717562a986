"""``raysky report``: one self-contained HTML page for reviewing a scored archive.

Everything the page shows is inside the file: thumbnails and overlays are JPEG ``data:`` URIs,
plots are inline SVG drawn here, and the style sheet is inline, so the page can be mailed,
archived next to the results, or opened on a machine without network access. The page has no
scripts.

Sections: a summary of the run; with ground truth, the ISIC metrics, the confusion matrix and
ROC curves; a gallery of the ``top_n`` lesions with the highest ``malignant_prob`` (image with
the predicted mask's outline, Grad-CAM overlay, class probabilities, lesion focus); the
reliability diagram of the calibration (with ground truth); and the images flagged for review
(lesion focus below a threshold, out of distribution, and rows that failed to score).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from PIL import Image

from raysky import storage
from raysky.audit.plots import robustness_section, subgroup_section
from raysky.calibration.plots import reliability_section
from raysky.data.images import ImageDecodeError, decode_mask
from raysky.data.readers import metadata_frame
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.review.evaluate import (
    LOW_FOCUS_THRESHOLD,
    PROB_PREFIX,
    checkpoint_calibration_for,
    class_probabilities,
    evaluate_frame,
    focus_statistics,
    read_ground_truth,
    read_results,
    result_classes,
    results_columns,
)
from raysky.review.metrics import binary_metrics, roc_points
from raysky.review.pictures import (
    data_uri,
    decode_heatmap,
    lesion_pictures,
    load_picture,
    roc_svg,
)

_LIGHT_COLUMNS = ("image_id", "source_uri", "status", "error", "width", "height",
                  "predicted_class", "malignant_prob", "lesion_area_frac", "lesion_focus",
                  "segmenter_version", "classifier_version", "refer", "ood_score", "ood",
                  "calibration_version", "scored_at")


def confusion_table(confusion: dict) -> str:
    """The confusion matrix as an HTML table shaded by each row's share."""
    classes, matrix, tied = confusion["classes"], confusion["matrix"], confusion["undecided"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for code, counts, ties in zip(classes, matrix, tied, strict=True):
        total = max(1, sum(counts) + ties)
        cells = []
        for j, n in enumerate(counts):
            share = n / total
            color = "0,114,178" if classes[j] == code else "213,94,0"
            text_color = "#fff" if share > 0.6 else "#222"
            cells.append(f'<td style="background:rgba({color},{share:.2f});color:{text_color}">'
                         f"{n}</td>")
        rows.append(f"<tr><th>{html.escape(code)}</th>{''.join(cells)}<td>{ties}</td></tr>")
    return (f'<table class="cm"><tr><th>truth \\ predicted</th>{head}<th>tied</th></tr>'
            f"{''.join(rows)}</table>")


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;
color:#222}
header{background:#1f2937;color:#fff;padding:16px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cbd5e1;font-size:13px}
main{padding:8px 28px 40px}section{margin-top:22px}h2{font-size:18px;margin:0 0 10px}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:14px}
.stat{background:#fff;border-radius:8px;padding:10px 14px;min-width:120px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.stat b{display:block;font-size:20px}.stat span{font-size:12px;color:#555}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f0f2f5}
td.l,th.l{text-align:left}.cm td{min-width:38px;text-align:center}
.plots{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card h3{font-size:14px;margin:0 0 6px}.pics{display:flex;gap:6px}
.pics figure{margin:0;font-size:11px;color:#555;text-align:center}
.pics img{display:block;max-width:240px;border-radius:4px}
.probs{font-size:12px;margin-top:6px}.bar{display:flex;align-items:center;gap:6px}
.bar i{display:inline-block;height:9px;background:#0072B2;border-radius:2px}
.bar.mal i{background:#D55E00}.bar span{width:48px}
.tag{display:inline-block;border-radius:10px;padding:1px 8px;font-size:11px;margin-left:4px}
.low{background:#fde2cf;color:#8a3b00}.okf{background:#d9f2e3;color:#0d5c33}
.wrong{background:#fbd5d5;color:#8b1010}.right{background:#d9f2e3;color:#0d5c33}
.note{font-size:12px;color:#555}
tr.flagged th,tr.flagged td{background:#fde2cf;color:#8a3b00}tr.few td,tr.few th,.muted{color:#999}
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _stat(value: str, label: str) -> str:
    return f'<div class="stat"><b>{value}</b><span>{html.escape(label)}</span></div>'


def _card(row: pd.Series, classes: Sequence[str], pictures: tuple, low_focus: float,
          label: str | None) -> str:
    outlined, overlay = pictures
    figures = []
    if outlined is not None:
        figures.append(f'<figure><img src="{data_uri(outlined)}" alt="image with lesion outline">'
                       f"image + mask outline</figure>")
    if overlay is not None:
        figures.append(f'<figure><img src="{data_uri(overlay)}" alt="Grad-CAM overlay">'
                       f"Grad-CAM overlay</figure>")
    probs = sorted(((c, float(row[f"{PROB_PREFIX}{c}"])) for c in classes),
                   key=lambda item: -item[1])
    bars = "".join(
        f'<div class="bar{" mal" if c in MALIGNANT_CLASSES else ""}"><span>{html.escape(c)}'
        f'</span><i style="width:{max(1, round(160 * p))}px"></i>{p:.3f}</div>'
        for c, p in probs[:4])
    focus = float(row.get("lesion_focus", math.nan))
    focus_tag = ("" if math.isnan(focus) else
                 f'<span class="tag {"low" if focus < low_focus else "okf"}">focus {focus:.2f}'
                 f"</span>")
    truth = ""
    if label is not None:
        right = label == row["predicted_class"]
        truth = (f'<span class="tag {"right" if right else "wrong"}">truth '
                 f"{html.escape(label)}</span>")
    return (f'<div class="card"><h3>{html.escape(str(row["image_id"]))} '
            f'<span class="tag wrong">malignant {float(row["malignant_prob"]):.3f}</span>'
            f"{focus_tag}{truth}</h3><div class=\"pics\">{''.join(figures)}</div>"
            f'<div class="probs">predicted <b>{html.escape(str(row["predicted_class"]))}</b>'
            f"{bars}</div></div>")


def _metrics_section(metrics: dict) -> str:
    parts = ['<section id="metrics"><h2>Metrics against ground truth</h2>']
    cov = metrics["coverage"]
    parts.append(f'<p class="note">{cov["matched"]} of {cov["results"]} results matched '
                 f'ground truth ({cov["ground_truth"]} images); {cov["scoring_errors"]} of the '
                 f"matched failed to score and are left out.</p>")
    stats = []
    seg, cls = metrics.get("segmentation"), metrics.get("classification")
    if cls:
        stats += [_stat(_fmt(cls[k]), k) for k in ("balanced_accuracy", "auc", "auc_sens_80",
                                                    "ap", "sensitivity", "specificity")]
    if seg:
        stats += [_stat(_fmt(seg[k]), k) for k in ("dice", "jaccard", "threshold_jaccard")]
    parts.append(f'<div class="stats">{"".join(stats)}</div>')
    if cls:
        keys = ("support", "auc", "auc_sens_80", "ap", "sensitivity", "specificity", "recall")
        head = "".join(f"<th>{k}</th>" for k in keys)
        rows = [*cls["per_class"].items()]
        if "malignant" in cls:
            rows.append(("malignant vs benign", {**cls["malignant"], "recall": None}))
        body = "".join(f'<tr><th class="l">{html.escape(code)}</th>'
                       + "".join(f"<td>{_fmt(values.get(k))}</td>" for k in keys) + "</tr>"
                       for code, values in rows)
        parts.append(f'<div class="plots"><div><h2>Per class</h2><table><tr><th class="l">class'
                     f"</th>{head}</tr>{body}</table></div><div><h2>Confusion matrix</h2>"
                     f"{confusion_table(cls['confusion_matrix'])}</div></div>")
    parts.append("</section>")
    return "".join(parts)


def _ood_section(rows: pd.DataFrame, shown: pd.DataFrame, cards, scored: bool) -> str:
    """Images whose ``ood`` flag is set: advice that they may not be dermoscopy at all."""
    if not scored:
        return ('<section id="ood"><h2>Out of distribution</h2><p class="note">These results '
                "have no ood column (scored before raysky had one).</p></section>")
    table = "".join(f'<tr><td class="l">{html.escape(str(r["image_id"]))}</td>'
                    f'<td>{_fmt(float(r["ood_score"]))}</td><td class="l">'
                    f'{html.escape(str(r.get("source_uri", "")))}</td></tr>'
                    for _, r in rows.iterrows())
    listing = (f'<table><tr><th class="l">image</th><th>ood_score</th><th class="l">source</th>'
               f"</tr>{table}</table>" if len(rows) else
               '<p class="note">None (a classifier without calibration flags nothing).</p>')
    return (f'<section id="ood"><h2>Out of distribution ({len(rows)}'
            + (f", {len(shown)} shown" if len(shown) < len(rows) else "")
            + ')</h2><p class="note">ood_score above the calibration threshold: the image is '
            "unlike the dermoscopy the model was calibrated on (a clinical photo, a screenshot, "
            "a scan). Its predictions are kept but deserve less trust.</p>"
            f'{listing}<div class="gallery">{cards(shown)}</div></section>')


def _robustness(folder: str) -> str:
    """The robustness section from ``<folder>/robustness.json`` and its example strips."""
    from raysky.audit.robustness import OUTPUT_FILE

    path = os.path.join(folder, OUTPUT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--robustness {folder}: no {OUTPUT_FILE} (the --out of a "
                                "raysky robustness run)")
    with open(path) as handle:
        report = json.load(handle)
    strips = {}
    for kind, strip in report.get("examples", {}).items():
        if strip and os.path.exists(strip):
            strips[kind] = data_uri(np.asarray(Image.open(strip).convert("RGB")))
    return robustness_section(report, strips)


def _roc_section(labelled: pd.DataFrame, classes: Sequence[str]) -> str:
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
    if not curves:
        return ""
    return (f'<section id="roc"><h2>ROC curves (one class against the rest)</h2>'
            f"{roc_svg(curves)}</section>")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


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


def build_report(results_uri: str, out_uri: str, data_uri: str | None = None,
                 format: str | None = None, metadata_uri: str | None = None,
                 split: str | None = None, top_n: int = 24, max_flagged: int = 48,
                 low_focus: float = LOW_FOCUS_THRESHOLD, title: str = "raysky review",
                 classifier_uri: str | None = None, by: Sequence[str] = (),
                 robustness_dir: str | None = None) -> dict:
    """Write the HTML review page for ``results_uri`` to ``out_uri`` (local or ``s3://``).

    With ``data_uri`` and ``format`` the page adds ISIC metrics, a confusion matrix and ROC
    curves (see :func:`raysky.review.evaluate.evaluate_frame`) and the reliability diagram, before and
    after calibration when ``classifier_uri`` names the checkpoint scored with, and the subgroup
    audit (by sex, age band, site, skin tone and the ``by`` metadata columns) with its forest
    plot. ``robustness_dir``, the ``--out`` of a ``raysky robustness`` run, adds its table and
    one example strip per artefact type. Only the rows shown in the gallery and
    the flagged list have their masks and heatmaps read, so the page builds quickly from large
    results. Returns counts of what the page shows.
    """
    names = results_columns(results_uri)
    light = [name for name in names if name in _LIGHT_COLUMNS]
    frame = read_results(results_uri, light)
    classes = result_classes(frame)
    ok = frame[frame["status"] == "ok"]
    errors = frame[frame["status"] != "ok"]

    metrics, labels = None, {}
    if data_uri is not None:
        records = read_ground_truth(data_uri, format, metadata_uri, split)
        with_masks = read_results(results_uri, [n for n in names if n != "heatmap_png"])
        calibration = (checkpoint_calibration_for(with_masks, classifier_uri)
                       if classifier_uri else None)
        metadata = metadata_frame(data_uri, format, metadata_uri) if by else None
        metrics = evaluate_frame(with_masks, records, low_focus, calibration, by, metadata)
        labels = {r.image_id: r.label for r in records if r.label is not None}

    gallery = ok.sort_values("malignant_prob", ascending=False, kind="stable").head(top_n)
    focus = ok["lesion_focus"] if "lesion_focus" in ok.columns else pd.Series(dtype=float)
    low = ok[focus < low_focus].sort_values("lesion_focus", kind="stable")
    flagged = low.head(max_flagged)
    ood_rows = (ok[ok["ood"].fillna(False).astype(bool)].sort_values("ood_score", ascending=False,
                                                                     kind="stable")
                if "ood" in ok.columns else ok.iloc[:0])
    ood_shown = ood_rows.head(max_flagged)
    shown = pd.concat([gallery, flagged, ood_shown]).drop_duplicates("image_id")
    binary_columns = [n for n in ("mask_png", "heatmap_png") if n in names]
    binaries = (read_results(results_uri, ["image_id", *binary_columns],
                             image_ids=shown["image_id"].tolist())
                if len(shown) else pd.DataFrame({"image_id": []}))
    pictures = _pictures_for(shown, binaries) if len(shown) else {}

    def cards(rows: pd.DataFrame) -> str:
        return "".join(_card(row, classes, pictures[row["image_id"]], low_focus,
                             labels.get(row["image_id"])) for _, row in rows.iterrows())

    focus_stats = focus_statistics(focus.to_numpy(dtype=np.float64), low_threshold=low_focus)
    versions = sorted({f"{s} / {c}" for s, c in zip(ok.get("segmenter_version", []),
                                                     ok.get("classifier_version", []),
                                                     strict=True)})
    counts = ok["predicted_class"].value_counts() if len(ok) else pd.Series(dtype=int)
    summary_stats = [
        _stat(str(len(frame)), "images"), _stat(str(len(ok)), "scored"),
        _stat(str(len(errors)), "scoring errors"),
        _stat(_fmt(float(ok["malignant_prob"].mean()) if len(ok) else math.nan),
              "mean malignant probability"),
        _stat(str(int((ok["malignant_prob"] >= 0.5).sum())), "malignant probability >= 0.5"),
        _stat(_fmt(focus_stats["median"]), "median lesion focus"),
        _stat(str(focus_stats["low_focus"]), f"lesion focus < {low_focus:g}"),
    ]
    class_table = "".join(f'<tr><th class="l">{html.escape(c)}</th><td>{int(counts.get(c, 0))}'
                          f"</td></tr>" for c in classes)
    scored_at = ""
    if "scored_at" in ok.columns and ok["scored_at"].notna().any():
        first, last = (f"{t:%Y-%m-%d %H:%M}" for t in (ok["scored_at"].min(), ok["scored_at"].max()))
        scored_at = f"scored {first}" + (f" to {last}" if last != first else "") + "; "

    body = [
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(results_uri))}; "
        f"{html.escape(scored_at)}models {html.escape(', '.join(versions) or '-')}; generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p></header><main>",
        f'<section id="summary"><h2>Summary</h2><div class="stats">{"".join(summary_stats)}'
        f'</div><p class="note">Lesion focus is the share of the Grad-CAM heatmap on the '
        f"predicted lesion mask; a low value means the classifier's evidence lies mostly "
        f"outside the lesion.</p><table><tr><th class=\"l\">predicted class</th><th>images</th>"
        f"</tr>{class_table}</table></section>",
    ]
    if metrics is not None:
        body.append(_metrics_section(metrics))
        body.append(reliability_section(metrics.get("calibration")))
        body.append(subgroup_section(metrics.get("subgroups")))
        matched = ok[ok["image_id"].isin(labels)].copy()
        if len(matched) and "classification" in metrics:
            matched["label"] = matched["image_id"].map(labels)
            body.append(_roc_section(matched, metrics["classification"]["classes"]))
    body.append(f'<section id="gallery"><h2>Highest-risk lesions (top {len(gallery)} by '
                f'malignant probability)</h2><div class="gallery">{cards(gallery)}</div>'
                f"</section>")
    body.append(f'<section id="flagged"><h2>Flagged for review</h2><h2>Low lesion focus '
                f"({len(low)} below {low_focus:g}"
                + (f", {len(flagged)} shown" if len(flagged) < len(low) else "")
                + f')</h2><div class="gallery">{cards(flagged)}</div>')
    error_rows = "".join(
        f'<tr><td class="l">{html.escape(str(r["image_id"]))}</td><td class="l">'
        f'{html.escape(str(r.get("source_uri", "")))}</td><td class="l">'
        f'{html.escape(str(r.get("error", "")))}</td></tr>' for _, r in errors.iterrows())
    body.append(f"<h2>Scoring errors ({len(errors)})</h2>"
                + (f'<table><tr><th class="l">image</th><th class="l">source</th>'
                   f'<th class="l">error</th></tr>{error_rows}</table>' if len(errors) else
                   '<p class="note">None.</p>')
                + "</section>")
    body.append(_ood_section(ood_rows, ood_shown, cards, "ood" in ok.columns))
    if robustness_dir is not None:
        body.append(_robustness(robustness_dir))
    body.append("</main>")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"{''.join(body)}</body></html>")
    storage.write_bytes(out_uri, page.encode("utf-8"))
    return {"images": len(frame), "errors": len(errors), "gallery": len(gallery),
            "flagged": len(flagged) + len(errors), "ood": len(ood_rows), "bytes": len(page)}
