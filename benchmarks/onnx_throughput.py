"""ONNX Runtime against PyTorch on this CPU: the scoring pipeline without heatmaps.

    .venv/bin/python benchmarks/onnx_throughput.py --data raysky/sample_data/ham10000_sample/images --preset lite \
        --batch-size 16 --threads 2 --repeats 5

Both engines run :class:`raysky.inference.LesionPipeline` (segmenter, lesion mask, classifier,
calibrated probabilities, skin tone; ``explain=False``) in this process over the same decoded
images, in batches of ``--batch-size``, with the same thread count (``torch.set_num_threads``
and ONNX Runtime's ``intra_op_num_threads``). Printed, as ONNX Runtime / PyTorch ratios of
images/s (the median of ``--repeats`` timed passes after a warm-up each):

* pipeline: the whole per-batch pipeline, what ``raysky score --engine onnx`` changes;
* segmenter / classifier: the networks alone on prepared input tensors.

The models are the preset's architecture with ImageNet encoders (``--weights imagenet``, the
default, from the weight package the lite preset ships with) or random weights (``none``);
throughput does not depend on the weights. The export itself (made once per scoring run) is
timed and printed apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raysky.data.archive import read_archive
from raysky.data.images import decode_image
from raysky.inference import LesionPipeline, lesion_mask_input
from raysky.models import create_classifier, create_segmenter, save_checkpoint
from raysky.models.preprocess import metadata_to_tensors, model_input
from raysky.models.runtime import set_torch_threads
from raysky.onnx.export import export_checkpoint
from raysky.score.onnx_engine import onnx_pipeline


def images_per_second(runs: list[Callable[[], None]], images: int, repeats: int) -> list[float]:
    """Median images/s of ``repeats`` calls of each of ``runs``, interleaved so that a busy
    machine slows every engine alike (one untimed warm-up call each first)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [images / statistics.median(spent) for spent in times]


def checkpoints(preset: str, weights: str, root: Path) -> dict[str, str]:
    """A segmenter and a classifier of ``preset`` with ``weights`` encoders, saved under ``root``."""
    torch.manual_seed(0)
    save_checkpoint(create_segmenter(preset, pretrained_encoder=weights), str(root / "seg"), preset)
    save_checkpoint(create_classifier(preset, pretrained_encoder=weights), str(root / "cls"),
                    preset)
    return {"segmenter": str(root / "seg"), "classifier": str(root / "cls")}


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _network_rates(engines: tuple, image_batches: list, repeats: int) -> dict[str, list[float]]:
    """Images per second of each engine's segmenter and classifier alone, on inputs made once
    (resized, normalised, masked) so that only the networks are timed."""
    reference = engines[0]
    seg_in = [model_input(i, reference.segmenter_meta) for i in image_batches]
    cls_in = [model_input(i, reference.classifier_meta) for i in image_batches]
    with torch.inference_mode():
        masks = [lesion_mask_input(torch.sigmoid(reference.segmenter(x))[:, 0], c.shape[-2:])
                 for x, c in zip(seg_in, cls_in, strict=True)]
    meta = [metadata_to_tensors(reference.vocab.encode_batch([None] * len(x), [None] * len(x),
                                                            [None] * len(x))) for x in cls_in]

    def networks(pipeline, part: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for x, c, m, md in zip(seg_in, cls_in, masks, meta, strict=True):
                    if part == "segmenter":
                        pipeline.segmenter(x)
                    else:
                        pipeline.classifier.classify_with_features(
                            *pipeline.classifier.encode(c, m), md)
        return run

    images = sum(len(x) for x in seg_in)
    return {part: images_per_second([networks(p, part) for p in engines], images, repeats)
            for part in ("segmenter", "classifier")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="raysky/sample_data/ham10000_sample/images", help="folder of images to score")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--weights", default="imagenet", choices=("imagenet", "none"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    set_torch_threads(args.threads)
    records = read_archive(args.data)
    images = [np.asarray(decode_image(Path(r.image_uri).read_bytes(), r.image_uri))
              for r in records]
    metadata = [{}] * len(images)
    with tempfile.TemporaryDirectory() as tmp:
        uris = checkpoints(args.preset, args.weights, Path(tmp))
        started = time.perf_counter()
        exports = {kind: export_checkpoint(uri).model for kind, uri in uris.items()}
        export_s = time.perf_counter() - started
        torch_pipeline = LesionPipeline.from_uris(uris["segmenter"], uris["classifier"])
    ort_pipeline = onnx_pipeline(exports["segmenter"], exports["classifier"], args.threads)

    groups = list(zip(batches(images, args.batch_size), batches(metadata, args.batch_size),
                      strict=True))

    def whole(pipeline) -> Callable[[], None]:
        return lambda: [pipeline(i, m, explain=False) for i, m in groups]

    engines = (torch_pipeline, ort_pipeline)
    rates = {"pipeline": images_per_second([whole(p) for p in engines], len(images), args.repeats),
             **_network_rates(engines, [i for i, _ in groups], args.repeats)}
    print(f"{args.preset} ({args.weights} encoders), {len(images)} images from {args.data}, "
          f"batches of {args.batch_size}, {args.threads} threads, median of {args.repeats}; "
          f"export of both models: {export_s:.0f} s (once per scoring run)")
    print(f"{'':<12}{'PyTorch img/s':>15}{'ORT img/s':>12}{'ORT / PyTorch':>15}")
    for name, (torch_rate, ort_rate) in rates.items():
        print(f"{name:<12}{torch_rate:>15.1f}{ort_rate:>12.1f}{ort_rate / torch_rate:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
