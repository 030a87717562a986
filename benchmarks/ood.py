"""The dermoscopy gate on real data: AUROC against non-dermoscopy, and who gets flagged.

    python benchmarks/ood.py --data ../shared/data/ham10000 [--train-images 2500] [--out runs/ood]

The gate's encoder is ImageNet-pretrained and frozen (:mod:`raysky.calibration.gate`), so no
trained raysky model is needed: the gate is fitted on HAM10000 images and measured on others.

* **Fitted on the train split, measured on val** (``--train-images`` of the train split,
  a seeded sample, to fit; all of val to measure).
* **Cross-fitted on val** (what ``raysky calibrate --split val`` does): the val split cut into
  two lesion-disjoint halves, each fits and the other is measured.
* **In sample**: fitted on all of val and measured on the same images, which is what scoring
  the calibration split with a model calibrated on it shows. The images a gate was fitted on
  score higher than new ones (its thresholds are out-of-fold quantiles, and a space fitted on
  more images measures longer distances), so this share is above the held-out ones.

Against the non-dermoscopy set of :mod:`raysky.calibration.nondermoscopy` (the photos and
scans bundled with scikit-image, scikit-learn and matplotlib, and ``--per-kind`` synthetic
text pages, screenshots, charts and clinical skin photos of each kind), it reports the AUROC
of ``ood_score`` (overall and per source kind), the share of val dermoscopy flagged (overall
and per class) and of each kind of non-dermoscopy, each with a seeded 95% bootstrap interval
(dermoscopy resampled by lesion). The baseline in the same run is the same encoder with one
class-agnostic Gaussian and one global threshold (no per-class means or thresholds). The cost:
gate features per second against ``lite`` prediction + Grad-CAM per second, same images,
same run. Features are cached in ``--out`` so a rerun only refits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.calibration.decision import lesion_halves  # noqa: E402
from raysky.calibration.gate import (  # noqa: E402
    FLAG_QUANTILE,
    GateEncoder,
    fit_gate,
    gate_scores,
)
from raysky.calibration.nondermoscopy import bundled_photos, synthetic_images  # noqa: E402
from raysky.metrics.intervals import bootstrap_intervals  # noqa: E402
from raysky.metrics.isic import rank_auc  # noqa: E402

CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")


def _load(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def cached_features(encoder: GateEncoder, name: str, frame: pd.DataFrame, root: str,
                    out: Path) -> np.ndarray:
    """Gate features of ``frame``'s images, from ``out/<name>.npz`` when its ids match."""
    cache = out / f"{name}.npz"
    ids = frame.image_id.to_numpy().astype(str)  # not object: the cache loads without pickle
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if list(stored["ids"]) == list(ids):
            return stored["f"]
    chunks = []
    for start in range(0, len(ids), 128):
        chunks.append(encoder.features([_load(f"{root}/images/{i}.jpg")
                                        for i in ids[start:start + 128]]))
        print(f"  {name}: {min(start + 128, len(ids))}/{len(ids)} images", flush=True)
    features = np.concatenate(chunks)
    np.savez(cache, f=features, ids=ids)
    return features


def single_gaussian(train: np.ndarray, encoder_record: dict) -> dict:
    """The baseline: one class for everything, so one mean and one threshold."""
    return fit_gate(train, np.zeros(len(train), dtype=np.int64), encoder_record)


def measure(record: dict, val: np.ndarray, val_frame: pd.DataFrame, ood: np.ndarray,
            ood_kinds: np.ndarray, seed: int = 0) -> dict:
    """AUROC and flag shares with bootstrap intervals (val resampled by lesion)."""
    inside, outside = gate_scores(val, record), gate_scores(ood, record)
    scores = np.r_[inside, outside]
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    clusters = np.r_[val_frame.lesion_id.to_numpy().astype(str),
                     np.array([f"ood{i}" for i in range(len(outside))])]
    overall = bootstrap_intervals({"auroc": rank_auc}, truth, scores, clusters=clusters,
                                  seed=seed)["auroc"]
    figures: dict = {"auroc": overall, "by_kind": {}, "val_flagged_by_class": {}}
    for kind in sorted(set(ood_kinds)):
        pick = np.r_[np.ones(len(inside), bool), ood_kinds == kind]
        figures["by_kind"][kind] = {
            "n": int((ood_kinds == kind).sum()),
            "auroc": bootstrap_intervals({"auroc": rank_auc}, truth[pick], scores[pick],
                                         clusters=clusters[pick], seed=seed)["auroc"],
            "flagged": float((outside[ood_kinds == kind] > 1).mean())}
    flag = inside > 1
    figures["val_flagged"] = bootstrap_intervals({"share": np.mean}, flag.astype(float),
                                                 clusters=val_frame.lesion_id.to_numpy(),
                                                 seed=seed)["share"]
    for code in CLASSES:
        pick = val_frame.dx.to_numpy() == code
        figures["val_flagged_by_class"][code] = {
            "n": int(pick.sum()),
            **bootstrap_intervals({"share": np.mean}, flag[pick].astype(float),
                                  clusters=val_frame.lesion_id.to_numpy()[pick],
                                  seed=seed)["share"]}
    figures["ood_flagged"] = float((outside > 1).mean())
    return figures


def throughput(encoder: GateEncoder, images: int = 32) -> dict:
    """Gate features/s against ``lite`` prediction + Grad-CAM/s on the same 600x450 images."""
    import torch

    from raysky.inference import LesionPipeline
    from raysky.models import create_classifier, create_segmenter
    from raysky.models.checkpoint import LoadedModel, describe, serialize_weights

    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 255, (450, 600, 3), dtype=np.uint8) for _ in range(images)]
    torch.manual_seed(0)
    models = [LoadedModel(m.eval(), describe(m, "lite", serialize_weights(m)))
              for m in (create_segmenter("lite", pretrained_encoder="none"),
                        create_classifier("lite", pretrained_encoder="none"))]
    pipeline = LesionPipeline(*models)

    def rate(fn) -> float:
        fn(batch[:4])
        started = time.perf_counter()
        for start in range(0, images, 16):
            fn(batch[start:start + 16])
        return images / (time.perf_counter() - started)

    gate = rate(encoder.features)
    predict = rate(lambda b: pipeline(b, explain=True))
    return {"gate_images_per_s": gate, "lite_predict_gradcam_images_per_s": predict,
            "pipeline_with_gate_over_without": 1.0 / (1.0 + predict / gate)}


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def report(name: str, figures: dict) -> None:
    print(f"{name}: AUROC {_fmt(figures['auroc'])}; val flagged {_fmt(figures['val_flagged'])}; "
          f"non-dermoscopy flagged {figures['ood_flagged']:.3f}")
    for kind, entry in figures["by_kind"].items():
        print(f"    {kind:14s} n={entry['n']:3d}  AUROC {_fmt(entry['auroc'])}  flagged "
              f"{entry['flagged']:.3f}")
    print("    val flagged by class: " + ", ".join(
        f"{c} {e['value']:.3f} (n={e['n']})" for c, e in figures["val_flagged_by_class"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="HAM10000 folder with splits.csv")
    parser.add_argument("--train-images", type=int, default=2500,
                        help="train-split images to fit on (seeded sample; 0: all)")
    parser.add_argument("--per-kind", type=int, default=40, help="synthetic images per kind")
    parser.add_argument("--out", default="runs/ood")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = pd.read_csv(f"{args.data}/HAM10000_metadata.csv").merge(
        pd.read_csv(f"{args.data}/splits.csv"))
    val_frame = meta[meta.split == "val"].reset_index(drop=True)
    train_frame = meta[meta.split == "train"]
    if args.train_images:
        train_frame = train_frame.sample(min(args.train_images, len(train_frame)), random_state=0)
    train_frame = train_frame.reset_index(drop=True)
    encoder = GateEncoder()
    started = time.monotonic()
    others = bundled_photos() + synthetic_images(per_kind=args.per_kind, seed=1)
    ood = encoder.features([image for _, image in others])
    kinds = np.array([name.split(":")[0] for name, _ in others])
    val = cached_features(encoder, "val", val_frame, args.data, out)
    train = cached_features(encoder, "train", train_frame, args.data, out)
    print(f"features in {time.monotonic() - started:.0f} s")
    labels = {name: np.array([CLASSES.index(d) for d in frame.dx])
              for name, frame in (("train", train_frame), ("val", val_frame))}
    figures: dict = {"encoder": encoder.record, "quantile": FLAG_QUANTILE,
                     "train_images": len(train_frame), "val_images": len(val_frame),
                     "non_dermoscopy": {k: int((kinds == k).sum()) for k in sorted(set(kinds))}}
    for name, record in (("train_fit", fit_gate(train, labels["train"], encoder.record)),
                         ("train_fit_single_gaussian", single_gaussian(train, encoder.record))):
        figures[name] = measure(record, val, val_frame, ood, kinds)
        report(name, figures[name])
    figures["val_in_sample"] = measure(fit_gate(val, labels["val"], encoder.record), val,
                                       val_frame, ood, kinds)
    report("val_in_sample", figures["val_in_sample"])
    first = lesion_halves(val_frame.lesion_id.astype(str).tolist())
    for i, (fit_on, held) in enumerate(((first, ~first), (~first, first)), start=1):
        record = fit_gate(val[fit_on], labels["val"][fit_on], encoder.record)
        figures[f"val_cross_fit_half{i}"] = measure(record, val[held],
                                                    val_frame[held].reset_index(drop=True),
                                                    ood, kinds)
        report(f"val_cross_fit_half{i}", figures[f"val_cross_fit_half{i}"])
    if not args.skip_throughput:
        figures["throughput"] = throughput(encoder)
        print(f"cost: gate {figures['throughput']['gate_images_per_s']:.1f} img/s, lite predict"
              f"+Grad-CAM {figures['throughput']['lite_predict_gradcam_images_per_s']:.1f} img/s:"
              f" the gate keeps {figures['throughput']['pipeline_with_gate_over_without']:.2f} "
              "of the pipeline's throughput")
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=float))
    print(f"figures written to {out / 'figures.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
