"""The per-worker training loop that Ray Train runs, shared by the segmenter and the classifier.

One loop serves both models; what differs (model, loss, validation metrics) lives in a small
task object (:mod:`raysky.train.tasks`), and what the loop is told arrives as a
:class:`~raysky.train.settings.LoopConfig`.

Each epoch every worker trains on its own shard of the training set (DDP keeps the replicas
in sync); rank 0 then validates on the whole validation set, and every rank calls
``ray.train.report``, rank 0 with a checkpoint. The checkpoint directory holds the model in
raysky's own format (so ``load_checkpoint`` works on the URI Ray reports) plus the optimizer
and scheduler state that resuming needs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn

from raysky.jsonable import to_jsonable
from raysky.models.card import machine_description
from raysky.models.checkpoint import load_checkpoint, save_checkpoint
from raysky.models.pretrained import initialise_model, model_encoders
from raysky.models.runtime import (
    autocast,
    prepare_for_device,
    set_torch_threads,
    unwrap_ddp,
)
from raysky.progress import Progress
from raysky.train.datasets import readable_rows
from raysky.train.settings import LoopConfig
from raysky.train.tasks import make_task, measure_precision
from raysky.train.tracking import Tracker, training_params

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
MAX_UNREADABLE_SHARE = 0.01
"""An epoch that cannot read more than this share of its training images fails."""

DEFAULT_METRIC = {"segmenter": ("dice", "max"), "classifier": ("balanced_accuracy", "max")}


def parameter_groups(model: nn.Module, lr: float, encoder_lr_scale: float) -> list[dict]:
    """AdamW groups: the encoders at ``lr * encoder_lr_scale``, every other layer at ``lr``."""
    encoder_ids = {id(p) for encoder in model_encoders(model).values() for p in encoder.parameters()}
    encoder = [p for p in model.parameters() if id(p) in encoder_ids]
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": encoder, "lr": lr * encoder_lr_scale, "name": "encoder"},
            {"params": rest, "lr": lr, "name": "new_layers"}]


SCHEDULE = ("AdamW; linear warm-up over min(one epoch, 10% of the steps), then cosine decay "
            "to 1% of each parameter group's peak rate")
"""What :func:`make_optimizer` does, in words, for the model card."""


def make_optimizer(model: nn.Module, config: LoopConfig, steps_per_epoch: int):
    """AdamW with a linear warm-up over at most one epoch, then cosine decay to 1% of each
    group's peak rate (see :func:`parameter_groups`)."""
    groups = parameter_groups(unwrap_ddp(model), config.lr, config.encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    total = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, min(steps_per_epoch, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_unreadable(kind: str, epoch: int, unreadable: int, seen: int,
                      examples: list[str]) -> None:
    """Fail the epoch when more than :data:`MAX_UNREADABLE_SHARE` of its images were unreadable.

    A few corrupt files are skipped (and logged); more than that is a broken dataset or
    storage, and checkpointing an epoch that silently trained on less would hide it.
    """
    total = unreadable + seen
    if total and unreadable > MAX_UNREADABLE_SHARE * total:
        raise RuntimeError(
            f"{kind}: epoch {epoch + 1}: {unreadable} of {total} training images "
            f"({unreadable / total:.1%}) could not be read, more than "
            f"{MAX_UNREADABLE_SHARE:.0%}; not checkpointing a shrunken epoch. First: "
            + "; ".join(examples))


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _score(metrics: dict, config: LoopConfig) -> dict:
    # Ray orders checkpoints by this value; a NaN would silently break that ordering.
    key, mode = config.metric, config.metric_mode
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        metrics[key] = -math.inf if mode == "max" else math.inf
    return metrics


def write_checkpoint(directory: str, model: nn.Module, config: LoopConfig, state: dict,
                     metrics: dict, history: list[dict]) -> None:
    """Fill ``directory`` with a raysky checkpoint plus resume state, metrics and history."""
    extra = {"epoch": metrics["epoch"], "run": config.run_name, "metrics": to_jsonable(metrics),
             "settings": config.settings, "initial_weights": state["initial_weights"],
             "hyperparameters": state["hyperparameters"],
             "provenance": config.provenance, "machine": machine_description(),
             "training_seconds": sum(float(h.get("train_seconds", 0.0)) for h in history)}
    save_checkpoint(unwrap_ddp(model), directory, config.preset, extra=extra)
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, METRICS_FILE), "w") as handle:
        json.dump(to_jsonable(metrics), handle, indent=2)
    with open(os.path.join(directory, HISTORY_FILE), "w") as handle:
        json.dump(to_jsonable(history), handle, indent=2)


def _restore(model: nn.Module, checkpoint, task) -> dict:
    with checkpoint.as_directory() as directory:
        loaded = load_checkpoint(directory, expected_kind=task.kind)
        if task.kind == "classifier" and loaded.classes != task.classes:
            raise ValueError(f"the run's checkpoint has classes {list(loaded.classes)}, but this "
                             f"run trains {list(task.classes)}; use a new --name")
        model.load_state_dict(loaded.model.state_dict())
        # weights_only: anything that can write to the run's storage must not be able to run
        # code on the workers. The optimizer and scheduler state are plain tensors and numbers.
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu",
                           weights_only=True)
        state.setdefault("initial_weights", loaded.meta.get("extra", {}).get("initial_weights", {}))
        return state


def _rng_state() -> dict:
    # Plain tensors and tuples of ints, so the state still loads with weights_only=True.
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict | None) -> None:
    import random

    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function; ``loop_config`` is :meth:`LoopConfig.to_dict` of the
    config :mod:`raysky.train.driver` built."""
    import ray.train
    import ray.train.torch
    from ray.data import DataContext

    config = LoopConfig(**loop_config)
    started = time.time()
    set_torch_threads(config.threads)
    DataContext.get_current().enable_progress_bars = False
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = make_task(config)
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    precision = config.precision

    torch.manual_seed(config.seed)
    model = task.build_model()
    checkpoint = ray.train.get_checkpoint()
    state = _restore(model, checkpoint, task) if checkpoint else None
    spec = config.pretrained_encoder or "none"
    if state is None:
        initial_weights = {k: v.to_dict() for k, v in initialise_model(model, spec).items()}
        if rank == 0:
            for name, record in initial_weights.items():
                print(f"{task.kind}: {name} starts from {record['source']} "
                      f"({record['tensors_loaded']} of {record['tensors_total']} tensors)",
                      flush=True)
    else:
        initial_weights = state["initial_weights"]
    pretrained = {"pretrained_tensors_loaded": sum(r["tensors_loaded"] for r in initial_weights.values()),
                  "pretrained_tensors_total": sum(r["tensors_total"] for r in initial_weights.values())}
    model = prepare_for_device(model, device)
    batch_size = config.batch_size
    precision, timing = measure_precision(task, model, device, config.precision, batch_size)
    if rank == 0 and timing:
        print(f"{task.kind}: precision {precision} (measured step: "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timing.items()) + ")", flush=True)
    model = ray.train.torch.prepare_model(model, move_to_device=False)

    steps_per_epoch = max(1, config.train_rows // world // batch_size)
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch)
    start_epoch, global_step, history = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step, history = state["epoch"], state["global_step"], state["history"]
        _restore_rng(state.get("rng"))
    epochs = config.epochs
    if rank == 0 and start_epoch:
        print(f"{task.kind}: resuming from the checkpoint of epoch {start_epoch}", flush=True)
    if start_epoch >= epochs:
        if rank == 0:
            print(f"{task.kind}: already trained for {start_epoch} epochs, nothing to do", flush=True)
        return

    tracker = Tracker(config.tracking, enabled=rank == 0)
    if start_epoch == 0:
        tracker.log_params(training_params(task.kind, config.settings, config.provenance))
    tracker.set_tags({"system": machine_description(), "raysky.precision": precision})

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_epoch = steps_per_epoch * batch_size * world
    progress = Progress(f"{task.kind} [{config.run_name}]",
                        total=per_epoch * (epochs - start_epoch), unit="img",
                        interval=config.progress_interval)
    first_step_at = None
    for epoch in range(start_epoch, epochs):
        model.train()
        epoch_start = time.time()
        loss_sum, seen, unreadable, first_errors = 0.0, 0, 0, []
        batches = train_shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", drop_last=True,
            prefetch_batches=2)
        for step, batch in enumerate(batches, start=1):
            batch, errors = readable_rows(batch)
            unreadable += len(errors)
            first_errors.extend(errors[: max(0, 3 - len(first_errors))])
            if not len(batch["image"]):
                # Every rank must step for DDP; a batch with nothing readable cannot.
                raise RuntimeError(f"{task.kind}: epoch {epoch + 1}: no image of a batch of "
                                   f"{len(errors)} could be read ({'; '.join(errors[:3])})")
            inputs = task.inputs(batch, device)
            with autocast(device, precision):
                loss = task.loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            n = len(batch["image"])
            loss_sum += float(loss.detach()) * n
            seen += n
            if first_step_at is None:
                first_step_at = time.time()
            if rank == 0:
                progress.update(n * world, extra=f"epoch {epoch + 1}/{epochs}, step {step}/"
                                f"{steps_per_epoch}, loss {float(loss.detach()):.4f}")
        train_seconds = time.time() - epoch_start
        loss_total, seen_total, unreadable_total = _all_reduce_sum(
            [loss_sum, float(seen), float(unreadable)], device)
        _check_unreadable(task.kind, epoch, int(unreadable_total), int(seen_total), first_errors)

        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "train_loss": loss_total / max(seen_total, 1.0),
            "train_images": int(seen_total),
            "train_seconds": train_seconds,
            "images_per_s": seen_total / train_seconds if train_seconds > 0 else 0.0,
            "lr": scheduler.get_last_lr()[-1],
            "encoder_lr": scheduler.get_last_lr()[0],
            "precision": precision,
            "start_epoch": start_epoch,
            "first_step_unix": first_step_at,
            "worker_started_unix": started,
            **pretrained,
        }
        report_checkpoint = None
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                metrics.update(task.evaluate(unwrap_ddp(model), val_shard.iter_batches(
                    batch_size=batch_size, batch_format="numpy"), device, precision))
                _score(metrics, config)
                history.append(to_jsonable(metrics))
                state = {"epoch": epoch + 1, "global_step": global_step, "history": history,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "initial_weights": initial_weights, "rng": _rng_state(),
                         "hyperparameters": config.hyperparameters}
                write_checkpoint(directory, model, config, state, metrics, history)
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                print(_epoch_line(task.kind, metrics, epochs), flush=True)
                tracker.log_metrics({k: v for k, v in metrics.items()
                                     if not k.endswith("_unix")}, step=epoch + 1)
            ray.train.report(metrics, checkpoint=report_checkpoint,
                             checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")


def _epoch_line(kind: str, metrics: dict, epochs: int) -> str:
    keys = ("train_loss", "val_loss", "dice", "jaccard", "threshold_jaccard", "accuracy",
            "balanced_accuracy", "auc")
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))
    return (f"{kind}: epoch {metrics['epoch']}/{epochs} done, {shown}, "
            f"{metrics['images_per_s']:.1f} img/s")
