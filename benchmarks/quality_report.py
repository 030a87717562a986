"""The analysis half of ``benchmarks/quality.py``: figures with lesion-resampled intervals from
what ``quality.py run`` wrote (``runs.json`` and the results folders).

Every interval is a seeded bootstrap over val lesions (all images of a drawn lesion come along).
Balanced accuracy is reported for the argmax decision and for the balanced decision rule
(per-class logit offsets, :func:`raysky.calibration.decision.fit_decision_rule`, what
``raysky calibrate`` fits) cross-fitted:
the val lesions are cut into two halves, each half's offsets are fitted on the other, so no
image is decided by offsets fitted on it.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from raysky.data.images import load_mask
from raysky.data.records import DatasetRef
from raysky.data.splits import read_split
from raysky.metrics.intervals import bootstrap_intervals
from raysky.metrics.isic import (
    balanced_accuracy,
    jaccard_score,
    macro_auc,
    per_class_auc,
    thresholded_jaccard,
)
from raysky.results import read as read_results

TRAIN_COUNTS = {"mel": 843, "nv": 5186, "bcc": 377, "akiec": 217, "bkl": 832, "df": 59, "vasc": 84}
"""Images per class of the shared split's train side, the prior the checkpoints record."""

KEYS = ("balanced_accuracy", "balanced_accuracy_offsets", "auc", "threshold_jaccard")
SIZE_VIEWS = ("frame200_at176", "frame200_at192", "no_metadata_at192", "frame600_at192",
              "crop224_at192")
"""The views that run a classifier at a larger side than it trained at (FixRes); each is
paired against the view before its ``_at`` suffix, scored at the trained side."""
EXTRA_VIEWS = ("no_metadata", "frame600", "crop224", "frame200_tta", *SIZE_VIEWS)
"""The scored views compared with the 200x150 frames with metadata, where a run has them."""
PAIRED_VIEWS = {"frame200_tta": "frame200", **{v: v.rsplit("_at", 1)[0] for v in SIZE_VIEWS}}
"""Views that score the same images as another view with the same weights, differently:
test-time augmentation, or a larger side. Each is paired against that view."""


def _ground_truth(data: str, format: str) -> pd.DataFrame:
    records = read_split(DatasetRef(data, format, split="val"))
    return pd.DataFrame({"image_id": [r.image_id for r in records],
                         "label": [r.label for r in records],
                         "lesion_id": [r.lesion_id or r.image_id for r in records],
                         "mask_uri": [r.mask_uri for r in records]})


def _joined(results_uri: str, truth: pd.DataFrame, classes: list[str],
            columns: tuple[str, ...] = ()) -> pd.DataFrame:
    frame = read_results(results_uri)
    frame = frame[frame["status"] == "ok"]
    keep = ["image_id", *[f"prob_{c}" for c in classes], *columns]
    joined = frame[keep].merge(truth, on="image_id", how="inner", validate="one_to_one")
    if len(joined) != len(truth):
        raise ValueError(f"{results_uri}: {len(joined)} of {len(truth)} val images scored")
    return joined


def _probs(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64)


def _halves(lesions: pd.Series) -> np.ndarray:
    """A fixed, lesion-disjoint half of val (by a hash of the lesion id)."""
    return np.array([zlib.crc32(str(x).encode()) % 2 for x in lesions], dtype=np.int64)


def cross_fitted_predictions(probs: np.ndarray, labels: np.ndarray, halves: np.ndarray,
                             lesions: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices from ``log p + offsets``, each half decided by the offsets that
    ``raysky calibrate``'s rule fits on the other half (with the training split's prior)."""
    from raysky.calibration.decision import decide, fit_decision_rule, offsets_vector

    scaled = np.log(np.clip(probs, 1e-12, None))
    predicted = np.empty(len(labels), dtype=np.int64)
    for half in (0, 1):
        fit, apply = halves != half, halves == half
        offsets, _rule = fit_decision_rule(scaled[fit], labels[fit], classes,
                                           groups=lesions[fit], training_counts=TRAIN_COUNTS)
        predicted[apply] = decide(scaled[apply], offsets_vector(offsets, classes))
    return predicted


def _one_hot(predicted: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[predicted]


def _image_jaccard(results_uri: str, truth: pd.DataFrame) -> pd.Series:
    frame = read_results(results_uri, columns=["image_id", "status", "mask_png"])
    frame = frame[frame["status"] == "ok"].merge(truth, on="image_id")
    values = {}
    for row in frame.itertuples():
        predicted = np.asarray(Image.open(io.BytesIO(row.mask_png))) > 0
        values[row.image_id] = jaccard_score(predicted, load_mask(row.mask_uri) > 0)
    return pd.Series(values)


def auc_per_class(labels: np.ndarray, probs: np.ndarray, lesions: np.ndarray,
                  classes: list[str]) -> dict[str, dict]:
    """Each class's one-vs-rest AUC with its lesion-resampled interval and how many val
    lesions and images carry it: a class with a handful of lesions moves the macro AUC by
    a seventh of whatever one of them does."""
    last: dict = {}

    def class_auc(y: np.ndarray, p: np.ndarray, i: int) -> float:
        # Every class's metric sees the same resample in turn: compute its AUCs once.
        if last.get("y") is not y or last.get("p") is not p:
            last.update(y=y, p=p, aucs=per_class_auc(y, p))
        return last["aucs"][i]

    metrics = {c: (lambda y, p, i=i: class_auc(y, p, i)) for i, c in enumerate(classes)}
    figures = bootstrap_intervals(metrics, labels, probs, clusters=lesions)
    for i, c in enumerate(classes):
        figures[c]["lesions"] = int(len(np.unique(lesions[labels == i])))
        figures[c]["images"] = int(np.sum(labels == i))
    return figures


def most_influential_lesion(labels: np.ndarray, probs: np.ndarray, lesions: np.ndarray,
                            classes: list[str]) -> dict:
    """The val lesion whose images, left out, move the macro AUC most, and the AUC without it:
    how much of a miss one lesion of a rare class explains."""
    full = macro_auc(labels, probs)
    best = {"lesion": None, "macro_auc_without": full, "change": 0.0}
    for lesion in np.unique(lesions):
        keep = lesions != lesion
        without = macro_auc(labels[keep], probs[keep])
        if abs(without - full) > abs(best["change"]):
            cls = classes[int(labels[~keep][0])]
            best = {"lesion": str(lesion), "class": cls, "images": int(np.sum(~keep)),
                    "macro_auc_without": without, "change": without - full}
    return best


def run_figures(record: dict, truth: pd.DataFrame, classes: list[str]) -> dict:
    """One classifier run's figures, each with its interval."""
    index = {c: i for i, c in enumerate(classes)}
    main = _joined(record["results"]["frame200"], truth, classes, ("lesion_focus",))
    labels = main["label"].map(index).to_numpy()
    probs = _probs(main, classes)
    halves = _halves(main["lesion_id"])
    offset_pred = _one_hot(cross_fitted_predictions(
        probs, labels, halves, main["lesion_id"].to_numpy(), classes), len(classes))
    jaccard = _image_jaccard(record["results"]["frame200"], truth).reindex(main["image_id"])
    thresholded = np.array([thresholded_jaccard(j) for j in jaccard.to_numpy()])
    figures = bootstrap_intervals(
        {"balanced_accuracy": lambda y, p, _o, _j: balanced_accuracy(y, p),
         "balanced_accuracy_offsets": lambda y, _p, o, _j: balanced_accuracy(y, o),
         "auc": lambda y, p, _o, _j: macro_auc(y, p),
         "threshold_jaccard": lambda _y, _p, _o, j: float(np.mean(j))},
        labels, probs, offset_pred, thresholded, clusters=main["lesion_id"].to_numpy())
    figures["lesion_focus_median"] = float(np.nanmedian(main["lesion_focus"].to_numpy(np.float64)))
    figures["recall"] = {c: float(np.mean(np.argmax(probs[labels == i], 1) == i))
                         for c, i in index.items()}
    lesions = main["lesion_id"].to_numpy()
    figures["auc_per_class"] = auc_per_class(labels, probs, lesions, classes)
    figures["auc_most_influential_lesion"] = most_influential_lesion(labels, probs, lesions,
                                                                     classes)
    for view in EXTRA_VIEWS:
        if view not in record["results"]:
            continue
        other = _joined(record["results"][view], truth, classes)
        other_probs = _probs(other.set_index("image_id").loc[main["image_id"]], classes)
        decided = _one_hot(cross_fitted_predictions(other_probs, labels, halves, lesions, classes),
                           len(classes))
        view_figures = bootstrap_intervals(
            {"argmax": lambda y, p, _o: balanced_accuracy(y, p),
             "offsets": lambda y, _p, o: balanced_accuracy(y, o),
             "auc": lambda y, p, _o: macro_auc(y, p)},
            labels, other_probs, decided, clusters=lesions)
        figures[f"balanced_accuracy_{view}"] = view_figures["argmax"]
        figures[f"balanced_accuracy_offsets_{view}"] = view_figures["offsets"]
        figures[f"auc_{view}"] = view_figures["auc"]
    return figures


def paired_difference(a: dict, b: dict, truth: pd.DataFrame, classes: list[str],
                      view_a: str = "frame200", view_b: str = "frame200") -> dict:
    """Balanced accuracy (argmax, and with each side's cross-fitted decision offsets) and
    macro AUC of run ``a``'s ``view_a`` minus run ``b``'s ``view_b`` on the same val images,
    with paired lesion bootstrap intervals."""
    index = {c: i for i, c in enumerate(classes)}
    first = _joined(a["results"][view_a], truth, classes)
    second = _joined(b["results"][view_b], truth, classes).set_index("image_id")
    second = second.loc[first["image_id"]]
    labels = first["label"].map(index).to_numpy()
    lesions = first["lesion_id"].to_numpy()
    halves = _halves(first["lesion_id"])
    p, q = _probs(first, classes), _probs(second, classes)
    decided_p, decided_q = (_one_hot(cross_fitted_predictions(x, labels, halves, lesions, classes),
                                     len(classes)) for x in (p, q))
    return bootstrap_intervals(
        {"argmax": lambda y, p, q, _dp, _dq: balanced_accuracy(y, p) - balanced_accuracy(y, q),
         "offsets": lambda y, _p, _q, dp, dq: balanced_accuracy(y, dp) - balanced_accuracy(y, dq),
         "auc": lambda y, p, q, _dp, _dq: macro_auc(y, p) - macro_auc(y, q)},
        labels, p, q, decided_p, decided_q, clusters=lesions)


def _fmt(value: dict | float | None) -> str:
    if isinstance(value, dict):
        if value.get("value") is None or math.isnan(value["value"]):
            return "n/a"
        if value.get("low") is None:
            return f"{value['value']:.3f}"
        return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    return "n/a" if value is None else f"{value:.3f}"


def _mean(values: list[dict | float]) -> float:
    numbers = [v["value"] if isinstance(v, dict) else v for v in values]
    return float(np.mean(numbers))


def _print_run(key: str, figures: dict) -> None:
    print(f"{key}: " + ", ".join(f"{k} {_fmt(figures[k])}" for k in KEYS), flush=True)
    print("  AUC per class: " + ", ".join(f"{c} {_fmt(v)} ({v['lesions']} lesions)"
                                          for c, v in figures["auc_per_class"].items()))
    lesion = figures["auc_most_influential_lesion"]
    if lesion["lesion"]:
        print(f"  without lesion {lesion['lesion']} ({lesion['class']}, {lesion['images']} "
              f"images) the macro AUC is {lesion['macro_auc_without']:.3f} "
              f"({lesion['change']:+.3f})", flush=True)


def report(args) -> int:
    """Print the per-arm tables and write ``<out>/figures.json``."""
    out = Path(args.out).resolve()
    runs = json.loads((out / "runs.json").read_text())
    truth = _ground_truth(args.data, args.format)
    classes = sorted(truth["label"].unique())
    from raysky.data.taxonomy import order_classes

    classes = list(order_classes(classes))
    figures: dict[str, dict] = {}
    for key, record in sorted(runs.items()):
        if key.startswith("cls-") and record.get("arm") in args.arms:
            figures[key] = {"arm": record["arm"], "seed": record["seed"],
                            "epochs": record["epochs"], "train_min": record["wall_s"] / 60,
                            "segmenter_train_min": runs[record["segmenter"]]["wall_s"] / 60,
                            **run_figures(record, truth, classes)}
            _print_run(key, figures[key])
    rows = ["balanced_accuracy", "balanced_accuracy_offsets", "auc", "threshold_jaccard",
            *(f"{kind}_{view}" for view in EXTRA_VIEWS
              for kind in ("balanced_accuracy", "balanced_accuracy_offsets", "auc")),
            "lesion_focus_median", "train_min"]
    print("\nmean over seeds, per arm:")
    summary: dict[str, dict] = {}
    for arm in args.arms:
        mine = [f for f in figures.values() if f["arm"] == arm]
        if not mine:
            continue
        summary[arm] = {r: _mean([f[r] for f in mine]) for r in rows if all(r in f for f in mine)}
        summary[arm]["seeds"] = sorted(f["seed"] for f in mine)
        print(f"  {arm} (seeds {summary[arm]['seeds']}):")
        for r in rows:
            if r in summary[arm]:
                print(f"    {r:<42} {summary[arm][r]:.3f}")
    differences = {}
    base = "shared"
    for arm in args.arms:
        if arm == base:
            continue
        pairs = [(runs[f"cls-{arm}-s{s}"], runs[f"cls-{base}-s{s}"]) for s in
                 sorted({f["seed"] for f in figures.values()})
                 if f"cls-{arm}-s{s}" in runs and f"cls-{base}-s{s}" in runs]
        diffs = [paired_difference(a, b, truth, classes) for a, b in pairs]
        for decision in ("argmax", "offsets") if diffs else ():
            per_seed = [d[decision] for d in diffs]
            differences[f"{arm} - {base} ({decision})"] = {"per_seed": per_seed,
                                                           "mean": _mean(per_seed)}
            print(f"balanced accuracy {arm} - {base} ({decision}): mean {_mean(per_seed):+.3f}; "
                  "per seed " + "; ".join(_fmt(d) for d in per_seed))
    differences.update(_view_differences(runs, figures, args.arms, truth, classes))
    (out / "figures.json").write_text(json.dumps(
        {"runs": figures, "summary": summary, "differences": differences,
         "targets": {"balanced_accuracy": 0.72, "auc": 0.94, "threshold_jaccard": 0.80,
                     "training_minutes": 60}}, indent=2, default=float))
    return 0



def _view_differences(runs: dict, figures: dict, arms: list[str], truth: pd.DataFrame,
                      classes: list[str]) -> dict:
    """Per arm and view of :data:`PAIRED_VIEWS`: that view minus its base view, the same
    weights on the same images, paired per seed (balanced accuracy both ways, macro AUC)."""
    differences = {}
    for arm in arms:
        for view, base in PAIRED_VIEWS.items():
            keys = [k for k, f in figures.items()
                    if f["arm"] == arm and {view, base} <= runs[k]["results"].keys()]
            diffs = [paired_difference(runs[k], runs[k], truth, classes, view_a=view,
                                       view_b=base) for k in keys]
            for figure in ("argmax", "offsets", "auc") if diffs else ():
                per_seed = [d[figure] for d in diffs]
                differences[f"{arm}: {view} - {base} ({figure})"] = {
                    "per_seed": per_seed, "mean": _mean(per_seed)}
                print(f"{arm} {view} minus {base}, same weights and images ({figure}): mean "
                      f"{_mean(per_seed):+.3f}; per seed " + "; ".join(_fmt(d) for d in per_seed))
    return differences
