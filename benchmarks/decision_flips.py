"""What the balanced decision rule costs in robustness: artefact flips of the decision against the
strength of its logit adjustment, from one finished ``raysky robustness`` run.

    python benchmarks/decision_flips.py ROBUSTNESS_OUT --classifier CALIBRATED_CKPT

A calibrated checkpoint decides ``argmax(log p + offsets)`` (:mod:`raysky.calibration.decision`),
with offsets that raise the rare classes. They buy balanced accuracy, and they also move
decisions close to a class boundary, where an artefact tips them. This script re-decides the
robustness run's own probabilities (clean and altered, as the calibrated checkpoint scored them)
with the prior offsets ``-tau * log prior`` on a grid of ``tau`` (0 is the argmax), and with the
checkpoint's fitted offsets, and prints for each the balanced accuracy on the run's labelled
clean images (a lesion-resampled bootstrap interval) and the decision flip rate per artefact kind
(a Wilson interval by lesion). No model runs: the figures of a ``tau`` are those a checkpoint
with that rule would have shown on the same images and artefacts. The balanced accuracy is that
of the robustness sample, which is usually part of the calibration split: a trend, not a
held-out figure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustness_pair import read_images  # noqa: E402  (beside this script, on its path)

from raysky.audit.paired import read_scored  # noqa: E402
from raysky.calibration.decision import (  # noqa: E402
    balanced_accuracy,
    decide,
    log_prior,
    offsets_vector,
    prior_offsets,
)
from raysky.metrics.intervals import (  # noqa: E402
    bootstrap_interval,
    format_interval,
    proportion_interval,
)
from raysky.models.checkpoint import read_checkpoint_meta  # noqa: E402
from raysky.score.robustness import CLEAN  # noqa: E402

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)


def checkpoint_rule(classifier: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """The classifier's classes, its training split's log prior and its fitted offsets (None if
    it has none)."""
    meta = read_checkpoint_meta(classifier, "classifier")
    classes = list(meta["classes"])
    counts = (meta.get("extra", {}).get("provenance", {}).get("training_data") or {}).get(
        "train_classes")
    if not counts or any(int(counts.get(c, 0)) <= 0 for c in classes):
        raise SystemExit(f"{classifier}: records no training images for every class "
                         f"({counts}); pass a checkpoint trained by raysky train")
    logp, _source = log_prior(classes, np.array([], dtype=np.int64), counts)
    offsets = offsets_vector((meta.get("calibration") or {}).get("decision_offsets"), classes)
    return classes, logp, offsets


def log_probs(frame: pd.DataFrame, ids: list[str], classes: list[str]) -> np.ndarray:
    """``log p`` per row of ``ids`` (a shift of ``logits / T`` per row, which ``decide`` takes)."""
    probs = frame.loc[ids, [f"prob_{c}" for c in classes]].to_numpy(np.float64)
    return np.log(np.clip(probs, 1e-12, 1.0))


def load_run(folder: str, classes: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The run's image table over the images scored ok in every folder, and ``log p`` of each
    folder (clean and every artefact kind) in that table's order."""
    table = read_images(folder)
    kinds = [c.removeprefix("area_") for c in table.columns if c.startswith("area_")]
    frames = {name: read_scored(os.path.join(folder, "results", name), table)
              for name in (CLEAN, *kinds)}
    ids = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    if not ids:
        raise SystemExit(f"{folder}: no image was scored ok in every folder")
    return (table.set_index("image_id").loc[ids].reset_index(),
            {name: log_probs(frame, ids, classes) for name, frame in frames.items()})


def rule_figures(table: pd.DataFrame, scores: dict[str, np.ndarray], classes: list[str],
                 offsets: np.ndarray, replicates: int, seed: int) -> dict:
    """Balanced accuracy on the labelled clean images and the flip rate per kind, deciding with
    ``offsets``."""
    clean = decide(scores[CLEAN], offsets)
    lesions = table["lesion_id"].where(table["lesion_id"].notna(), table["image_id"]).to_numpy(object)
    index = {c: i for i, c in enumerate(classes)}
    labels = table["label"].map(index)
    known = labels.notna().to_numpy()
    truth = labels[known].to_numpy(np.int64)
    accuracy = bootstrap_interval(lambda i: balanced_accuracy(truth[i], clean[known][i]),
                                  np.arange(int(known.sum())), clusters=lesions[known],
                                  replicates=replicates, seed=seed)
    flips = {kind: proportion_interval(clean != decide(score, offsets), lesions)
             for kind, score in scores.items() if kind != CLEAN}
    return {"balanced_accuracy": accuracy, "flip_rate": flips}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("robustness", help="--out folder of a finished raysky robustness run")
    parser.add_argument("--classifier", required=True,
                        help="the calibrated checkpoint that run scored with (its prior and "
                             "fitted offsets)")
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS),
                        help="strengths of the prior offsets to try (0: the argmax)")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if args.replicates < 1:
        parser.error(f"--replicates {args.replicates}: must be at least 1")
    classes, logp, fitted = checkpoint_rule(args.classifier)
    table, scores = load_run(args.robustness, classes)
    rules = {f"tau {tau:g}": prior_offsets(logp, tau) for tau in args.taus}
    if fitted is not None:
        rules["fitted"] = fitted
    kinds = [k for k in scores if k != CLEAN]
    print(f"{len(table)} images; balanced accuracy on the labelled clean images, then the "
          "decision's flip rate per artefact kind")
    print(f"{'rule':<10}{'balanced accuracy':<26}" + "".join(f"{k:>9}" for k in kinds))
    for name, offsets in rules.items():
        figures = rule_figures(table, scores, classes, offsets, args.replicates, args.seed)
        print(f"{name:<10}{format_interval(figures['balanced_accuracy']):<26}" + "".join(
            f"{figures['flip_rate'][k]['value']:>9.3f}" for k in kinds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
