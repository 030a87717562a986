"""Cost of Grad-CAM heatmaps relative to prediction alone, and the bf16 speed-up on CPU.

Measures, on one preset, batch size and thread count, in one run:
  1. prediction only (segmenter + classifier, inference mode);
  2. prediction + raysky's Grad-CAM (one forward pass, backward through fusion/head only);
  3. prediction + pytorch-grad-cam as its README shows (a second forward pass through a wrapped
     model, backward through both DenseNet encoders), the straightforward alternative;
and repeats 1-2 under bf16 autocast. Prints images/s and ratios against (1).

    python benchmarks/explain_cost.py --preset lite --batch-size 16 --batches 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _time(fn, batches: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return time.perf_counter() - start


def _reference_rate(pipe, images: list[np.ndarray], batches: int) -> float:
    """Images per second of the prediction pass plus pytorch-grad-cam's Grad-CAM on the same
    feature layers raysky explains (each encoder the classifier has: one with ``lite``'s shared
    lesion view, two with the paper's second encoder)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from raysky.explain import feature_layer
    from raysky.models.preprocess import model_input

    model = pipe.classifier

    class ImageAndMask(torch.nn.Module):
        """pytorch-grad-cam calls model(input); the mask rides along as a fixed attribute."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.mask = None

        def forward(self, x):
            return self.model(x, self.mask)

    wrapped = ImageAndMask()
    layers = [feature_layer(encoder) for encoder in (model.full_encoder, model.lesion_encoder)
              if encoder is not None]

    def reference():
        preds = pipe(images, explain=False)  # the prediction pass
        x = model_input(images, pipe.classifier_meta)
        wrapped.mask = torch.ones(x.shape[0], 1, *x.shape[-2:])
        targets = [ClassifierOutputTarget(pipe.classes.index(p.predicted_class)) for p in preds]
        with GradCAM(model=wrapped, target_layers=layers) as cam:
            cam(input_tensor=x, targets=targets)

    return len(images) * batches / _time(reference, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite", choices=["tiny", "lite", "paper"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()

    from raysky.inference import LesionPipeline
    from raysky.models import create_classifier, create_segmenter
    from raysky.models.checkpoint import LoadedModel, describe, serialize_weights
    from raysky.models.runtime import set_torch_threads

    threads = set_torch_threads(args.threads or None)
    torch.manual_seed(0)

    def loaded(model):
        return LoadedModel(model.eval(), describe(model, args.preset, serialize_weights(model)))

    seg, cls = loaded(create_segmenter(args.preset)), loaded(create_classifier(args.preset))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (450, 600, 3), dtype=np.uint8) for _ in range(args.batch_size)]
    n = args.batch_size * args.batches
    results: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        pipe = LesionPipeline(seg, cls, precision=precision)
        results[f"predict {precision}"] = n / _time(lambda p=pipe: p(images, explain=False), args.batches)
        results[f"predict+gradcam {precision}"] = n / _time(lambda p=pipe: p(images, explain=True), args.batches)

    results["predict+pytorch-grad-cam fp32"] = _reference_rate(LesionPipeline(seg, cls), images,
                                                               args.batches)

    base = results["predict fp32"]
    print(f"preset={args.preset} batch={args.batch_size} images={n} threads={threads} input=600x450")
    for name, rate in results.items():
        print(f"  {name:32s} {rate:8.2f} img/s   ratio vs predict fp32: {rate / base:5.2f}")
    print(f"heatmap cost (raysky Grad-CAM): throughput ratio {results['predict+gradcam fp32'] / base:.2f} "
          f"(1.00 = free)")
    print(f"bf16 autocast speed-up (predict+gradcam): "
          f"{results['predict+gradcam bf16'] / results['predict+gradcam fp32']:.2f}x")


if __name__ == "__main__":
    main()
