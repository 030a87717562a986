"""Quality benchmark: fine-tune through ``raysky train``, score the val split, evaluate, ablate.

    python benchmarks/quality.py --data ../shared/data/ham10000 --seg-epochs 2 --cls-epochs 3

Every stage is the product's own path, not a loop of the benchmark's: the segmenter and the
classifier train with Ray Train (``train_segmenter`` / ``train_classifier``, what ``raysky
train`` calls; one worker), the classifier's lesion masks come from the trained segmenter's
Ray Data mask job, the val split is scored by ``score_archive`` (``raysky score``, Ray Data),
and the figures are ``raysky evaluate``'s: Dice and ISIC's thresholded Jaccard of the scored
masks at the original image size, balanced accuracy, macro and per-class AUC.

Rows: a trivial baseline measured in the same run (a centred-ellipse mask, class-prior
probabilities), the full model, the full model with test-time flips (``--tta``), and two
ablations trained for exactly as many epochs as the full classifier: without metadata, and
single stream (the full image only). Each figure is also printed as a ratio to the full
model, with the wall time of every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.data.images import load_mask  # noqa: E402
from raysky.metrics.isic import balanced_accuracy, macro_auc, segmentation_summary  # noqa: E402
from raysky.review.evaluate import evaluate  # noqa: E402
from raysky.score import ScoreSettings, score_archive  # noqa: E402
from raysky.train import TrainSettings, train_classifier, train_segmenter  # noqa: E402
from raysky.train.datasets import load_splits  # noqa: E402

KEYS = ("dice", "threshold_jaccard", "balanced_accuracy", "auc")
TARGETS = {"dice": 0.88, "threshold_jaccard": 0.75, "balanced_accuracy": 0.70, "auc": 0.93}


def centred_ellipse(height: int, width: int, fill: float = 0.5) -> np.ndarray:
    """A centred ellipse covering ``fill`` of the image: where dermoscopy lesions usually are."""
    yy, xx = np.mgrid[:height, :width]
    scale = math.sqrt(fill / (math.pi / 4))
    ry, rx = height / 2 * scale, width / 2 * scale
    return ((((yy - (height - 1) / 2) / ry) ** 2 + ((xx - (width - 1) / 2) / rx) ** 2) <= 1
            ).astype(np.uint8)


def val_archive(val, out: Path) -> tuple[str, str]:
    """The val images as an archive folder of links, plus its metadata CSV, for ``score``."""
    images = out / "val-images"
    images.mkdir(parents=True, exist_ok=True)
    for record in val:
        link = images / os.path.basename(record.image_uri)
        if not link.exists():
            link.symlink_to(os.path.abspath(record.image_uri))
    metadata = out / "val-metadata.csv"
    lines = ["image_id,age,sex,localization"]
    lines += [f"{r.image_id},{'' if r.age is None else r.age},{r.sex or ''},{r.site or ''}"
              for r in val]
    metadata.write_text("\n".join(lines) + "\n")
    return str(images), str(metadata)


def baseline(train, val) -> dict:
    """Ellipse masks and class-prior probabilities, through the same metric functions."""
    classes = sorted({r.label for r in train})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.label] for r in val])
    prior = np.bincount([index[r.label] for r in train], minlength=len(classes)) / len(train)
    probs = np.tile(prior, (len(val), 1))
    truths = [load_mask(r.mask_uri) for r in val if r.mask_uri]
    seg = segmentation_summary([centred_ellipse(*t.shape) for t in truths], truths)
    return {"dice": seg["dice"], "threshold_jaccard": seg["threshold_jaccard"],
            "balanced_accuracy": balanced_accuracy(labels, probs), "auc": macro_auc(labels, probs)}


def main(argv: list[str] | None = None) -> int:
    """Train, score, evaluate and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000-layout folder (with splits.csv)")
    parser.add_argument("--format", default="ham10000")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--seg-epochs", type=int, default=2)
    parser.add_argument("--cls-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the one training worker (default: 2)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the two ablations")
    parser.add_argument("--out", default="runs/quality", help="runs, results and figures.json")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, val, how = load_splits(args.data, args.format)
    print(f"split: {how}; train {len(train)}, val {len(val)}; preset {args.preset}", flush=True)
    common = {"data": args.data, "format": args.format, "preset": args.preset, "workers": 1,
              "cpus_per_worker": 1, "threads_per_worker": args.threads, "storage": str(out),
              "progress_interval": 60.0}
    images, metadata = val_archive(val, out)
    walls: dict[str, float] = {}

    def timed(stage: str, fn, *a, **k):
        started = time.monotonic()
        value = fn(*a, **k)
        walls[stage] = time.monotonic() - started
        print(f"[{stage}] {walls[stage]:.0f} s", flush=True)
        return value

    def score_and_evaluate(name: str, classifier: str, tta: bool = False) -> dict:
        results = str(out / f"results-{name}")
        timed(f"score {name}", score_archive, ScoreSettings(
            input=images, output=results, segmenter=segmenter, classifier=classifier,
            metadata=metadata, heatmaps=False, workers=1, cpus_per_worker=1, tta=tta))
        metrics = evaluate(results, args.data, args.format, split="val")
        seg, cls = metrics["segmentation"], metrics["classification"]
        return {"dice": seg["dice"], "threshold_jaccard": seg["threshold_jaccard"],
                "balanced_accuracy": cls["balanced_accuracy"], "auc": cls["auc"],
                "auc_per_class": {c: v["auc"] for c, v in cls["per_class"].items()}}

    seg_run = timed("train segmenter", train_segmenter, TrainSettings(
        **common, name="seg", epochs=args.seg_epochs))
    segmenter = seg_run.best_checkpoint_uri
    variants = [("full", {}), ("no metadata", {"use_metadata": False}),
                ("single stream", {"use_lesion_stream": False})]
    if args.no_ablations:
        variants = variants[:1]
    rows = {"baseline (ellipse mask, class prior)": baseline(train, val)}
    for name, switches in variants:
        run = timed(f"train classifier ({name})", train_classifier, TrainSettings(
            **common, name=f"cls-{name.replace(' ', '-')}", epochs=args.cls_epochs,
            segmenter=segmenter, **switches))
        rows[name] = score_and_evaluate(name.replace(" ", "-"), run.best_checkpoint_uri)
        if name == "full":
            rows["full + tta (flips)"] = score_and_evaluate("full-tta", run.best_checkpoint_uri,
                                                            tta=True)

    reference = rows["full"]
    training = walls["train segmenter"] + walls["train classifier (full)"]
    print(f"\nval images {len(val)}; segmenter {args.seg_epochs} epochs, classifiers "
          f"{args.cls_epochs} epochs each; segmenter + full classifier trained in "
          f"{training / 60:.1f} min")
    print(f"{'model':<38}" + "".join(f"{k:>24}" for k in KEYS))
    for name, values in rows.items():
        cells = "".join(f"{values[k]:>15.3f} ({values[k] / reference[k]:>5.2f}x)" if reference[k]
                        else f"{values[k]:>24.3f}" for k in KEYS)
        print(f"{name:<38}{cells}")
    print("(ratios are to the full model; segmentation columns come from the one segmenter)")
    print("targets: " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items())
          + " within 45 min of training; met: "
          + ", ".join(f"{k} {'yes' if reference[k] >= v else 'no'}" for k, v in TARGETS.items())
          + f", time {'yes' if training <= 45 * 60 else 'no'}")
    print("per-class AUC (full): " + ", ".join(f"{c} {v:.3f}" for c, v in
                                               reference["auc_per_class"].items()))
    for name in ("no metadata", "single stream"):
        if name in rows:
            print(f"ablation delta ({name} - full): " + ", ".join(
                f"{k} {rows[name][k] - reference[k]:+.3f}" for k in KEYS))
    print("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))
    (out / "figures.json").write_text(json.dumps(
        {"split": how, "rows": rows, "wall_s": walls, "seg_epochs": args.seg_epochs,
         "cls_epochs": args.cls_epochs, "preset": args.preset}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
