"""What MLflow tracking adds to a training step: tracked / untracked step time, in one run.

    .venv/bin/python benchmarks/tracking_overhead.py --preset lite --steps 20 --epochs 6

The training step is the real one (``raysky.train.tasks`` model, loss and batch shapes,
``raysky.train.loops.make_optimizer``), on synthetic batches so that data loading does not
blur the comparison, with ``--threads`` torch threads. Tracking makes the calls rank 0 makes
in ``raysky train --mlflow`` (:class:`raysky.train.tracking.Tracker`): the run's parameters and
the machine's tags once, then every epoch's metrics, to a real store (by default the local
sqlite store ``--mlflow`` alone uses, in a temporary folder; ``--uri`` for a server).

Tracked and untracked epochs of ``--steps`` steps alternate, so a busy machine slows both
alike, and the printed ratio is the median tracked epoch over the median untracked one. With
few steps per epoch that is an upper bound: the per-epoch call is spread over more steps in a
real epoch, so the ratio for ``--real-steps`` steps per epoch (HAM10000's 7,598 training images
in batches of 16: 474) is printed too, from the measured call and step times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from raysky.models.card import machine_description
from raysky.models.runtime import set_torch_threads
from raysky.train.loops import make_optimizer
from raysky.train.settings import LoopConfig, TrainSettings
from raysky.train.tasks import make_task
from raysky.train.tracking import Tracker, resolve_uri, start_run, training_params


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--kind", default="segmenter", choices=("segmenter", "classifier"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-steps", type=int, default=474)
    parser.add_argument("--uri", help="tracking URI (default: a local sqlite store in a "
                        "temporary folder)")
    return parser.parse_args(argv)


def _training_step(args: argparse.Namespace) -> tuple[Callable[[], float], LoopConfig, Any]:
    """The real training step of ``args.kind`` on one synthetic batch, its loop config (what
    tracking records) and its scheduler (whose learning rate is logged)."""
    settings = TrainSettings(data="synthetic", name="benchmark", preset=args.preset,
                             epochs=args.epochs * 2, batch_size=args.batch_size, lr=1e-3,
                             workers=1)
    config = LoopConfig.from_settings(
        args.kind, settings, classes=["mel", "nv"],
        record={"preset": args.preset, "batch_size": args.batch_size,
                "epochs": args.epochs * 2, "lr": 1e-3, "workers": 1},
        provenance={"training_data": {"format": "ham10000", "train_images": 7598,
                                      "val_images": 1346}})
    task = make_task(config)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer, scheduler = make_optimizer(model, config, args.steps)
    inputs = task.inputs(task.synthetic_batch(args.batch_size), torch.device("cpu"))

    def step() -> float:
        loss = task.loss(model, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    return step, config, scheduler


def _alternate_epochs(args: argparse.Namespace, step: Callable[[], float], tracker: Tracker,
                      scheduler) -> tuple[list[float], list[float], list[float]]:
    """Untracked and tracked epochs in turn: their seconds, and each metrics call's seconds."""
    for _ in range(3):  # warm-up: allocations, kernel choices
        step()
    plain, tracked, calls = [], [], []
    for epoch in range(args.epochs * 2):
        with_tracking = epoch % 2 == 1
        started = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        if with_tracking:
            call = time.perf_counter()
            tracker.log_metrics({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                                 "lr": scheduler.get_last_lr()[-1], "dice": 0.5,
                                 "jaccard": 0.4, "val_loss": 0.7}, step=epoch + 1)
            calls.append(time.perf_counter() - call)
        (tracked if with_tracking else plain).append(time.perf_counter() - started)
        print(f"epoch {epoch + 1} ({'tracked' if with_tracking else 'untracked'}): "
              f"{(time.perf_counter() - started) / args.steps * 1000:.0f} ms/step", flush=True)
    return plain, tracked, calls


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    set_torch_threads(args.threads)
    step, config, scheduler = _training_step(args)
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.uri or resolve_uri(f"{tmp}/store")[0]
        started = time.perf_counter()
        target = start_run(uri, "raysky-benchmark", f"{tmp}/run", "benchmark", args.kind)
        if target is None:
            return 1
        tracker = Tracker(target.to_dict())
        tracker.log_params(training_params(args.kind, config.record, config.provenance))
        tracker.set_tags({"system": machine_description()})
        setup_s = time.perf_counter() - started
        plain, tracked, calls = _alternate_epochs(args, step, tracker, scheduler)
        tracker.finish()
        if not tracker.enabled:
            return 1

    step_s = statistics.median(plain) / args.steps
    call_s = statistics.median(calls)
    measured = statistics.median(tracked) / statistics.median(plain)
    real = (step_s * args.real_steps + call_s) / (step_s * args.real_steps)
    print(f"{args.kind} {args.preset}, batch {args.batch_size}, {args.threads} threads; store "
          f"{'local sqlite' if not args.uri else args.uri}")
    print(f"step {step_s * 1000:.0f} ms; per-epoch metrics call {call_s * 1000:.1f} ms; run "
          f"start (store, run, parameters, tags) {setup_s:.2f} s, once per run")
    print(f"tracked / untracked epoch time at {args.steps} steps per epoch: {measured:.3f}")
    print(f"same, computed for {args.real_steps} steps per epoch: {real:.4f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
