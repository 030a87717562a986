"""Device, precision and threading choices shared by training, scoring and serving."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions: CLIs and settings classes import PRECISIONS to
# validate flags, and should not pay for loading torch to do so.
PRECISIONS = ("fp32", "bf16")
AUTO = "auto"
TRAIN_PRECISIONS = (AUTO, *PRECISIONS)
"""Training also takes ``auto``: measure both and keep the faster (:func:`choose_precision`)."""
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
TORCH_THREAD_NAME = "raysky-torch"

T = TypeVar("T")


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The plain model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


def select_device(use_gpu: bool = False) -> torch.device:
    """CUDA when asked for and present, else CPU; asking for a GPU that is absent is an error."""
    import torch

    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but torch sees no CUDA device on this node")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA when ``precision='bf16'``, else a no-op context.

    bf16 needs no loss scaling, so the same context serves training and inference on both
    device types.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions; without them bf16 autocast runs ~20x slower."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def choose_precision(requested: str, device: torch.device, step: Callable[[str], None],
                     trials: int = 3, margin: float = 0.95, has_bf16: bool | None = None,
                     timer: Callable[[], float] | None = None) -> tuple[str, dict[str, float]]:
    """Resolve ``auto`` into ``fp32`` or ``bf16``; returns it with the step times measured.

    CUDA takes bf16 where the card supports it. A CPU without bf16 instructions takes fp32
    without measuring. Otherwise ``step(precision)`` (one training step of the real model) is
    timed ``trials`` times each way, interleaved so that noise hits both alike, and bf16 wins
    only when its median is under ``margin`` of fp32's. ``has_bf16`` and ``timer`` default to
    :func:`cpu_has_bf16` and ``time.perf_counter``.
    """
    if requested != AUTO:
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be one of {TRAIN_PRECISIONS}, got {requested!r}")
        return requested, {}
    import time

    import torch

    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32"), {}
    if not (cpu_has_bf16() if has_bf16 is None else has_bf16):
        return "fp32", {}
    timer = timer or time.perf_counter
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in PRECISIONS:  # warm-up: first calls allocate and pick kernels
        step(precision)
    for _ in range(trials):
        for precision in PRECISIONS:
            started = timer()
            step(precision)
            times[precision].append(timer() - started)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return ("bf16" if median["bf16"] < margin * median["fp32"] else "fp32"), median


def prepare_for_device(model: nn.Module, device: torch.device, channels_last: bool | None = None) -> nn.Module:
    """Move ``model`` to ``device``; channels_last defaults on for CUDA, where it pays off."""
    import torch

    model = model.to(device)
    if channels_last if channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def set_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads explicitly and return the count used.

    Ray sets ``OMP_NUM_THREADS=1`` inside actors and Serve replicas, which would leave a CPU
    model on one core; callers pass the CPUs they were granted, or we use all visible cores.
    """
    if num_threads is None or num_threads <= 0:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import torch

    torch.set_num_threads(int(num_threads))
    return int(num_threads)


@functools.cache
def torch_executor() -> ThreadPoolExecutor:
    """The single thread on which this process runs its model work (see :func:`on_torch_thread`).

    Async code hands work to it with ``loop.run_in_executor(torch_executor(), ...)``.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=TORCH_THREAD_NAME)


def on_torch_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` on this process's one torch thread and return its result.

    torch's CPU wheels use GNU OpenMP, which gives every OS thread that enters a parallel
    region its own team of worker threads. Once a process holds more such threads than it has
    cores, libgomp all but stops spin-waiting, and each of the hundreds of small parallel
    regions in a DenseNet forward pays a sleep and a wake-up: on 2 cores inference ran 2.3x
    slower. Ray runs an actor's constructor and its calls, and a Serve replica's user code, on
    different threads, so model loading and inference in actors and replicas go through here,
    and so should :func:`set_torch_threads`, since OpenMP's thread count is per thread.
    """
    if threading.current_thread().name.startswith(TORCH_THREAD_NAME):
        return fn(*args, **kwargs)
    return torch_executor().submit(fn, *args, **kwargs).result()
