"""Clinical benchmark: calibration, referral, out-of-distribution flag and artefact robustness.

    python benchmarks/quality.py run --data ../shared/data/ham10000 --seeds 0 --arms shared single
    python benchmarks/clinical.py --data ../shared/data/ham10000 --run runs/quality --seed 0

It reuses what ``benchmarks/quality.py run`` recorded under ``--run`` for ``--seed`` (the
``shared`` classifier, the segmenter it was trained with, its scores of the 200x150 val frames,
and the ``single`` classifier for robustness where that arm ran); ``--segmenter`` or
``--classifier`` take other checkpoints, and the val frames are then scored here. It goes
through the product's own commands only: ``raysky calibrate``, ``raysky score``, ``raysky
evaluate`` and ``raysky robustness``.

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

Figures land in ``<run>/clinical-s<seed>/figures.json``; the baselines are in the same run (the
uncalibrated probabilities for ECE, the energy score for OOD, the clean images for
robustness).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Inputs:
    """What every step reads: the models, the val split as quality.py rendered it, the
    classifier's uncalibrated val results, the non-dermoscopy folder and the ground truth."""

    data: str
    out: Path
    segmenter: str
    classifier: str
    single_stream: str | None
    images: str
    metadata: str
    val_results: str
    photos: str
    labels: dict[str, str]
    lesions: dict[str, str]


def run_models(run_dir: Path, seed: int) -> dict[str, str | None]:
    """The checkpoints ``benchmarks/quality.py`` recorded in ``<run>/runs.json`` for ``seed``:
    the ``shared`` classifier, the segmenter it was trained with, its scored 200x150 val frames,
    and the ``single`` classifier where that arm ran."""
    path = run_dir / "runs.json"
    if not path.exists():
        raise SystemExit(f"{path}: no such file; pass quality.py's --out as --run, or give "
                         "--segmenter, --classifier and --val-results")
    runs = json.loads(path.read_text())
    shared, single = runs.get(f"cls-shared-s{seed}"), runs.get(f"cls-single-s{seed}")
    if shared is None:
        raise SystemExit(f"{path}: no cls-shared-s{seed}; run quality.py run --arms shared "
                         f"--seeds {seed} first, or give --classifier")
    return {"segmenter": runs[shared["segmenter"]]["checkpoint"],
            "classifier": shared["checkpoint"],
            "val_results": shared.get("results", {}).get("frame200"),
            "single_stream": single["checkpoint"] if single else None}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="HAM10000 folder with splits.csv")
    parser.add_argument("--run", default="runs/quality", help="benchmarks/quality.py's --out")
    parser.add_argument("--seed", type=int, default=0,
                        help="which of the run's seeds (default: 0)")
    parser.add_argument("--segmenter", help="default: the run's segmenter of the classifier")
    parser.add_argument("--classifier", help="default: the run's shared-arm classifier")
    parser.add_argument("--val-results", help="the classifier's scores of the run's val "
                        "frames (default: the run's, or scored here with --classifier)")
    parser.add_argument("--single-stream", help="default: the run's single-arm classifier")
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--ood-methods", default="imagenet-gate,mahalanobis,energy",
                        help="OOD methods to calibrate and compare; the first also gives the "
                        "calibration and decision figures")
    parser.add_argument("--per-kind", type=int, default=10,
                        help="synthetic non-dermoscopy images of each kind")
    return parser.parse_args(argv)


def _models(args: argparse.Namespace) -> dict[str, str | None]:
    """The run's models for ``--seed``, each replaced by one given explicitly."""
    models = ({"segmenter": None, "classifier": None, "single_stream": None, "val_results": None}
              if args.segmenter and args.classifier else run_models(Path(args.run), args.seed))
    if (args.classifier or args.segmenter) and not args.val_results:
        models["val_results"] = None  # the run's val results came from other models
    given = {"segmenter": args.segmenter, "classifier": args.classifier,
             "single_stream": args.single_stream, "val_results": args.val_results}
    return {**models, **{key: value for key, value in given.items() if value}}


def _inputs(args: argparse.Namespace) -> Inputs:
    run_dir = Path(args.run)
    models = _models(args)
    out = run_dir / f"clinical-s{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    images, metadata = str(run_dir / "val" / "frame200"), str(run_dir / "val" / "metadata.csv")
    val_results = models["val_results"]
    if not val_results:
        val_results = str(out / "results-uncalibrated")
        run("score", "--input", images, "--metadata", metadata, "--segmenter",
            models["segmenter"], "--classifier", models["classifier"], "--no-heatmaps",
            "--output", val_results)
    ham = pd.read_csv(os.path.join(args.data, "HAM10000_metadata.csv"))
    return Inputs(data=args.data, out=out, segmenter=models["segmenter"],
                  classifier=models["classifier"], single_stream=models["single_stream"],
                  images=images, metadata=metadata, val_results=val_results,
                  photos=str(photo_folder(out, args.per_kind)),
                  labels=dict(zip(ham.image_id, ham.dx, strict=True)),
                  lesions=dict(zip(ham.image_id, ham.lesion_id, strict=True)))


def in_sample_figures(inputs: Inputs) -> dict:
    """What training-end calibration does: calibrate and evaluate on the whole val split."""
    cal = str(inputs.out / "cal-val")
    run("calibrate", "--classifier", inputs.classifier, "--data", inputs.data, "--format",
        "ham10000", "--segmenter", inputs.segmenter, "--split", "val", "--out", cal)
    run("evaluate", "--results", inputs.val_results, "--data", inputs.data,
        "--format", "ham10000", "--split", "val", "--classifier", cal,
        "--out", str(inputs.out / "eval-val.json"))
    return calibration_figures(inputs.out / "eval-val.json")


def half_figures(inputs: Inputs, half: int, root: Path, held: set[str],
                 methods: list[str]) -> dict:
    """One lesion-disjoint half calibrates, the other is measured: per OOD method its OOD
    figures; with the first method the calibration, referral and decision figures too."""
    figures: dict = {}
    for method in methods:
        name = f"half{half}-{method}"
        cal = str(inputs.out / f"cal-{name}")
        run("calibrate", "--classifier", inputs.classifier, "--data", str(root), "--format",
            "ham10000", "--segmenter", inputs.segmenter, "--split", "val", "--ood-method",
            method, "--out", cal)
        if method == methods[0]:
            run("evaluate", "--results", inputs.val_results, "--data", str(root),
                "--format", "ham10000", "--split", "test", "--classifier", cal,
                "--out", str(inputs.out / f"eval-{name}.json"))
            figures[f"cross_fit_half{half}"] = calibration_figures(
                inputs.out / f"eval-{name}.json")
        for what, source, extra in (("val", inputs.images, ("--metadata", inputs.metadata)),
                                    ("photos", inputs.photos, ())):
            run("score", "--input", source, *extra, "--segmenter", inputs.segmenter,
                "--classifier", cal, "--no-heatmaps", "--output",
                str(inputs.out / f"results-{what}-{name}"))
        scored = str(inputs.out / f"results-val-{name}")
        figures[f"ood_{name}"] = ood_figures(scored, str(inputs.out / f"results-photos-{name}"),
                                             held, inputs.labels)
        if method == methods[0]:
            record = json.loads((Path(cal) / "config.json").read_text())["calibration"]
            figures[f"decision_half{half}"] = decision_figures(scored, held, inputs.labels,
                                                               inputs.lesions, record)
    return figures


def robustness_figures(inputs: Inputs) -> dict:
    """``raysky robustness`` on the val split for the classifier and the single-stream one."""
    figures = {}
    for label, model in (("dual_stream", inputs.classifier),
                         ("single_stream", inputs.single_stream)):
        if model is None:
            print(f"robustness of {label}: no such classifier in the run, left out", flush=True)
            continue
        folder = inputs.out / f"robustness-{label}"
        run("robustness", "--segmenter", inputs.segmenter, "--classifier", model,
            "--data", inputs.data, "--format", "ham10000", "--split", "val",
            "--out", str(folder))
        figures[f"robustness_{label}"] = json.loads(
            (folder / "robustness.json").read_text())["by_artefact"]
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    inputs = _inputs(args)
    methods = [m.strip() for m in args.ood_methods.split(",") if m.strip()]
    figures: dict = {"segmenter": inputs.segmenter, "classifier": inputs.classifier,
                     "single_stream": inputs.single_stream, "val_results": inputs.val_results,
                     "in_sample": in_sample_figures(inputs)}
    for half, (root, held) in enumerate(lesion_halves(args.data, inputs.out), start=1):
        figures.update(half_figures(inputs, half, root, held, methods))
    if not args.skip_robustness:
        figures.update(robustness_figures(inputs))

    path = inputs.out / "figures.json"
    path.write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps({k: v for k, v in figures.items() if not k.startswith("robustness")},
                     indent=2, default=str))
    print(f"figures written to {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
