"""Training throughput: Ray Train (1 worker, Ray Data input) against a plain PyTorch loop.

Both sides run the same model, loss, optimizer and step code (``raysky.train.loops``), the same
decode + augmentation function, on the same training images, batch size and torch threads,
with decoding in one separate process (a Ray Data task, or one DataLoader worker). Prints, in
one run:

  1. images/s of the plain loop and of Ray Train, and their ratio (target >= 0.9), measured
     over the epochs after the first, so start-up is not averaged in;
  2. the time to the first optimizer step of each (Ray Train's includes starting its
     controller, the worker and the Ray Data pipeline);
  3. the plain loop under bf16 autocast against fp32 on CPU.

    python benchmarks/train_throughput.py --data raysky/sample_data/ham10000_sample --preset tiny
    python benchmarks/train_throughput.py --data /path/to/ham10000 --preset lite --limit 512
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raysky.train.settings import LoopConfig


def _subset(data: str, limit: int, workdir: str) -> str:
    """A HAM10000-layout folder with the first ``limit`` metadata rows, as symlinks."""
    root = Path(data)
    with open(root / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
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
    # A splits.csv at the source covers these images too, so the published split is used.
    if (root / "splits.csv").exists():
        os.symlink((root / "splits.csv").resolve(), out / "splits.csv")
    return str(out)


def plain_loop(config: LoopConfig, rows: list[dict], epochs: int, threads: int) -> dict:
    """The baseline: a torch DataLoader with one decoding worker and the shared step code."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from raysky.models.runtime import autocast, set_torch_threads
    from raysky.train.datasets import decode_and_transform
    from raysky.train.loops import make_optimizer
    from raysky.train.tasks import make_task

    started = time.perf_counter()
    set_torch_threads(threads)
    task = make_task(config)
    torch.manual_seed(config.seed)
    model = task.build_model()
    batch_size = config.batch_size
    steps_per_epoch = len(rows) // batch_size
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch)
    device = torch.device("cpu")

    def collate(items: list[dict]) -> dict:
        batch = {key: np.asarray([item[key] for item in items]) for key in items[0]}
        return decode_and_transform(batch, size=task.input_size, train=True)

    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
                        collate_fn=collate, persistent_workers=True, prefetch_factor=2)
    first_step, per_epoch = None, []
    for _epoch in range(epochs):
        model.train()
        epoch_start, images = time.perf_counter(), 0
        for batch in loader:
            inputs = task.inputs(batch, device)
            with autocast(device, config.precision):
                loss = task.loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(batch["image"])
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
    parser.add_argument("--data", default="raysky/sample_data/ham10000_sample", help="HAM10000-layout folder (default: %(default)s)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "lite", "paper"])
    parser.add_argument("--kind", default="segmenter", choices=["segmenter", "classifier"])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N metadata rows")
    parser.add_argument("--skip-bf16", action="store_true", help="do not measure bf16 autocast")
    args = parser.parse_args()

    import ray

    from raysky.data.metadata import MetadataVocab
    from raysky.data.taxonomy import order_classes
    from raysky.train import TrainSettings, train_classifier, train_segmenter
    from raysky.train.datasets import class_weights, encode_rows, load_splits
    from raysky.train.settings import LoopConfig

    with tempfile.TemporaryDirectory() as workdir:
        data = _subset(args.data, args.limit, workdir) if args.limit else args.data
        train, _val, how = load_splits(data, "ham10000")
        classes = order_classes({r.label for r in train}) if args.kind == "classifier" else ()
        index = {c: i for i, c in enumerate(classes)}
        config = LoopConfig(
            kind=args.kind, preset=args.preset, classes=list(classes),
            vocab=MetadataVocab().to_dict(), epochs=args.epochs, batch_size=args.batch_size,
            lr=3e-4, weight_decay=1e-4,
            class_weights=(class_weights([index[r.label] for r in train], len(classes))
                           if classes else None))
        rows = encode_rows(train, classes)
        print(f"{len(train)} training images ({how}), preset {args.preset}, {args.kind}, "
              f"batch {args.batch_size}, {args.threads} torch thread(s), {args.epochs} epochs")

        plain = plain_loop(config, rows, args.epochs, args.threads)
        bf16 = None if args.skip_bf16 else plain_loop(replace(config, precision="bf16"), rows,
                                                      args.epochs, args.threads)

        # One CPU for the worker's torch threads' share and one for Ray Data decoding, as the
        # plain loop has its threads plus one DataLoader worker.
        ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False,
                 log_to_driver=False)
        settings = TrainSettings(
            data=data, name="bench", preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
            precision="fp32", lr=3e-4, weight_decay=1e-4, workers=1, cpus_per_worker=args.threads, threads_per_worker=args.threads,
            storage=os.path.join(workdir, "runs"), max_failures=0, progress_interval=1e9,
            **({"mask_source": "ground-truth"} if args.kind == "classifier" else {}),
        )
        called = time.time()
        result = (train_segmenter if args.kind == "segmenter" else train_classifier)(settings)
        ray.shutdown()

    history = result.history
    ray_rate = steady_rate([(h["train_images"], h["train_seconds"]) for h in history])
    plain_rate = steady_rate(plain["per_epoch"])
    first = history[0]
    print()
    print(f"{'':34s}{'images/s':>10s}{'first step':>12s}")
    print(f"{'plain PyTorch loop (baseline)':34s}{plain_rate:10.1f}{plain['first_step_s']:11.1f}s")
    print(f"{'Ray Train, 1 worker + Ray Data':34s}{ray_rate:10.1f}"
          f"{first['first_step_unix'] - called:11.1f}s")
    print(f"  of which Ray Train start-up (API call to train function): "
          f"{first['worker_started_unix'] - called:.1f}s")
    print("seconds per epoch, plain: " + ", ".join(f"{s:.1f}" for _, s in plain["per_epoch"])
          + "; Ray Train: " + ", ".join(f"{h['train_seconds']:.1f}" for h in history))
    print(f"ratio Ray Train / plain: {ray_rate / plain_rate:.2f}  (target >= 0.9)")
    if bf16 is not None:
        bf16_rate = steady_rate(bf16["per_epoch"])
        print(f"plain loop bf16 autocast: {bf16_rate:.1f} images/s, "
              f"ratio bf16 / fp32: {bf16_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
