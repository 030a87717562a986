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
from dataclasses import dataclass, field
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
from raysky.train.recipe import (
    MEMORY_LAYOUTS,
    averaged,
    choose_memory_format,
    freeze_early_layers,
    keep_frozen_in_eval,
    make_average,
)
from raysky.train.settings import LoopConfig
from raysky.train.tasks import make_task, measure_precision
from raysky.train.tracking import Tracker, training_params

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
MAX_UNREADABLE_SHARE = 0.01
"""An epoch that cannot read more than this share of its training images fails."""

SHUFFLE_BUFFER = 256
"""Rows each worker's shuffle buffer mixes: batches draw from several cached blocks."""

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


def make_optimizer(model: nn.Module, config: LoopConfig, steps_per_epoch: int
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over at most one epoch, then cosine decay to 1% of each
    group's peak rate (see :func:`parameter_groups`)."""
    settings = config.settings
    groups = parameter_groups(unwrap_ddp(model), settings.lr, settings.encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    total = max(1, steps_per_epoch * settings.epochs)
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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def rank_zero_choice(choice: list, device: torch.device) -> list:
    """``choice`` as the worker of rank 0 made it, on every worker of the process group (as
    given where there is none). DDP needs every replica's parameters in one memory layout, and
    a step timed on each worker separately can come out differently on two of them."""
    if not _distributed():
        return choice
    shared = list(choice)
    torch.distributed.broadcast_object_list(
        shared, src=0, device=device if device.type == "cuda" else None)
    return shared


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
    extra = {"epoch": metrics["epoch"], "run": config.settings.name,
             "metrics": to_jsonable(metrics), "settings": config.record, "initial_weights": state["initial_weights"],
             "hyperparameters": state["hyperparameters"],
             "provenance": config.provenance, "machine": machine_description(),
             "training_seconds": sum(float(h.get("train_seconds", 0.0)) for h in history)}
    save_checkpoint(unwrap_ddp(model), directory, config.settings.preset, extra=extra)
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
                             f"run trains {list(task.classes)}; train it under a new name")
        model.load_state_dict(loaded.model.state_dict())
        # weights_only: anything that can write to the run's storage must not be able to run
        # code on the workers. The optimizer and scheduler state are plain tensors and numbers.
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu",
                           weights_only=True)
        state.setdefault("initial_weights", loaded.meta.get("extra", {}).get("initial_weights", {}))
        if "model" in state:
            # With a moving average the checkpoint holds the average; training goes on from
            # the raw weights.
            model.load_state_dict(state["model"])
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


@dataclass
class _Worker:
    """What one training worker holds from epoch to epoch."""

    config: LoopConfig
    task: Any
    model: nn.Module
    average: Any
    frozen: list
    optimizer: Any
    scheduler: Any
    device: torch.device
    precision: str
    rank: int
    world: int
    steps_per_epoch: int
    initial_weights: dict
    pretrained: dict
    started: float
    start_epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    first_step_at: float | None = None
    tracker: Tracker | None = None


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function; ``loop_config`` is :meth:`LoopConfig.to_dict` of the
    config :mod:`raysky.train.driver` built. Three steps, as in Ray's own examples: set up
    (model, resume, optimizer), then per epoch train on this worker's shard, and validate and
    report."""
    import ray.train
    from ray.data import DataContext

    config = LoopConfig.from_dict(loop_config)
    settings = config.settings
    DataContext.get_current().enable_progress_bars = False
    worker = _setup(config)
    if worker.start_epoch >= settings.epochs:
        if worker.rank == 0:
            print(f"{worker.task.kind}: already trained for {worker.start_epoch} epochs, nothing "
                  "to do", flush=True)
        return
    worker.tracker = Tracker(config.tracking, enabled=worker.rank == 0)
    if worker.start_epoch == 0:
        worker.tracker.log_params(training_params(worker.task.kind, config.record,
                                                  config.provenance))
    worker.tracker.set_tags({"system": machine_description(), "raysky.precision": worker.precision})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_epoch = worker.steps_per_epoch * settings.batch_size * worker.world
    progress = Progress(f"{worker.task.kind} [{settings.name}]",
                        total=per_epoch * (settings.epochs - worker.start_epoch), unit="img",
                        interval=settings.progress_interval)
    for epoch in range(worker.start_epoch, settings.epochs):
        stats = _train_epoch(worker, train_shard, epoch, progress)
        _validate_and_report(worker, val_shard, epoch, stats)


def _setup(config: LoopConfig) -> _Worker:
    """Build (or restore) the model, measure precision and memory layout, wrap it for DDP and
    make the optimizer; a resumed run continues its optimizer, schedule, average and RNG."""
    import ray.train
    import ray.train.torch

    started = time.time()
    set_torch_threads(config.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = make_task(config, rank)
    device = ray.train.torch.get_device() if config.settings.gpu else torch.device("cpu")
    torch.manual_seed(config.settings.seed)
    model = task.build_model()
    checkpoint = ray.train.get_checkpoint()
    state = _restore(model, checkpoint, task) if checkpoint else None
    initial_weights = _initial_weights(model, config, state, task.kind, rank)
    frozen = freeze_early_layers(model, task.recipe.frozen_blocks)
    model = prepare_for_device(model, device, channels_last=False)
    precision, memory_format = _measure_step(task, model, device, config, rank)
    task.memory_format = memory_format
    model = model.to(memory_format=memory_format)
    average = make_average(model, task.recipe.ema_decay)
    if state is not None and average is not None and "average" in state:
        average.load_state_dict(state["average"])
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    steps_per_epoch = max(1, config.train_rows // world // config.settings.batch_size)
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch)
    worker = _Worker(config, task, model, average, frozen, optimizer, scheduler, device,
                     precision, rank, world, steps_per_epoch, initial_weights,
                     _pretrained_counts(initial_weights), started)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        worker.start_epoch, worker.global_step = state["epoch"], state["global_step"]
        worker.history = state["history"]
        _restore_rng(state.get("rng"))
        if rank == 0 and worker.start_epoch:
            print(f"{task.kind}: resuming from the checkpoint of epoch {worker.start_epoch}",
                  flush=True)
    return worker


def _initial_weights(model: nn.Module, config: LoopConfig, state: dict | None, kind: str,
                     rank: int) -> dict:
    if state is not None:
        return state["initial_weights"]
    spec = config.settings.pretrained_encoder or "none"
    initial = {k: v.to_dict() for k, v in initialise_model(model, spec).items()}
    if rank == 0:
        for name, record in initial.items():
            print(f"{kind}: {name} starts from {record['source']} "
                  f"({record['tensors_loaded']} of {record['tensors_total']} tensors)", flush=True)
    return initial


def _pretrained_counts(initial_weights: dict) -> dict:
    return {"pretrained_tensors_loaded": sum(r["tensors_loaded"] for r in initial_weights.values()),
            "pretrained_tensors_total": sum(r["tensors_total"] for r in initial_weights.values())}


def _measure_step(task, model: nn.Module, device: torch.device, config: LoopConfig,
                  rank: int) -> tuple[str, torch.memory_format]:
    """Resolve ``auto`` precision, then the memory layout, by timing this model's own step on
    the worker of rank 0, which every other worker then follows (:func:`rank_zero_choice`)."""
    if rank != 0 and _distributed():
        precision, layout = rank_zero_choice([None, None], device)
    else:
        precision, layout = _timed_choice(task, model, device, config)
        rank_zero_choice([precision, layout], device)
    return precision, MEMORY_LAYOUTS[layout]


def _timed_choice(task, model: nn.Module, device: torch.device,
                  config: LoopConfig) -> tuple[str, str]:
    """The precision and the name of the memory layout this model's training step runs
    fastest in, measured here."""
    batch_size = config.settings.batch_size
    precision, timing = measure_precision(task, model, device, config.settings.precision,
                                          batch_size)
    inputs = task.inputs(task.synthetic_batch(batch_size), device, train=True)

    def step(probe: nn.Module, memory_format: torch.memory_format) -> None:
        probe_inputs = {**inputs, "image": inputs["image"].contiguous(memory_format=memory_format)}
        with autocast(device, precision):
            loss = task.loss(probe, probe_inputs)
        loss.backward()
        probe.zero_grad(set_to_none=True)

    layout, layout_timing = choose_memory_format(model, step, device)
    if timing or layout_timing:
        measured = {**timing, **layout_timing}
        print(f"{task.kind}: precision {precision}, {layout} (measured step: "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in measured.items()) + ")",
              flush=True)
    return precision, layout


def _train_epoch(worker: _Worker, shard, epoch: int, progress: Progress) -> dict[str, Any]:
    """One pass over this worker's shard; returns the epoch's loss and image counts, summed
    over all workers."""
    config, task, model = worker.config, worker.task, worker.model
    model.train()
    keep_frozen_in_eval(worker.frozen)
    task.augmenter.start_epoch(epoch)
    epoch_start = time.time()
    loss_sum, seen, unreadable, first_errors = 0.0, 0, 0, []
    batches = shard.iter_batches(batch_size=config.settings.batch_size, batch_format="numpy",
                                 drop_last=True, prefetch_batches=2,
                                 local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                 local_shuffle_seed=config.settings.seed * 1000 + epoch)
    for step, batch in enumerate(batches, start=1):
        batch, errors = readable_rows(batch)
        unreadable += len(errors)
        first_errors.extend(errors[: max(0, 3 - len(first_errors))])
        if not len(batch["image"]):
            # Every rank must step for DDP; a batch with nothing readable cannot.
            raise RuntimeError(f"{task.kind}: epoch {epoch + 1}: no image of a batch of "
                               f"{len(errors)} could be read ({'; '.join(errors[:3])})")
        loss = _step(worker, task.inputs(batch, worker.device, train=True))
        n = len(batch["image"])
        loss_sum += loss * n
        seen += n
        if worker.first_step_at is None:
            worker.first_step_at = time.time()
        if worker.rank == 0:
            progress.update(n * worker.world, extra=f"epoch {epoch + 1}/{config.settings.epochs}, "
                            f"step {step}/{worker.steps_per_epoch}, loss {loss:.4f}")
    train_seconds = time.time() - epoch_start
    loss_total, seen_total, unreadable_total = _all_reduce_sum(
        [loss_sum, float(seen), float(unreadable)], worker.device)
    _check_unreadable(task.kind, epoch, int(unreadable_total), int(seen_total), first_errors)
    return {"train_loss": loss_total / max(seen_total, 1.0), "train_images": int(seen_total),
            "train_seconds": train_seconds,
            "images_per_s": seen_total / train_seconds if train_seconds > 0 else 0.0}


def _step(worker: _Worker, inputs: dict[str, Any]) -> float:
    """One optimizer step (and moving-average update) on one batch; returns its loss."""
    with autocast(worker.device, worker.precision):
        loss = worker.task.loss(worker.model, inputs)
    worker.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    worker.optimizer.step()
    worker.scheduler.step()
    if worker.average is not None:
        worker.average.update_parameters(unwrap_ddp(worker.model))
    worker.global_step += 1
    return float(loss.detach())


def _validate_and_report(worker: _Worker, shard, epoch: int, stats: dict[str, Any]) -> None:
    """Rank 0 validates (the moving average, when the recipe keeps one) and checkpoints; every
    rank reports, as Ray Train requires."""
    import ray.train

    config, task, scheduler = worker.config, worker.task, worker.scheduler
    metrics: dict[str, Any] = {
        "epoch": epoch + 1, "step": worker.global_step, **stats,
        "lr": scheduler.get_last_lr()[-1], "encoder_lr": scheduler.get_last_lr()[0],
        "precision": worker.precision, "start_epoch": worker.start_epoch,
        "first_step_unix": worker.first_step_at, "worker_started_unix": worker.started,
        **worker.pretrained,
    }
    report_checkpoint = None
    with tempfile.TemporaryDirectory() as directory:
        if worker.rank == 0:
            evaluated = averaged(worker.model, worker.average)
            metrics.update(task.evaluate(evaluated, shard.iter_batches(
                batch_size=config.settings.batch_size, batch_format="numpy"), worker.device,
                worker.precision))
            _score(metrics, config)
            worker.history.append(to_jsonable(metrics))
            state = {"epoch": epoch + 1, "global_step": worker.global_step,
                     "history": worker.history, "optimizer": worker.optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "initial_weights": worker.initial_weights, "rng": _rng_state(),
                     "hyperparameters": config.hyperparameters}
            if worker.average is not None:
                # The checkpoint's weights are the average; resuming needs the raw ones too.
                state["average"] = worker.average.state_dict()
                state["model"] = unwrap_ddp(worker.model).state_dict()
            write_checkpoint(directory, evaluated, config, state, metrics, worker.history)
            report_checkpoint = ray.train.Checkpoint.from_directory(directory)
            print(_epoch_line(task.kind, metrics, config.settings.epochs), flush=True)
            if worker.tracker is not None:
                worker.tracker.log_metrics({k: v for k, v in metrics.items()
                                            if not k.endswith("_unix")}, step=epoch + 1)
        ray.train.report(metrics, checkpoint=report_checkpoint,
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")


def _epoch_line(kind: str, metrics: dict, epochs: int) -> str:
    keys = ("train_loss", "val_loss", "dice", "jaccard", "threshold_jaccard", "accuracy",
            "balanced_accuracy", "auc")
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))
    return (f"{kind}: epoch {metrics['epoch']}/{epochs} done, {shown}, "
            f"{metrics['images_per_s']:.1f} img/s")
