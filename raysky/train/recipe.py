"""The training recipe's mechanics that are not the loop itself: frozen early layers, the
moving average of the weights, and the memory layout a measured step picks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from raysky.models.pretrained import model_encoders
from raysky.models.runtime import unwrap_ddp


def _early_layers(encoder: nn.Module, blocks: int) -> list[nn.Module]:
    """The stem and first ``blocks`` blocks of a timm EfficientNet or DenseNet encoder."""
    if hasattr(encoder, "conv_stem") and hasattr(encoder, "blocks"):
        return [encoder.conv_stem, encoder.bn1, *list(encoder.blocks)[:blocks]]
    features = getattr(encoder, "features", None)
    if features is not None and hasattr(features, "conv0"):
        stages = [m for name, m in features.named_children()
                  if name.startswith(("denseblock", "transition"))]
        return [features.conv0, features.norm0, *stages[:blocks]]
    raise ValueError(f"{type(encoder).__name__}: frozen_blocks supports EfficientNet and "
                     "DenseNet encoders; set frozen_blocks=None in the recipe for this one")


def freeze_early_layers(model: nn.Module, blocks: int | None) -> list[nn.Module]:
    """Freeze every encoder's stem and first ``blocks`` blocks (``None``: nothing); return the
    frozen modules, whose batch norms :func:`keep_frozen_in_eval` keeps in eval mode.

    ImageNet's edge and colour detectors need no fine-tuning, and on a CPU the backward pass
    through their large feature maps is the costliest part of a step (measured: Lite0 at
    160 px trains 1.6x faster with its stem and first two blocks frozen).
    """
    if blocks is None:
        return []
    frozen = [layer for encoder in model_encoders(model).values()
              for layer in _early_layers(encoder, blocks)]
    for layer in frozen:
        layer.requires_grad_(False)
    return frozen


def keep_frozen_in_eval(frozen: list[nn.Module]) -> None:
    """Put frozen layers back in eval mode after ``model.train()``: their batch-norm
    statistics stay ImageNet's instead of drifting with batches they no longer learn from."""
    for layer in frozen:
        layer.eval()


def make_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (``decay`` 0: none).

    Validation and the checkpoints use the average: over a short CPU schedule it is a
    cheap ensemble of the last few hundred steps and scores steadier than the last step.
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(unwrap_ddp(model), multi_avg_fn=get_ema_multi_avg_fn(decay),
                         use_buffers=True)


def averaged(model: nn.Module, average: torch.optim.swa_utils.AveragedModel | None) -> nn.Module:
    """The model to validate and save: the average when there is one."""
    return average.module if average is not None else unwrap_ddp(model)


MEMORY_LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
"""The memory layouts a training step is timed in, by the names logs and workers use."""


def choose_memory_format(model: nn.Module, step: Callable[[nn.Module, torch.memory_format], None],
                         device: torch.device, trials: int = 3, margin: float = 0.95
                         ) -> tuple[str, dict[str, float]]:
    """channels_last or NCHW, whichever a measured training step of this model runs faster.

    CUDA takes channels_last without measuring. On CPUs it depends on the model and the
    kernels (measured here: 1.6x faster for Lite0 at 128-160 px), so ``step(probe, format)``
    is timed on a copy each way, interleaved, and channels_last wins when its median is under
    ``margin`` of NCHW's. Returns the layout's name in :data:`MEMORY_LAYOUTS` (a name, so that
    workers can exchange it) and the median times.
    """
    if device.type == "cuda":
        return "channels_last", {}
    probes = {name: copy.deepcopy(unwrap_ddp(model)).to(memory_format=fmt).train()
              for name, fmt in MEMORY_LAYOUTS.items()}
    times: dict[str, list[float]] = {name: [] for name in MEMORY_LAYOUTS}
    for name, probe in probes.items():  # warm-up: first calls allocate and pick kernels
        step(probe, MEMORY_LAYOUTS[name])
    for _ in range(trials):
        for name, probe in probes.items():
            started = time.perf_counter()
            step(probe, MEMORY_LAYOUTS[name])
            times[name].append(time.perf_counter() - started)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = "channels_last" if median["channels_last"] < margin * median["nchw"] else "nchw"
    return best, median
