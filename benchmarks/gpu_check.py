"""The GPU path, checked without Ray: training steps and predict + Grad-CAM, bf16 against fp32.

For each preset (default ``paper`` and ``lite``) and each of two modes:

* ``fp32``: float32, NCHW (contiguous) tensors, the baseline;
* ``bf16+cl``: bf16 autocast with channels_last weights and inputs, what raysky runs on GPUs;

it times one training step of the segmenter (BCE + Dice, AdamW) and of the classifier (cross
entropy, AdamW) on random inputs at the preset's size, and ``LesionPipeline`` prediction with
Grad-CAM on 600x450 images. Each row gives images/s, the achieved TFLOP/s (FLOPs counted once
per step by ``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the card's dense
bf16 peak (:data:`PEAK_BF16_TFLOPS`, looked up by the device's name), the peak memory, and for
bf16 the largest difference against fp32: of the class probabilities for prediction, of the
first step's loss for training. Ratios against the fp32 row of the same run are printed.

    python benchmarks/gpu_check.py                     # CUDA, paper and lite, ~1-2 min on an H100
    python benchmarks/gpu_check.py --device cpu --preset tiny --steps 2   # the tests' fallback

Every configuration runs on its own: an out-of-memory error or any other failure is reported
in its row and the next configuration runs. Weights are random (``--pretrained-encoder none``):
speed and numerics do not depend on them, and the GPU machine may be offline. CUDA timing
warms up first (``cudnn.benchmark`` picks kernels then) and synchronises around the clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # Dense bf16 tensor-core peaks from the vendors' data sheets; the first name that occurs in
    # torch.cuda.get_device_name() wins, so the more specific names come first.
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 125.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)
MODES: tuple[str, ...] = ("fp32", "bf16+cl")
PREDICT_SHAPE = (450, 600, 3)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s by its name; None for an unknown card or a CPU."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a clock reading covers it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, mode: str):
    from raysky.models.runtime import autocast

    return autocast(device, "bf16" if mode == "bf16+cl" else "fp32")


def _format(mode: str) -> torch.memory_format:
    return torch.channels_last if mode == "bf16+cl" else torch.contiguous_format


def training_step(kind: str, preset: str, device: torch.device, mode: str, batch: int,
                  seed: int = 0) -> tuple[Callable[[], float], int]:
    """A closure running one AdamW step of ``kind`` (returns the loss), and its FLOPs."""
    from raysky.models import create_classifier, create_segmenter, segmentation_loss

    torch.manual_seed(seed)
    fmt = _format(mode)
    if kind == "segmenter":
        model = create_segmenter(preset, pretrained_encoder="none")
    else:
        model = create_classifier(preset, pretrained_encoder="none")
    model = model.to(device).to(memory_format=fmt).train()
    size = model.config.input_size
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=generator).to(device).contiguous(
        memory_format=fmt)
    if kind == "segmenter":
        target = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float().to(device)
    else:
        mask = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float().to(device)
        labels = torch.randint(0, model.config.num_classes, (batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        with _autocast(device, mode):
            if kind == "segmenter":
                loss = segmentation_loss(model(image), target)
            else:
                loss = F.cross_entropy(model(image, mask.contiguous(memory_format=fmt)).float(),
                                       labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    # Counted on a copy of the state, so the timed steps start where an untouched model would.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flops = count_flops(step)
    model.load_state_dict(state)
    optimizer.state.clear()
    return step, flops


def predict_pipeline(preset: str, device: torch.device, mode: str, seed: int = 0):
    """A ``LesionPipeline`` of the preset with random weights, in ``mode``'s precision and layout."""
    from raysky.inference import LesionPipeline
    from raysky.models import create_classifier, create_segmenter
    from raysky.models.checkpoint import LoadedModel, describe, serialize_weights

    torch.manual_seed(seed)
    models = []
    for model in (create_segmenter(preset, pretrained_encoder="none"),
                  create_classifier(preset, pretrained_encoder="none")):
        models.append(LoadedModel(model.eval(), describe(model, preset, serialize_weights(model))))
    pipeline = LesionPipeline(*models, use_gpu=device.type == "cuda",
                              precision="bf16" if mode == "bf16+cl" else "fp32")
    # LesionPipeline turns channels_last on for CUDA; the fp32 baseline stays NCHW everywhere.
    fmt = _format(mode)
    pipeline.segmenter.to(memory_format=fmt)
    pipeline.classifier.to(memory_format=fmt)
    return pipeline


def _memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_config(name: str, device: torch.device, measure: Callable[[], dict]) -> dict:
    """``measure()``'s row, or a row naming the failure (out of memory or another error)."""
    _reset_memory(device)
    try:
        row = {"config": name, **measure(), "peak_memory_gib": _memory(device), "error": None}
    except torch.cuda.OutOfMemoryError as exc:
        row = {"config": name, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    except Exception as exc:  # noqa: BLE001 - one configuration's failure must not end the check
        traceback.print_exc()
        row = {"config": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    _reset_memory(device)
    print(_line(row), flush=True)
    return row


def measure_training(kind: str, preset: str, device: torch.device, mode: str, batch: int,
                     steps: int, warmup: int, peak: float | None) -> dict:
    """images/s, TFLOP/s, share of peak and the first step's loss of one training config."""
    step, flops = training_step(kind, preset, device, mode, batch)
    first_loss = step()
    seconds = timed(step, device, steps, warmup)
    tflops = flops * steps / seconds / 1e12
    return {"images_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
            "flops_per_step": flops, "tflops": tflops,
            "peak_fraction": None if peak is None else tflops / peak, "first_loss": first_loss}


def measure_predict(preset: str, device: torch.device, mode: str, batch: int, steps: int,
                    warmup: int, peak: float | None) -> dict:
    """images/s and TFLOP/s of prediction + Grad-CAM, and its class probabilities."""
    pipeline = predict_pipeline(preset, device, mode)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, PREDICT_SHAPE, dtype=np.uint8) for _ in range(batch)]
    flops = count_flops(lambda: pipeline(images, explain=True))
    seconds = timed(lambda: pipeline(images, explain=True), device, steps, warmup)
    probabilities = np.stack([r.probabilities for r in pipeline(images, explain=True)])
    tflops = flops * steps / seconds / 1e12
    return {"images_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
            "flops_per_step": flops, "tflops": tflops,
            "peak_fraction": None if peak is None else tflops / peak,
            "probabilities": probabilities.tolist()}


def _line(row: dict) -> str:
    if row.get("error"):
        return f"  {row['config']:34s} FAILED: {row['error']}"
    share = "-" if row.get("peak_fraction") is None else f"{100 * row['peak_fraction']:.1f}%"
    memory = "-" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.2f} GiB"
    return (f"  {row['config']:34s} {row['images_per_s']:9.1f} img/s  {row['tflops']:8.4g} "
            f"TFLOP/s  peak {share:>6s}  memory {memory}")


def compare(rows: list[dict]) -> list[dict]:
    """Each bf16 row against the fp32 row of the same work: speed ratio, largest difference."""
    by_name = {r["config"]: r for r in rows}
    out = []
    for row in rows:
        if not row["config"].endswith("bf16+cl") or row.get("error"):
            continue
        base = by_name.get(row["config"].replace("bf16+cl", "fp32"))
        if not base or base.get("error"):
            continue
        entry = {"config": row["config"].rsplit(" ", 1)[0],
                 "speedup": row["images_per_s"] / base["images_per_s"]}
        if "probabilities" in row:
            entry["max_prob_diff"] = float(np.abs(np.asarray(row["probabilities"])
                                                  - np.asarray(base["probabilities"])).max())
        else:
            entry["first_loss_diff"] = abs(row["first_loss"] - base["first_loss"])
        out.append(entry)
    return out


def _open_device(kind: str, threads: int) -> tuple[torch.device, str]:
    """The device to measure on and its name: the current CUDA card, with cuDNN's autotuner
    on, or the CPU with ``threads`` torch threads (0: all cores)."""
    from raysky.models.runtime import set_torch_threads

    if kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
        return device, torch.cuda.get_device_name(device)
    set_torch_threads(threads or None)
    return torch.device("cpu"), "cpu"


def _print_comparisons(comparisons: list[dict]) -> None:
    print("bf16 autocast + channels_last against fp32 (same run):")
    for entry in comparisons:
        diff = (f"largest probability difference {entry['max_prob_diff']:.2e}"
                if "max_prob_diff" in entry else
                f"first-step loss difference {entry['first_loss_diff']:.2e}")
        print(f"  {entry['config']:26s} speed-up {entry['speedup']:5.2f}x  {diff}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", action="append", choices=("paper", "lite", "tiny"),
                        help="repeatable (default: paper and lite)")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--predict-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: all cores)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu)")
    device, name = _open_device(args.device, args.threads)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    presets = args.preset or ["paper", "lite"]
    print(f"device {name}; dense bf16 peak "
          f"{'unknown' if peak is None else f'{peak:g} TFLOP/s'}; torch {torch.__version__}; "
          f"train batch {args.train_batch}, predict batch {args.predict_batch} at "
          f"{PREDICT_SHAPE[1]}x{PREDICT_SHAPE[0]}, {args.steps} steps after {warmup} warm-up",
          flush=True)
    started = time.monotonic()
    rows = []
    for preset in presets:
        for mode in MODES:
            for kind in ("segmenter", "classifier"):
                rows.append(run_config(
                    f"{preset} train {kind} {mode}", device,
                    lambda k=kind, m=mode, p=preset: measure_training(
                        k, p, device, m, args.train_batch, args.steps, warmup, peak)))
            rows.append(run_config(
                f"{preset} predict+gradcam {mode}", device,
                lambda m=mode, p=preset: measure_predict(
                    p, device, m, args.predict_batch, args.steps, warmup, peak)))
    comparisons = compare(rows)
    _print_comparisons(comparisons)
    elapsed = time.monotonic() - started
    print(f"finished in {elapsed:.0f} s")
    figures = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__,
               "train_batch": args.train_batch, "predict_batch": args.predict_batch,
               "steps": args.steps, "warmup": warmup, "seconds": elapsed,
               "rows": [{k: v for k, v in r.items() if k != "probabilities"} for r in rows],
               "bf16_vs_fp32": comparisons}
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
