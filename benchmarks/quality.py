"""Quality benchmark: train the small preset within a time budget, score the val split, ablate.

    python benchmarks/quality.py --data ../shared/data/ham10000 --time-budget-min 20

Trains the segmenter, then the full classifier (dual stream + metadata), on the train split of
a HAM10000-layout folder (its ``splits.csv`` when present), and evaluates on the val split with
ISIC's metrics: Dice and thresholded Jaccard of the segmenter's masks at the original image
size, balanced accuracy and macro AUC of the classifier fed those masks. Two ablations train
for exactly as many steps as the full classifier did: without metadata, and single stream
(the full image only). A trivial baseline measured in the same run (a centred-ellipse mask,
class-prior probabilities) anchors the table; every figure is also printed as a ratio to the
full model.

The loop is plain PyTorch on one process (raysky's models, augmentations, preprocessing and
metrics), not Ray Train: the ablation needs the single-stream switch, the budget is wall time,
and a shared 2-core machine gains nothing from data-parallel workers. Half of the budget goes
to the full classifier, a quarter to the segmenter; the ablations run on what remains, since
they take the full model's step count and are cheaper per step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.data.images import load_mask, load_rgb  # noqa: E402
from raysky.data.metadata import MetadataVocab  # noqa: E402
from raysky.data.records import LesionRecord  # noqa: E402
from raysky.metrics import balanced_accuracy, macro_auc, segmentation_summary  # noqa: E402
from raysky.models import create_classifier, create_segmenter, get_preset  # noqa: E402
from raysky.models.preprocess import images_to_tensor, masks_to_tensor, resize_map  # noqa: E402
from raysky.models.runtime import set_torch_threads  # noqa: E402
from raysky.train.augment import AugmentConfig, augment_pair  # noqa: E402
from raysky.train.datasets import class_weights, load_splits  # noqa: E402

MASK_THRESHOLD = 0.5


class Examples:
    """Decoded images and masks, cached on first use (HAM10000 at 200x150 fits in memory)."""

    def __init__(self, records: Sequence[LesionRecord]):
        self.records = list(records)
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, i: int) -> tuple:
        if i not in self._cache:
            record = self.records[i]
            mask = load_mask(record.mask_uri) if record.mask_uri else None
            self._cache[i] = (load_rgb(record.image_uri), mask)
        return self._cache[i]


def _batches(n: int, batch_size: int, seed: int):
    """Endless shuffled index batches, the same sequence for every model with the same seed."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def _augmented(data: Examples, indices, size: int, rng: np.random.Generator):
    pairs = [augment_pair(*data.get(i), size, AugmentConfig(), rng) for i in indices]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)


def train_segmenter(preset: str, data: Examples, budget_s: float, batch_size: int, seed: int,
                    lr: float) -> tuple[torch.nn.Module, int, float]:
    """Train until ``budget_s`` runs out; returns the model, steps and seconds used."""
    from raysky.models import segmentation_loss

    torch.manual_seed(seed)
    model = create_segmenter(preset).train()
    cfg = model.config if hasattr(model, "config") else get_preset(preset).segmenter
    optimizer = _optimizer(model, lr)
    rng = np.random.default_rng(seed)
    start, steps = time.monotonic(), 0
    for indices in _batches(len(data), batch_size, seed):
        if time.monotonic() - start >= budget_s:
            break
        images, masks = _augmented(data, indices, cfg.input_size, rng)
        loss = segmentation_loss(model(images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std)),
                                 masks_to_tensor(masks, cfg.input_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 25 == 0:
            print(f"  segmenter step {steps}: loss {float(loss):.3f} "
                  f"({time.monotonic() - start:.0f}s)", file=sys.stderr, flush=True)
    return model.eval(), steps, time.monotonic() - start


@torch.no_grad()
def predict_masks(model, preset: str, data: Examples, batch_size: int = 32) -> list[np.ndarray]:
    """0/1 masks at each image's original size."""
    cfg = get_preset(preset).segmenter
    out = []
    for start in range(0, len(data), batch_size):
        images = [np.asarray(data.get(i)[0]) for i in range(start, min(len(data), start + batch_size))]
        probs = torch.sigmoid(model(images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std)))
        for image, prob in zip(images, probs[:, 0], strict=True):
            out.append((resize_map(prob, *image.shape[:2]) > MASK_THRESHOLD).astype(np.uint8))
    return out


def train_classifier(preset: str, classes, vocab: MetadataVocab, data: Examples, labels,
                     weights, *, budget_s: float | None, max_steps: int | None, batch_size: int,
                     seed: int, lr: float, use_metadata: bool = True,
                     use_lesion_stream: bool = True) -> tuple[torch.nn.Module, int, float]:
    """Train on ground-truth masks until the budget or ``max_steps``; returns model, steps, s."""
    torch.manual_seed(seed)
    model = create_classifier(preset, classes, use_metadata=use_metadata, vocab=vocab,
                              use_lesion_stream=use_lesion_stream).train()
    cfg = get_preset(preset).classifier
    optimizer = _optimizer(model, lr)
    rng = np.random.default_rng(seed)
    weight = torch.tensor(weights, dtype=torch.float32)
    start, steps = time.monotonic(), 0
    for indices in _batches(len(data), batch_size, seed):
        if (max_steps is not None and steps >= max_steps) or (
                budget_s is not None and time.monotonic() - start >= budget_s):
            break
        images, masks = _augmented(data, indices, cfg.input_size, rng)
        records = [data.records[i] for i in indices]
        meta = (vocab.encode_batch([r.age for r in records], [r.sex for r in records],
                                   [r.site for r in records]) if use_metadata else None)
        logits = model(images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std),
                       masks_to_tensor(masks, cfg.input_size), meta)
        loss = F.cross_entropy(logits, torch.as_tensor([labels[i] for i in indices]), weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 25 == 0:
            print(f"  classifier step {steps}: loss {float(loss):.3f} "
                  f"({time.monotonic() - start:.0f}s)", file=sys.stderr, flush=True)
    return model.eval(), steps, time.monotonic() - start


@torch.no_grad()
def predict_probs(model, preset: str, vocab: MetadataVocab, data: Examples,
                  masks: Sequence[np.ndarray], use_metadata: bool, batch_size: int = 32) -> np.ndarray:
    """Class probabilities for every example, with the given (predicted) masks."""
    cfg = get_preset(preset).classifier
    out = []
    for start in range(0, len(data), batch_size):
        idx = range(start, min(len(data), start + batch_size))
        images = [np.asarray(data.get(i)[0]) for i in idx]
        records = [data.records[i] for i in idx]
        meta = (vocab.encode_batch([r.age for r in records], [r.sex for r in records],
                                   [r.site for r in records]) if use_metadata else None)
        logits = model(images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std),
                       masks_to_tensor([masks[i] for i in idx], cfg.input_size), meta)
        out.append(torch.softmax(logits.float(), dim=1).numpy())
    return np.concatenate(out)


def centred_ellipse(height: int, width: int, fill: float = 0.5) -> np.ndarray:
    """A centred ellipse covering ``fill`` of the image: where dermoscopy lesions usually are."""
    yy, xx = np.mgrid[:height, :width]
    scale = math.sqrt(fill / (math.pi / 4))
    ry, rx = height / 2 * scale, width / 2 * scale
    return ((((yy - (height - 1) / 2) / ry) ** 2 + ((xx - (width - 1) / 2) / rx) ** 2) <= 1
            ).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000-layout folder (with splits.csv)")
    parser.add_argument("--format", default="ham10000")
    parser.add_argument("--time-budget-min", type=float, default=20.0,
                        help="training wall time for all models together (default: 20)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-val", type=int, default=None,
                        help="evaluate on the first N val images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    set_torch_threads(args.threads)
    train_records, val_records, how = load_splits(args.data, args.format)
    classes = get_preset(args.preset).classifier.classes
    train_records = [r for r in train_records if r.label in classes and r.mask_uri]
    val_records = [r for r in val_records if r.label in classes and r.mask_uri][:args.max_val]
    print(f"split: {how}; train {len(train_records)}, val {len(val_records)}; preset "
          f"{args.preset}; budget {args.time_budget_min:g} min", flush=True)
    train, val = Examples(train_records), Examples(val_records)
    index = {c: i for i, c in enumerate(classes)}
    train_labels = [index[r.label] for r in train_records]
    val_labels = np.array([index[r.label] for r in val_records])
    weights = class_weights(train_labels, len(classes))
    vocab = MetadataVocab()
    budget = args.time_budget_min * 60

    segmenter, seg_steps, seg_s = train_segmenter(args.preset, train, 0.25 * budget,
                                                  args.batch_size, args.seed, args.lr)
    pred_masks = predict_masks(segmenter, args.preset, val)
    truths = [val.get(i)[1] for i in range(len(val))]
    seg = segmentation_summary(pred_masks, truths)
    base_seg = segmentation_summary([centred_ellipse(*t.shape) for t in truths], truths)
    prior = np.bincount(train_labels, minlength=len(classes)) / len(train_labels)
    prior_probs = np.tile(prior, (len(val), 1))

    rows = {"baseline (ellipse mask, class prior)": {
        **base_seg, "balanced_accuracy": balanced_accuracy(val_labels, prior_probs),
        "macro_auc": macro_auc(val_labels, prior_probs), "steps": 0, "train_s": 0.0}}
    full_steps = None
    variants = [("full (dual stream + metadata)", True, True),
                ("no metadata", False, True),
                ("single stream (full image)", True, False)]
    for name, use_metadata, lesion_stream in variants:
        print(f"training {name}", file=sys.stderr, flush=True)
        model, steps, seconds = train_classifier(
            args.preset, classes, vocab, train, train_labels, weights,
            budget_s=0.5 * budget if full_steps is None else None, max_steps=full_steps,
            batch_size=args.batch_size, seed=args.seed, lr=args.lr,
            use_metadata=use_metadata, use_lesion_stream=lesion_stream)
        full_steps = full_steps or steps
        probs = predict_probs(model, args.preset, vocab, val, pred_masks, use_metadata)
        rows[name] = {**seg, "balanced_accuracy": balanced_accuracy(val_labels, probs),
                      "macro_auc": macro_auc(val_labels, probs), "steps": steps,
                      "train_s": seconds}

    keys = ("dice", "threshold_jaccard", "balanced_accuracy", "macro_auc")
    reference = rows["full (dual stream + metadata)"]
    print(f"\nsegmenter: {seg_steps} steps in {seg_s:.0f}s; classifiers: {full_steps} steps each; "
          f"batch {args.batch_size}; val images {len(val)}")
    print(f"{'model':<38}" + "".join(f"{k:>20}" for k in keys) + f"{'steps':>7}{'train s':>9}")
    for name, values in rows.items():
        cells = "".join(
            f"{values[k]:>11.3f} ({values[k] / reference[k]:>5.2f}x)" if reference[k] else
            f"{values[k]:>20.3f}" for k in keys)
        print(f"{name:<38}{cells}{values['steps']:>7}{values['train_s']:>9.0f}")
    print("(ratios are to the full model; segmentation columns are the one segmenter's, "
          "shared by all classifier rows)")
    if args.out:
        Path(args.out).write_text(json.dumps({"split": how, "segmenter_steps": seg_steps,
                                              "segmenter_s": seg_s, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
