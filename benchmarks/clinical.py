"""Clinical benchmark: calibration, referral, out-of-distribution flag and artefact robustness.

    python benchmarks/quality.py  --data ../shared/data/ham10000 --seg-epochs 2 --cls-epochs 3
    python benchmarks/clinical.py --data ../shared/data/ham10000 --run runs/quality

It reuses the models that ``benchmarks/quality.py`` trained under ``--run`` (the segmenter,
the dual-stream classifier and the single-stream ablation) and goes through the product's own
commands only: ``raysky calibrate``, ``raysky score``, ``raysky evaluate`` and ``raysky
robustness``.

* **Calibration and referral, cross-fitted.** The val split is cut into two lesion-disjoint
  halves. Each half calibrates (temperature, decision offsets, referral threshold at 95%
  malignant sensitivity, OOD statistics) and the other half is evaluated with that
  calibration, so no figure is measured on the images it was fitted to. The in-sample figures
  (calibrated and evaluated on the whole val split, what training-end calibration does) are
  printed beside them.
* **Decision offsets.** On each held-out half, balanced accuracy before the offsets (the
  argmax of the calibrated probabilities, ``prob_*``) and after (``predicted_class``), with
  lesion-resampled bootstrap intervals of each and of the paired difference, and the decision
  rule the calibrating half chose.
* **Out of distribution.** The non-dermoscopy set of :mod:`raysky.calibration.nondermoscopy`
  (photos and scans bundled with scikit-image, scikit-learn and matplotlib, plus synthetic text
  pages, screenshots, charts and clinical skin photos) is scored next to the held-out half;
  the figure is the AUROC of ``ood_score`` between the two, overall and per kind, for the
  gate (the default), the Mahalanobis score and the energy score, with the share of each group
  flagged and of each class of held-out dermoscopy.
* **Artefacts.** ``raysky robustness`` on the val split for both classifiers: per artefact
  type the flip rate, the change of macro AUPRC and malignant AUC, and artefact attention.

Figures land in ``<run>/clinical/figures.json``; the baselines are in the same run (the
uncalibrated probabilities for ECE, the energy score for OOD, the clean images for
robustness).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky import results  # noqa: E402
from raysky.cli.main import main as raysky  # noqa: E402


def run(*argv: str) -> None:
    """One raysky command; a failure stops the benchmark."""
    print("+ raysky " + " ".join(argv), flush=True)
    started = time.monotonic()
    code = raysky(list(argv))
    if code:
        raise SystemExit(f"raysky {argv[0]} failed with exit code {code}")
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)


def lesion_halves(data: str, out: Path, seed: int = 0) -> list[tuple[Path, set[str]]]:
    """Two data roots of links to ``data`` whose ``splits.csv`` calibrates on one lesion-disjoint
    half of the val split (``val``) and evaluates on the other (``test``); returns each root
    with the image ids it evaluates."""
    splits = pd.read_csv(os.path.join(data, "splits.csv"))
    meta = pd.read_csv(os.path.join(data, "HAM10000_metadata.csv"))
    val = meta[meta.image_id.isin(splits.loc[splits.split == "val", "image_id"])]
    lesions = np.array(sorted(val.lesion_id.unique()))
    first = set(np.random.default_rng(seed).permutation(lesions)[: len(lesions) // 2])
    halves = (val.loc[val.lesion_id.isin(first), "image_id"],
              val.loc[~val.lesion_id.isin(first), "image_id"])
    roots = []
    for i, (calibrate_on, evaluate_on) in enumerate((halves, halves[::-1]), start=1):
        root = out / f"half{i}"
        root.mkdir(parents=True, exist_ok=True)
        for entry in ("images", "masks", "HAM10000_metadata.csv"):
            if not (root / entry).exists():
                (root / entry).symlink_to(os.path.abspath(os.path.join(data, entry)))
        pd.concat([pd.DataFrame({"image_id": calibrate_on, "split": "val"}),
                   pd.DataFrame({"image_id": evaluate_on, "split": "test"})]).to_csv(
            root / "splits.csv", index=False)
        roots.append((root, set(evaluate_on)))
    return roots


def photo_folder(out: Path, per_kind: int = 10) -> Path:
    """The non-dermoscopy set (bundled photos and scans, ``per_kind`` synthetic images of each
    kind) as PNGs in an archive folder, named ``<kind>_<name>``."""
    from PIL import Image

    from raysky.calibration.nondermoscopy import bundled_photos, synthetic_images

    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in bundled_photos() + synthetic_images(per_kind=per_kind, seed=1):
        kind, _, rest = name.partition(":")
        Image.fromarray(image).save(folder / f"{kind}_{rest.rsplit('.', 1)[0]}.png")
    return folder


def _held_rows(frame: pd.DataFrame, held: set[str]) -> pd.DataFrame:
    ids = frame.image_id.str.replace(r"\.jpg$", "", regex=True)
    return frame[(frame.status == "ok") & ids.isin(held)].assign(image_id=ids)


def ood_figures(val_results: str, photo_results: str, held: set[str],
                labels: dict[str, str] | None = None) -> dict:
    """AUROC of ``ood_score`` (non-dermoscopy positive, held-out dermoscopy negative), overall
    and per kind of non-dermoscopy, and the shares flagged (per class of dermoscopy too)."""
    from sklearn.metrics import roc_auc_score

    val = _held_rows(results.read(val_results), held)
    photos = results.read(photo_results)
    photos = photos[photos.status == "ok"]
    kinds = photos.image_id.str.split("_").str[0].to_numpy()
    inside, outside = val.ood_score.to_numpy(float), photos.ood_score.to_numpy(float)
    scores = np.r_[inside, outside]
    truth = np.r_[np.zeros(len(val)), np.ones(len(photos))]
    figures = {"dermoscopy": len(val), "photos": len(photos),
               "auroc": float(roc_auc_score(truth, scores)),
               "dermoscopy_flagged": float(val.ood.astype(bool).mean()),
               "photos_flagged": int(photos.ood.astype(bool).sum()),
               "photos_not_flagged": sorted(photos.loc[~photos.ood.astype(bool), "image_id"]),
               "auroc_by_kind": {}}
    for kind in sorted(set(kinds)):
        pick = kinds == kind
        figures["auroc_by_kind"][kind] = float(roc_auc_score(
            np.r_[np.zeros(len(inside)), np.ones(pick.sum())], np.r_[inside, outside[pick]]))
    if labels:
        truth_class = val.image_id.map(labels)
        figures["dermoscopy_flagged_by_class"] = {
            code: {"n": int((truth_class == code).sum()),
                   "flagged": float(val.ood[truth_class == code].astype(bool).mean())}
            for code in sorted(set(truth_class.dropna()))}
    return figures


def decision_figures(val_results: str, held: set[str], labels: dict[str, str],
                     lesions: dict[str, str], calibration: dict, seed: int = 0) -> dict:
    """Balanced accuracy of held-out images before the decision offsets (argmax of the
    calibrated ``prob_*``) and after (``predicted_class``), with lesion-resampled bootstrap
    95% intervals of each and of the paired difference."""
    from raysky.calibration.decision import balanced_accuracy
    from raysky.metrics.intervals import bootstrap_intervals

    frame = _held_rows(results.read(val_results), held)
    frame = frame[frame.image_id.isin(labels)]
    classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    index = {c: i for i, c in enumerate(classes)}
    truth = frame.image_id.map(labels).map(index).to_numpy(int)
    before = frame[[f"prob_{c}" for c in classes]].to_numpy(float).argmax(axis=1)
    after = frame.predicted_class.map(index).to_numpy(int)
    intervals = bootstrap_intervals(
        {"before": lambda t, b, a: balanced_accuracy(t, b),
         "after": lambda t, b, a: balanced_accuracy(t, a),
         "difference": lambda t, b, a: balanced_accuracy(t, a) - balanced_accuracy(t, b)},
        truth, before, after, clusters=frame.image_id.map(lesions).to_numpy(), seed=seed)
    return {"images": len(frame), **intervals,
            "decision_offsets": calibration.get("decision_offsets"),
            "decision_rule": calibration.get("decision_rule")}


def calibration_figures(metrics_json: Path) -> dict:
    """ECE, Brier and referral figures from an ``evaluate --out`` JSON."""
    return json.loads(metrics_json.read_text())["calibration"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="HAM10000 folder with splits.csv")
    parser.add_argument("--run", default="runs/quality", help="benchmarks/quality.py's --out")
    parser.add_argument("--segmenter", help="default: the run's best segmenter")
    parser.add_argument("--classifier", help="default: the run's best dual-stream classifier")
    parser.add_argument("--single-stream", help="default: the run's best single-stream one")
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--ood-methods", default="imagenet-gate,mahalanobis,energy",
                        help="OOD methods to calibrate and compare; the first also gives the "
                        "calibration and decision figures")
    parser.add_argument("--per-kind", type=int, default=10,
                        help="synthetic non-dermoscopy images of each kind")
    args = parser.parse_args(argv)

    run_dir = Path(args.run)

    def best(name: str) -> str:
        return json.loads((run_dir / name / "result.json").read_text())["best_checkpoint_uri"]

    segmenter = args.segmenter or best("seg")
    classifier = args.classifier or best("cls-full")
    single = args.single_stream or best("cls-single-stream")
    out = run_dir / "clinical"
    out.mkdir(parents=True, exist_ok=True)
    images, metadata = str(run_dir / "val-images"), str(run_dir / "val-metadata.csv")
    photos = str(photo_folder(out, args.per_kind))
    methods = [m.strip() for m in args.ood_methods.split(",") if m.strip()]
    ham = pd.read_csv(os.path.join(args.data, "HAM10000_metadata.csv"))
    labels = dict(zip(ham.image_id, ham.dx, strict=True))
    lesions = dict(zip(ham.image_id, ham.lesion_id, strict=True))
    figures: dict = {"segmenter": segmenter, "classifier": classifier, "single_stream": single}
    data = ("--format", "ham10000", "--segmenter", segmenter)

    # In-sample: what training-end calibration does (fit and measure on the whole val split).
    run("calibrate", "--classifier", classifier, "--data", args.data, *data, "--split", "val",
        "--out", str(out / "cal-val"))
    run("evaluate", "--results", str(run_dir / "results-full"), "--data", args.data,
        "--format", "ham10000", "--split", "val", "--classifier", str(out / "cal-val"),
        "--out", str(out / "eval-val.json"))
    figures["in_sample"] = calibration_figures(out / "eval-val.json")

    for i, (root, held) in enumerate(lesion_halves(args.data, out), start=1):
        for method in methods:
            name = f"half{i}-{method}"
            cal = str(out / f"cal-{name}")
            run("calibrate", "--classifier", classifier, "--data", str(root), *data,
                "--split", "val", "--ood-method", method, "--out", cal)
            if method == methods[0]:
                run("evaluate", "--results", str(run_dir / "results-full"), "--data", str(root),
                    "--format", "ham10000", "--split", "test", "--classifier", cal,
                    "--out", str(out / f"eval-{name}.json"))
                figures[f"cross_fit_half{i}"] = calibration_figures(out / f"eval-{name}.json")
            for what, source, extra in (("val", images, ("--metadata", metadata)),
                                        ("photos", photos, ())):
                run("score", "--input", source, *extra, "--segmenter", segmenter,
                    "--classifier", cal, "--no-heatmaps", "--output",
                    str(out / f"results-{what}-{name}"))
            figures[f"ood_{name}"] = ood_figures(str(out / f"results-val-{name}"),
                                                 str(out / f"results-photos-{name}"), held,
                                                 labels)
            if method == methods[0]:
                record = json.loads((Path(cal) / "config.json").read_text())["calibration"]
                figures[f"decision_half{i}"] = decision_figures(
                    str(out / f"results-val-{name}"), held, labels, lesions, record)

    if not args.skip_robustness:
        for label, model in (("dual_stream", classifier), ("single_stream", single)):
            folder = out / f"robustness-{label}"
            run("robustness", "--segmenter", segmenter, "--classifier", model,
                "--data", args.data, "--format", "ham10000", "--split", "val",
                "--out", str(folder))
            figures[f"robustness_{label}"] = json.loads(
                (folder / "robustness.json").read_text())["by_artefact"]

    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps({k: v for k, v in figures.items() if not k.startswith("robustness")},
                     indent=2, default=str))
    print(f"figures written to {out / 'figures.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
