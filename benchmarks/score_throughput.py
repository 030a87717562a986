"""Throughput and memory of ``raysky score``, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/score_throughput.py --data raysky/sample_data/ham10000_sample --preset lite \
        --batch-size 16 --images 128 --threads 2

Figures (same preset, batch size and torch thread count everywhere):

* model floor: end-to-end images/s over segmenter + classifier forward passes on pre-decoded
  tensors in one process (target >= 0.85);
* heatmaps: end-to-end with Grad-CAM over end-to-end without it (target >= 0.85);
* plain loop: end-to-end over a straightforward single-process loop (PIL decode, the models,
  pytorch-grad-cam used as its README shows, pandas to Parquet);
* memory: peak memory of the whole local Ray cluster (driver, GCS, raylet, workers; PSS, so
  shared object-store pages are counted once) scoring 10N images over scoring N (target
  <= 1.2).

Models are untrained: throughput does not depend on the weights. End-to-end runs use one model
worker holding ``--threads`` CPUs on a private local Ray; runs are timed after a warm-up run.
Every job pays a fixed start-up (planning, starting the model actor, loading checkpoints), so
end-to-end images/s are steady-state rates: each configuration scores N and 10N images, and
the rate is 9N over the difference of the two times. The start-up is printed on its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from PIL import Image

from raysky import storage
from raysky.data.archive import read_archive
from raysky.data.images import encode_png
from raysky.models import create_classifier, create_segmenter, load_checkpoint, save_checkpoint
from raysky.models.preprocess import images_to_tensor, metadata_to_tensors, resize_map
from raysky.models.runtime import set_torch_threads
from raysky.score import ScoreSettings, score_archive


def make_archive(sources: list[str], count: int, root: Path) -> Path:
    """``count`` image files under ``root``, cycling through ``sources`` with unique names."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[i % len(sources)]
        shutil.copy(source, root / f"img{i:07d}{Path(source).suffix.lower()}")
    return root


class MemorySampler:
    """Peak summed PSS of this process and all its descendants (the private Ray cluster)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def end_to_end(archive: Path, out: Path, ckpt: dict, args, heatmaps: bool = True) -> float:
    """Seconds ``score_archive`` takes on a fresh output (Ray already started and warm)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = score_archive(ScoreSettings(
        input=str(archive), output=str(out), heatmaps=heatmaps, batch_size=args.batch_size,
        workers=1, cpus_per_worker=args.threads, rows_per_file=1000, progress=False, **ckpt))
    assert summary.scored_error == 0, summary.totals
    return time.perf_counter() - start


def steady_state(n: int, small_s: float, big_n: int, big_s: float) -> tuple[float, float]:
    """(images/s once running, start-up seconds) from jobs of ``n`` and ``big_n`` images.

    Models each job as start-up + images / rate.
    """
    rate = (big_n - n) / (big_s - small_s)
    return rate, small_s - n / rate


def model_floor(arrays: list[np.ndarray], ckpt: dict, batch_size: int) -> float:
    """Images/s of segmenter + classifier forward passes on tensors prepared in advance."""
    seg, cls = load_checkpoint(ckpt["segmenter"]), load_checkpoint(ckpt["classifier"])
    seg_meta, cls_meta = seg.meta, cls.meta
    batches = []
    for i in range(0, len(arrays), batch_size):
        chunk = arrays[i:i + batch_size]
        batches.append((
            images_to_tensor(chunk, seg_meta["input_size"], **seg_meta["normalization"]),
            images_to_tensor(chunk, cls_meta["input_size"], **cls_meta["normalization"]),
        ))
    vocab = cls.model.vocab
    with torch.inference_mode():
        start = time.perf_counter()
        for seg_in, cls_in in batches:
            prob = torch.sigmoid(seg.model(seg_in))
            mask = (torch.nn.functional.interpolate(prob, size=cls_in.shape[-2:], mode="bilinear")
                    > 0.5).float()
            n = len(cls_in)
            cls.model(cls_in, mask,
                      metadata_to_tensors(vocab.encode_batch([None] * n, [None] * n, [None] * n)))
        elapsed = time.perf_counter() - start
    return len(arrays) / elapsed


class _SingleInput(torch.nn.Module):
    """pytorch-grad-cam calls ``model(input_tensor)``; the mask and metadata ride along."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier
        self.mask = None
        self.metadata = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(image, self.mask, self.metadata)


def plain_loop(files: list[str], ckpt: dict, batch_size: int, out: Path) -> float:
    """Images/s of a straightforward single-process loop, pytorch-grad-cam as its README shows."""
    from pytorch_grad_cam import GradCAM

    from raysky.explain import feature_layer

    seg, cls = load_checkpoint(ckpt["segmenter"]), load_checkpoint(ckpt["classifier"])
    seg_meta, cls_meta = seg.meta, cls.meta
    wrapper = _SingleInput(cls.model)
    target_layers = [feature_layer(cls.model.full_encoder),
                     feature_layer(cls.model.lesion_encoder)]
    classes = cls.classes
    rows = []
    start = time.perf_counter()
    with GradCAM(model=wrapper, target_layers=target_layers) as cam:
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in chunk]
            with torch.no_grad():
                seg_prob = torch.sigmoid(seg.model(images_to_tensor(
                    arrays, seg_meta["input_size"], **seg_meta["normalization"])))[:, 0]
            cls_in = images_to_tensor(arrays, cls_meta["input_size"], **cls_meta["normalization"])
            wrapper.mask = (torch.nn.functional.interpolate(
                seg_prob[:, None], size=cls_in.shape[-2:], mode="bilinear") > 0.5).float()
            n = len(arrays)
            wrapper.metadata = metadata_to_tensors(
                cls.model.vocab.encode_batch([None] * n, [None] * n, [None] * n))
            heatmaps = cam(input_tensor=cls_in, targets=None)
            probs = torch.softmax(cam.outputs.detach(), dim=1).numpy()
            for j, (path, array) in enumerate(zip(chunk, arrays, strict=True)):
                h, w = array.shape[:2]
                mask = (resize_map(seg_prob[j], h, w) > 0.5).astype(np.uint8)
                heat = resize_map(torch.from_numpy(heatmaps[j]), h, w)
                rows.append({
                    "image_id": Path(path).stem, "source_uri": path,
                    "predicted_class": classes[int(probs[j].argmax())],
                    **{f"prob_{c}": float(p) for c, p in zip(classes, probs[j], strict=True)},
                    "mask_png": encode_png(mask, mask=True),
                    "heatmap_png": encode_png(Image.fromarray(
                        np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8), mode="L")),
                })
    pd.DataFrame(rows).to_parquet(out / "plain.parquet")
    return len(files) / (time.perf_counter() - start)


def _ray_runs(sources: list[str], archive: Path, work: Path, ckpt: dict, args):
    """On a Ray started here: N and 10N images with heatmaps and without (seconds), then the
    peak memory samplers of an N and a 10N run."""
    import ray

    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False,
             log_to_driver=False)
    try:
        end_to_end(make_archive(sources, args.batch_size * 2, work / "warmup"), work / "w", ckpt,
                   args)
        big_archive = make_archive(sources, 10 * args.images, work / "archive10")
        timings = [end_to_end(folder, work / "out", ckpt, args, heatmaps=heatmaps)
                   for heatmaps in (True, False) for folder in (archive, big_archive)]
        # Memory in runs of their own: sampling PSS reads every process's smaps, which costs
        # enough CPU to skew the timed runs.
        with MemorySampler() as small:
            end_to_end(archive, work / "out", ckpt, args)
        with MemorySampler() as big:
            end_to_end(big_archive, work / "out", ckpt, args)
    finally:
        ray.shutdown()
    return (*timings, small, big)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="raysky/sample_data/ham10000_sample", help="folder of images (archive layout)")
    parser.add_argument("--preset", default="lite", help="model preset (default lite)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=128, help="N; the memory run also uses 10N")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for every measurement (default: visible cores)")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="raysky-bench-"))
    try:
        torch.manual_seed(0)
        ckpt = {"segmenter": str(work / "seg"), "classifier": str(work / "cls")}
        save_checkpoint(create_segmenter(args.preset), ckpt["segmenter"], args.preset)
        save_checkpoint(create_classifier(args.preset), ckpt["classifier"], args.preset)
        sources = [r.image_uri for r in read_archive(args.data)]
        n = args.images
        archive = make_archive(sources, n, work / "archive")
        files = storage.list_files(str(archive))
        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        print(f"preset={args.preset} batch={args.batch_size} threads={args.threads} N={n} "
              f"data={args.data} ({len(sources)} distinct images)", flush=True)

        floor = model_floor(arrays, ckpt, args.batch_size)
        plain = plain_loop(files, ckpt, args.batch_size, work)
        heat_small, heat_big, no_heat_small, no_heat_big, small, big = _ray_runs(
            sources, archive, work, ckpt, args)
        with_heat, startup = steady_state(n, heat_small, 10 * n, heat_big)
        without_heat, _ = steady_state(n, no_heat_small, 10 * n, no_heat_big)

        def line(name: str, value: float, base: float, target: str) -> None:
            print(f"{name:44s} {value:8.2f} vs {base:8.2f}  ratio {value / base:5.2f}  {target}")

        print(f"job start-up (planning, model actor, checkpoints): {startup:.1f} s; "
              f"{n} images took {heat_small:.1f} s, {10 * n} took {heat_big:.1f} s")
        print(f"{'steady state':44s} {'img/s':>8s}    {'baseline':>8s}")
        line("end-to-end vs model-only forward (floor)", with_heat, floor, "(target >= 0.85)")
        line("heatmaps on vs off", with_heat, without_heat, "(target >= 0.85)")
        line("end-to-end vs plain single-process loop", with_heat, plain, "(reported)")
        gib = 1024 ** 3
        print(f"{'peak cluster memory, 10N vs N (GiB)':44s} {big.peak / gib:8.2f} vs "
              f"{small.peak / gib:8.2f}  ratio {big.peak / small.peak:5.2f}  (target <= 1.2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
