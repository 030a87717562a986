"""Serving overhead: the live endpoint against the same pipeline called in-process.

Measures, in one run, on one preset, one image set and one torch thread count:
  1. in-process latency: ``LesionPipeline([image])`` one image at a time (p50, p99);
  2. endpoint latency at concurrency 1: ``POST /v1/predict`` over HTTP on 127.0.0.1 (p50, p99),
     each request alternating with an in-process call, so that outside load hits both alike;
  3. in-process throughput at the best of several batch sizes (images/s);
  4. endpoint throughput with 8 concurrent clients (images/s).
Prints each figure and the ratios 2/1 (target <= 1.25) and 4/3 (target >= 0.9). The in-process
figures are the pipeline alone: the endpoint additionally decodes the upload, PNG-encodes mask
and heatmap, and runs Serve's proxy, the ingress and the HTTP client on the same machine, so
an "in-process end to end" line (decode + pipeline + PNG encode) is printed for reference.

During 4 it also accounts the CPU time of every process on the serving path (model replica,
ingress, HTTP proxy, the load generator, the rest of Ray) per request. Since everything shares
this machine's cores, the endpoint cannot serve more than cores / (CPU per image) images/s;
that ceiling, as a ratio to 3, is printed next to the measured ratio.

Untrained models of ``--preset`` are used unless checkpoints are given (weights do not change
the cost). Images come from ``--data`` (a folder of .jpg/.png; default the bundled sample):

    python benchmarks/serve_latency.py --preset lite
    python benchmarks/serve_latency.py --data /path/to/ham10000/images --preset paper --gpu
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raysky.local.net import free_port

REPO = Path(__file__).resolve().parents[1]


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _checkpoints(args, root: str) -> tuple[str, str]:
    if args.segmenter and args.classifier:
        return args.segmenter, args.classifier
    import torch

    from raysky.models import create_classifier, create_segmenter, save_checkpoint

    torch.manual_seed(0)
    seg, cls = os.path.join(root, "segmenter"), os.path.join(root, "classifier")
    save_checkpoint(create_segmenter(args.preset), seg, args.preset)
    save_checkpoint(create_classifier(args.preset), cls, args.preset)
    return seg, cls


def _load_images(folder: Path, limit: int) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no .jpg/.png images under {folder}")
    return [p.read_bytes() for p in paths[:limit]]


def _latency_pairs(pipeline, arrays, encoded, url: str, n: int, offset: int):
    """Per image, alternately: the pipeline in-process, decode + pipeline + PNG encoding
    in-process, and one request to the endpoint. Seconds for each, as three lists."""
    import httpx

    from raysky.data.images import decode_image, encode_png

    pipeline_only, end_to_end, http = [], [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(offset, offset + n):
            start = time.perf_counter()
            pipeline([arrays[i % len(arrays)]])
            pipeline_only.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = pipeline([np.asarray(decode_image(encoded[i % len(encoded)]))])[0]
            encode_png(result.mask, mask=True)
            encode_png(Image.fromarray(np.rint(result.heatmap * 255).astype(np.uint8), mode="L"))
            end_to_end.append(time.perf_counter() - start)
            start = time.perf_counter()
            response = client.post("/v1/predict",
                                   files={"image": ("x.jpg", encoded[i % len(encoded)])})
            response.raise_for_status()
            http.append(time.perf_counter() - start)
    return pipeline_only, end_to_end, http


def _in_process_throughput(pipeline, arrays, batch_size: int,
                           batches: int) -> tuple[int, float, float]:
    """Images scored, seconds taken and CPU seconds used over ``batches`` of ``batch_size``."""
    batch = [arrays[i % len(arrays)] for i in range(batch_size)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        pipeline(batch)
    return batch_size * batches, time.perf_counter() - start, time.process_time() - cpu_start


def _replica_stats(url: str) -> collections.Counter:
    """The model replica's counters: batches, requests and seconds spent computing."""
    import httpx

    stats = httpx.get(f"{url}/v1/model", timeout=60).json()["replica_stats"]
    return collections.Counter({key: stats[key] for key in ("batches", "requests", "compute_s")})


SERVING_ROLES = {"LesionModel": "model replica", "RayskyIngress": "ingress",
                 "ProxyActor": "HTTP proxy"}


def _cpu_by_role() -> collections.Counter:
    """CPU seconds used so far by each part of the serving path on this machine."""
    import psutil

    used: collections.Counter = collections.Counter()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["pid"] == os.getpid():
            role = "load generator (httpx)"
        else:
            role = next((r for key, r in SERVING_ROLES.items() if key in command),
                        "rest of Ray" if "ray" in command else None)
        if role:
            used[role] += times.user + times.system
    return used


async def _endpoint_load(url: str, encoded: list[bytes], total: int, concurrency: int):
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    latencies: list[float] = []
    counter = iter(range(total))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker():
            for i in counter:
                start = time.perf_counter()
                response = await client.post(
                    "/v1/predict", files={"image": ("x.jpg", encoded[i % len(encoded)])})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, total / elapsed


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite", choices=["tiny", "lite", "paper"],
                        help="untrained models of this preset (ignored with checkpoints)")
    parser.add_argument("--segmenter", help="segmenter checkpoint instead of --preset")
    parser.add_argument("--classifier", help="classifier checkpoint instead of --preset")
    parser.add_argument("--data", type=Path, default=REPO / "raysky" / "sample_data" / "ham10000_sample" / "images",
                        help="folder of .jpg/.png images to send")
    parser.add_argument("--images", type=int, default=32, help="distinct images used")
    parser.add_argument("--latency-requests", type=int, default=60,
                        help="sequential requests for the latency percentiles")
    parser.add_argument("--throughput-requests", type=int, default=32,
                        help="requests per round sent by the concurrent clients")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16",
                        help="in-process batch sizes tried for the best throughput")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating in-process / endpoint measurement rounds")
    parser.add_argument("--batch-images", type=int, default=32,
                        help="images per round for each in-process batch size")
    parser.add_argument("--max-batch-size", type=int, default=8, help="@serve.batch size")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="@serve.batch wait")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, in-process and per replica (0: all cores)")
    parser.add_argument("--gpu", action="store_true", help="run both on the GPU")
    return parser.parse_args()


@dataclasses.dataclass
class Measured:
    """What the alternating rounds measured, in seconds.

    ``in_process_load`` maps a batch size to [images, seconds, CPU seconds]; ``endpoint_load``
    is [images, seconds] under the concurrent clients, ``endpoint_cpu`` the CPU seconds each
    role on the serving path used meanwhile, ``model_work`` the replica's own counters."""

    latency_in_process: list[float] = dataclasses.field(default_factory=list)
    latency_end_to_end: list[float] = dataclasses.field(default_factory=list)
    latency_endpoint: list[float] = dataclasses.field(default_factory=list)
    in_process_load: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    endpoint_load: list[float] = dataclasses.field(default_factory=lambda: [0, 0.0])
    endpoint_cpu: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    model_work: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _warm_up(pipeline, arrays, batch_sizes: list[int]) -> None:
    """Allocator, oneDNN primitives: every batch size once before anything is timed."""
    for i in range(3):
        pipeline([arrays[i % len(arrays)]])
    for batch_size in batch_sizes:
        pipeline([arrays[i % len(arrays)] for i in range(batch_size)])


def _measure_rounds(args, pipeline, arrays, encoded, url: str,
                    batch_sizes: list[int]) -> Measured:
    """Rounds alternating in-process and endpoint measurements, so that load from anything
    else on the machine falls on both sides alike."""
    measured = Measured(in_process_load={b: [0, 0.0, 0.0] for b in batch_sizes})
    per_round = max(1, args.latency_requests // args.rounds)
    asyncio.run(_endpoint_load(url, encoded, 2 * args.concurrency, args.concurrency))
    for r in range(args.rounds):
        pipeline_only, end_to_end, http = _latency_pairs(pipeline, arrays, encoded, url,
                                                         per_round, r * per_round)
        measured.latency_in_process += pipeline_only
        measured.latency_end_to_end += end_to_end
        measured.latency_endpoint += http
        for batch_size in batch_sizes:
            batches = max(1, args.batch_images // batch_size)
            result = _in_process_throughput(pipeline, arrays, batch_size, batches)
            measured.in_process_load[batch_size] = [
                a + b for a, b in zip(measured.in_process_load[batch_size], result, strict=True)]
        cpu_before, stats_before = _cpu_by_role(), _replica_stats(url)
        _, rate = asyncio.run(_endpoint_load(url, encoded, args.throughput_requests,
                                             args.concurrency))
        measured.endpoint_cpu.update(_cpu_by_role() - cpu_before)
        measured.model_work.update(_replica_stats(url) - stats_before)  # during the load only
        measured.endpoint_load[0] += args.throughput_requests
        measured.endpoint_load[1] += args.throughput_requests / rate
        best = max(done / seconds for done, seconds, _ in measured.in_process_load.values())
        print(f"round {r + 1}/{args.rounds}: endpoint {rate:.2f} images/s, in-process "
              f"best so far {best:.2f}", flush=True)
    return measured


def _print_latency(measured: Measured) -> None:
    p50_in, p99_in = _percentiles(measured.latency_in_process)
    p50_e2e, p99_e2e = _percentiles(measured.latency_end_to_end)
    p50_http, p99_http = _percentiles(measured.latency_endpoint)
    print("\nlatency at concurrency 1 (ms)            p50      p99")
    print(f"  in-process pipeline                {p50_in:8.1f} {p99_in:8.1f}")
    print(f"  in-process decode+pipeline+PNGs    {p50_e2e:8.1f} {p99_e2e:8.1f}   (reference)")
    print(f"  endpoint over HTTP                 {p50_http:8.1f} {p99_http:8.1f}")
    print(f"  ratio endpoint / in-process        {p50_http / p50_in:8.2f} {p99_http / p99_in:8.2f}"
          "   (target <= 1.25)")


def _print_throughput(measured: Measured, args) -> None:
    load = measured.in_process_load
    rates = {b: done / seconds for b, (done, seconds, _) in load.items()}
    images, seconds = measured.endpoint_load
    thr_http, work = images / seconds, measured.model_work
    best_batch = max(rates, key=rates.get)
    print("\nthroughput (images/s)")
    for batch_size, rate in rates.items():
        print(f"  in-process batch {batch_size:3d}               {rate:8.2f}")
    print(f"  endpoint, {args.concurrency} concurrent clients      {thr_http:8.2f}   (mean batch "
          f"{work['requests'] / max(work['batches'], 1):.1f} of max "
          f"{args.max_batch_size}; model busy {work['compute_s'] / seconds:.0%} of the time)")
    print(f"  ratio endpoint / in-process best (batch {best_batch}) "
          f"{thr_http / rates[best_batch]:6.2f}   (target >= 0.9)")
    in_cpu_ms = 1000.0 * load[best_batch][2] / load[best_batch][0]
    http_cpu_ms = {role: 1000.0 * cpu / images for role, cpu in measured.endpoint_cpu.items()}
    total_cpu_ms = sum(http_cpu_ms.values())
    print(f"\nCPU per image at concurrency {args.concurrency} (ms, all processes on the path)")
    for role, ms in sorted(http_cpu_ms.items(), key=lambda item: -item[1]):
        print(f"  {role:33s}{ms:8.1f}")
    print(f"  {'total':33s}{total_cpu_ms:8.1f}   (in-process at batch {best_batch}: "
          f"{in_cpu_ms:.1f})")
    ceiling = os.cpu_count() * 1000.0 / total_cpu_ms / rates[best_batch]
    print(f"  ceiling of the ratio on {os.cpu_count()} cores    {ceiling:6.2f}   (cores / CPU per "
          "image, over the in-process best)")


def main() -> None:
    args = _parse_args()

    import ray

    from raysky.data.images import decode_image
    from raysky.inference import LesionPipeline
    from raysky.models.runtime import set_torch_threads
    from raysky.serve import ServeSettings, run_server, shutdown

    threads = set_torch_threads(args.threads or None)
    encoded = _load_images(args.data, args.images)
    arrays = [np.asarray(decode_image(data)) for data in encoded]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="raysky-bench-") as root:
        seg_uri, cls_uri = _checkpoints(args, root)
        pipeline = LesionPipeline.from_uris(seg_uri, cls_uri, use_gpu=args.gpu)
        print(f"preset/checkpoints: {args.segmenter or args.preset}; {len(encoded)} images of "
              f"{arrays[0].shape[1]}x{arrays[0].shape[0]} from {args.data}; {threads} torch "
              f"threads; {os.cpu_count()} cores; device {pipeline.device}")
        _warm_up(pipeline, arrays, batch_sizes)
        # One model replica with the same threads as the in-process run, plus the ingress.
        ray.init(address="local", num_cpus=threads + 1, num_gpus=1 if args.gpu else 0,
                 include_dashboard=False, log_to_driver=False)
        url = run_server(ServeSettings(
            segmenter=seg_uri, classifier=cls_uri, port=free_port(), num_cpus=threads,
            torch_threads=threads, use_gpu=args.gpu, max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
            max_ongoing_requests=max(16, 2 * args.max_batch_size),
            # Loopback only, and a key check is one SHA-256 per request: measured without.
            max_queued_requests=-1, api_keys=(), allow_unauthenticated=True))
        try:
            measured = _measure_rounds(args, pipeline, arrays, encoded, url, batch_sizes)
        finally:
            shutdown()
    _print_latency(measured)
    _print_throughput(measured, args)

if __name__ == "__main__":
    main()
