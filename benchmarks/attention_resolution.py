"""Where Grad-CAM can show the lesion: lesion focus at the encoder's last map and at earlier,
finer stages, on labelled images with ground-truth masks.

The paper claims that the classifier's attention rests on the lesion. Grad-CAM can only say so
at the resolution of the map it explains: at 160 px, EfficientNet-Lite0's last map is 5x5 and
a lesion covering a quarter of the image is a handful of cells. This script explains the same
predictions (the classifier's own predicted class, its own masks from the segmenter) at the
last map (raysky's explainer, what scoring and serving return) and, with pytorch-grad-cam's
hooks, at the outputs of the stride-16 and stride-8 stages, and prints per layer the median
lesion focus (the share of heatmap mass inside the ground-truth lesion) against the median
lesion area (what a heatmap blind to the lesion would score), with lesion-resampled intervals.

    python benchmarks/attention_resolution.py --data ../shared/data/ham10000 \\
        --segmenter SEG_CKPT --classifier CLS_CKPT --limit 400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.data.images import load_mask, load_rgb  # noqa: E402
from raysky.data.records import DatasetRef  # noqa: E402
from raysky.data.splits import read_split  # noqa: E402
from raysky.explain.gradcam import GradCAMExplainer, lesion_focus  # noqa: E402
from raysky.inference import lesion_mask_input, segment_probabilities  # noqa: E402
from raysky.models.checkpoint import load_checkpoint  # noqa: E402
from raysky.models.preprocess import metadata_to_tensors, model_input  # noqa: E402


def stage_layers(encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The last block of each stride of a timm EfficientNet encoder, by stride."""
    layers, stride = {}, 2
    for index, block in enumerate(encoder.blocks):
        first = block[0]
        conv = getattr(first, "conv_dw", None) or getattr(first, "conv_pw", None)
        stride *= conv.stride[0] if conv is not None and index else 1
        layers[f"stride {stride}"] = block
    return layers


class _Bound(torch.nn.Module):
    """The classifier with one batch's masks and metadata bound: image in, logits out."""

    def __init__(self, model, mask, metadata):
        super().__init__()
        self.model, self.mask, self.metadata = model, mask, metadata

    def forward(self, image):
        return self.model(image, self.mask, self.metadata)


def _layer_heatmap(model, layer, image: torch.Tensor, mask: torch.Tensor, metadata: dict
                   ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Grad-CAM maps at ``layer`` (None: the last map, as raysky explains) and that layer's grid."""
    if layer is None:
        heat = GradCAMExplainer(model)(image, mask, metadata).heatmaps
        return heat, tuple(model.encode(image[:1], mask[:1])[0].shape[-2:])
    from pytorch_grad_cam import GradCAM

    with GradCAM(model=_Bound(model, mask, metadata), target_layers=[layer]) as cam:
        heat = torch.from_numpy(cam(input_tensor=image, targets=None))
        return heat, tuple(cam.activations_and_grads.activations[0].shape[-2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="ham10000")
    parser.add_argument("--split", default="val")
    parser.add_argument("--segmenter", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from raysky.metrics.intervals import bootstrap_intervals

    torch.set_num_threads(2)
    seg = load_checkpoint(args.segmenter, "segmenter")
    cls = load_checkpoint(args.classifier, "classifier")
    model = cls.model.eval()
    records = [r for r in read_split(DatasetRef(args.data, args.format, split=args.split)) if r.mask_uri]
    records = sorted(records, key=lambda r: r.image_id)[: args.limit]
    layers = {"last map (raysky)": None, **{k: v for k, v in
                                           stage_layers(model.full_encoder).items()
                                           if k in ("stride 16", "stride 8")}}
    focus: dict[str, list[float]] = {name: [] for name in layers}
    areas, lesions, shapes = [], [], {}
    for start in range(0, len(records), args.batch_size):
        batch = records[start:start + args.batch_size]
        images = [np.asarray(load_rgb(r.image_uri)) for r in batch]
        truths = torch.stack([torch.from_numpy(
            (load_mask(r.mask_uri) > 0).astype(np.float32)) for r in batch])
        probs = segment_probabilities(seg.model.eval(), seg.meta, images, torch.device("cpu"))
        image = model_input(images, cls.meta)
        mask = lesion_mask_input(probs, image.shape[-2:])
        metadata = metadata_to_tensors(model.vocab.encode_batch(
            [r.age for r in batch], [r.sex for r in batch], [r.site for r in batch]))
        size = tuple(truths.shape[-2:])
        for name, layer in layers.items():
            heat, shapes[name] = _layer_heatmap(model, layer, image, mask, metadata)
            heat = torch.nn.functional.interpolate(heat[:, None].float(), size=size,
                                                   mode="bilinear", align_corners=False)[:, 0]
            focus[name].extend(lesion_focus(heat, truths).tolist())
        areas.extend(truths.flatten(1).mean(1).tolist())
        lesions.extend(r.lesion_id or r.image_id for r in batch)
    lesions_arr = np.asarray(lesions)
    print(f"{len(records)} {args.split} images with ground-truth masks; classifier input "
          f"{cls.meta['input_size']} px")
    area = bootstrap_intervals({"median": np.nanmedian}, np.asarray(areas), clusters=lesions_arr)
    print(f"{'lesion area (chance)':<24}{'':>10}{_fmt(area['median'])}")
    for name, values in focus.items():
        figure = bootstrap_intervals({"median": np.nanmedian}, np.asarray(values),
                                     clusters=lesions_arr)
        grid = "x".join(map(str, shapes[name]))
        print(f"{name:<24}{grid:>10}{_fmt(figure['median'])}")
    return 0


def _fmt(value: dict) -> str:
    return f"  median {value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
