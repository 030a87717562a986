"""Clinical benchmark: calibration, referral, out-of-distribution flag and artefact robustness.

    python benchmarks/quality.py  --data ../shared/data/ham10000 --seg-epochs 2 --cls-epochs 3
    python benchmarks/clinical.py --data ../shared/data/ham10000 --run runs/quality

It reuses the models that ``benchmarks/quality.py`` trained under ``--run`` (the segmenter,
the dual-stream classifier and the single-stream ablation) and goes through the product's own
commands only: ``raysky calibrate``, ``raysky score``, ``raysky evaluate`` and ``raysky
robustness``.

* **Calibration and referral, cross-fitted.** The val split is cut into two lesion-disjoint
  halves. Each half calibrates (temperature, referral threshold at 95% malignant sensitivity,
  OOD statistics) and the other half is evaluated with that calibration, so no figure is
  measured on the images it was fitted to. The in-sample figures (calibrated and evaluated on
  the whole val split, what training-end calibration does) are printed beside them.
* **Out of distribution.** scikit-image's bundled photographs (a cat, coffee, an astronaut,
  text, a retina, ...) are scored next to the held-out half; the figure is the AUROC of
  ``ood_score`` between the two, for the Mahalanobis score and for the energy score, with
  the share of each group flagged.
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

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
          "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
          "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
          "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg",
          "text.png")


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


def photo_folder(out: Path) -> Path:
    """scikit-image's bundled photographs, copied into an archive folder."""
    import shutil

    import skimage

    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copy(Path(skimage.__file__).parent / "data" / name, folder / name)
    return folder


def ood_figures(val_results: str, photo_results: str, held: set[str]) -> dict:
    """AUROC of ``ood_score`` (photos positive, held-out dermoscopy negative), flag shares."""
    from sklearn.metrics import roc_auc_score

    val = results.read(val_results)
    val = val[(val.status == "ok") & val.image_id.str.replace(r"\.jpg$", "", regex=True).isin(held)]
    photos = results.read(photo_results)
    photos = photos[photos.status == "ok"]
    scores = np.r_[val.ood_score.to_numpy(float), photos.ood_score.to_numpy(float)]
    truth = np.r_[np.zeros(len(val)), np.ones(len(photos))]
    return {"dermoscopy": len(val), "photos": len(photos),
            "auroc": float(roc_auc_score(truth, scores)),
            "dermoscopy_flagged": float(val.ood.astype(bool).mean()),
            "photos_flagged": int(photos.ood.astype(bool).sum()),
            "photos_not_flagged": sorted(photos.loc[~photos.ood.astype(bool), "image_id"])}


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
    photos = str(photo_folder(out))
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
        for method in ("mahalanobis", "energy"):
            name = f"half{i}-{method}"
            cal = str(out / f"cal-{name}")
            run("calibrate", "--classifier", classifier, "--data", str(root), *data,
                "--split", "val", "--ood-method", method, "--out", cal)
            if method == "mahalanobis":
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
                                                 str(out / f"results-photos-{name}"), held)

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
