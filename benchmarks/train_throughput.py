"""Training throughput: ``raysky train`` against a plain timm/torchvision loop on the same model.

The baseline is the loop a user would write: a torch ``DataLoader`` (one worker) decoding each
JPEG and augmenting it with torchvision every epoch (random-resized crop, flips, colour jitter),
then an fp32 NCHW step of the same raysky model, every layer trainable. ``raysky train`` is the
product's path: Ray Train (1 worker), the images decoded once into a uint8 cache, batched
augmentation in the worker, the preset recipe's frozen stem and early blocks, its moving
average, and the precision and memory layout its measured step picks. Both sides use the same
images, batch size, torch threads and epochs. Printed, from one run:

  1. images/s of each, over the epochs after the first (start-up is not averaged in), and the
     ratio raysky / plain;
  2. the time to the first optimizer step of each (raysky's includes starting Ray Train and
     decoding the cache).

    python benchmarks/train_throughput.py --data raysky/sample_data/ham10000_sample --preset tiny
    python benchmarks/train_throughput.py --data /path/to/ham10000 --preset lite --limit 1024 \\
        --kind classifier --threads 2
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
import time
from pathlib import Path


def _subset(data: str, limit: int, workdir: str) -> str:
    """A HAM10000-layout folder with a seeded sample of ``limit`` metadata rows, as symlinks.

    A sample, not the first rows: HAM10000's metadata is grouped by diagnosis, so its first
    thousand rows hold a few classes, and the split's validation side can then hold a class
    its training side lacks, which training refuses.
    """
    root = Path(data)
    with open(root / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = random.Random(0).sample(rows, limit) if limit < len(rows) else rows
    out = Path(workdir) / "subset"
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    with open(out / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        image = root / "images" / f"{row['image_id']}.jpg"
        mask = root / "masks" / f"{row['image_id']}_segmentation.png"
        os.symlink(image.resolve(), out / "images" / image.name)
        if mask.exists():
            os.symlink(mask.resolve(), out / "masks" / mask.name)
    if (root / "splits.csv").exists():
        os.symlink((root / "splits.csv").resolve(), out / "splits.csv")
    return str(out)


class _PlainDataset:
    """Decode and augment one record per item, every epoch, with torchvision."""

    def __init__(self, records, size: int, classes: list[str]):
        from torchvision.transforms import v2

        self.records, self.index = records, {c: i for i, c in enumerate(classes)}
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.03)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from torchvision import tv_tensors

        from raysky.data.images import load_mask, load_rgb

        record = self.records[i]
        image = torch.from_numpy(np.asarray(load_rgb(record.image_uri))).permute(2, 0, 1)
        mask = load_mask(record.mask_uri) if record.mask_uri else np.zeros(image.shape[1:], np.uint8)
        image, mask = self.transform(tv_tensors.Image(image),
                                     tv_tensors.Mask(torch.from_numpy((mask > 0).astype(np.uint8))))
        return image, mask, self.index.get(record.label, 0)


def plain_loop(kind: str, preset: str, records, classes: list[str], epochs: int,
               batch_size: int, threads: int) -> dict:
    """The baseline loop; returns the time to the first step and (images, seconds) per epoch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from raysky.models import create_classifier, create_segmenter, segmentation_loss
    from raysky.models.config import get_preset
    from raysky.models.preprocess import normalize
    from raysky.models.runtime import set_torch_threads

    started = time.perf_counter()
    set_torch_threads(threads)
    config = getattr(get_preset(preset), kind)
    model = (create_segmenter(preset, pretrained_encoder=None) if kind == "segmenter"
             else create_classifier(preset, classes=classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loader = DataLoader(_PlainDataset(records, config.input_size, classes), batch_size=batch_size,
                        shuffle=True, drop_last=True, num_workers=1, persistent_workers=True)
    first_step, per_epoch = None, []
    for _epoch in range(epochs):
        model.train()
        epoch_start, images = time.perf_counter(), 0
        for image, mask, label in loader:
            x = normalize(image.float() / 255, config.mean, config.std, config.color_constancy)
            if kind == "segmenter":
                loss = segmentation_loss(model(x), mask[:, None].float())
            else:
                loss = F.cross_entropy(model(x, mask[:, None].float()), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(image)
            if first_step is None:
                first_step = time.perf_counter() - started
        per_epoch.append((images, time.perf_counter() - epoch_start))
    return {"first_step_s": first_step, "per_epoch": per_epoch}


def steady_rate(per_epoch: list[tuple[int, float]]) -> float:
    """Images/s over every epoch but the first."""
    later = per_epoch[1:] or per_epoch
    return sum(n for n, _ in later) / sum(s for _, s in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="raysky/sample_data/ham10000_sample",
                        help="HAM10000-layout folder (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "lite", "paper"])
    parser.add_argument("--kind", default="classifier", choices=["segmenter", "classifier"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--limit", type=int, default=0, help="use a seeded sample of N metadata rows")
    args = parser.parse_args()

    import ray

    from raysky.data.taxonomy import order_classes
    from raysky.train import TrainSettings, train_classifier, train_segmenter
    from raysky.train.datasets import load_splits

    with tempfile.TemporaryDirectory() as workdir:
        data = _subset(args.data, args.limit, workdir) if args.limit else args.data
        train, _val, how = load_splits(data, "ham10000")
        classes = list(order_classes({r.label for r in train}))
        print(f"{len(train)} training images ({how}), preset {args.preset}, {args.kind}, "
              f"batch {args.batch_size}, {args.threads} torch thread(s), {args.epochs} epochs",
              flush=True)
        plain = plain_loop(args.kind, args.preset, train, classes, args.epochs, args.batch_size,
                           args.threads)
        # The plain loop has its threads plus one DataLoader worker; so does raysky.
        ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False,
                 log_to_driver=False)
        settings = TrainSettings(
            data=data, name="bench", preset=args.preset, epochs=args.epochs,
            batch_size=args.batch_size, pretrained_encoder="none", workers=1,
            cpus_per_worker=args.threads, threads_per_worker=args.threads,
            storage=os.path.join(workdir, "runs"), max_failures=0, progress_interval=1e9,
            **({"mask_source": "ground-truth"} if args.kind == "classifier" else {}))
        called = time.time()
        result = (train_segmenter if args.kind == "segmenter" else train_classifier)(settings)
        ray.shutdown()

    history = result.history
    raysky_rate = steady_rate([(h["train_images"], h["train_seconds"]) for h in history])
    plain_rate = steady_rate(plain["per_epoch"])
    print()
    print(f"{'':40s}{'images/s':>10s}{'first step':>12s}")
    print(f"{'plain timm/torchvision loop (baseline)':40s}{plain_rate:10.1f}"
          f"{plain['first_step_s']:11.1f}s")
    print(f"{'raysky train (Ray Train, cache, recipe)':40s}{raysky_rate:10.1f}"
          f"{history[0]['first_step_unix'] - called:11.1f}s")
    print("seconds per epoch, plain: " + ", ".join(f"{s:.1f}" for _, s in plain["per_epoch"])
          + "; raysky: " + ", ".join(f"{h['train_seconds']:.1f}" for h in history))
    print(f"ratio raysky / plain: {raysky_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
