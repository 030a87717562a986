"""The driver side of ``raysky score`` at archive scale: memory, per-image time and start-up at
N and 10N objects on the embedded S3, a run killed halfway and rerun, and 50,000 files that
share one name.

    .venv/bin/python benchmarks/archive_scale.py --n 10000

Builds archives of N and ``--ratio`` x N small synthetic JPEGs (folders of 1,000, like a
clinic's export) on the embedded S3 server (moto on 127.0.0.1), scores each with the ``tiny``
preset and ``--no-heatmaps`` through the real CLI in a subprocess (its own private local Ray),
and prints, as ratios of the big archive to the small one:

* driver peak memory (the ``raysky score`` process's peak RSS, ``VmHWM``; target <= 1.3);
* per-image wall time (the whole run over its images, and the steady part after the first
  written file over its images; target <= 1.2);
* start-up: the time before the pipeline starts (listing, reading the output, planning) and
  until the first written file, against a bare listing of the same prefix (target: start-up
  grows no faster than the listing).

Then it scores the N archive into a new output, kills the driver with SIGKILL once about half
the rows are written (and the local Ray processes it started, by pid), reruns the same command
and checks that every input has exactly one row and that ``_SUCCESS`` names them all. Last, it
lists ``--same-name`` files called ``IMG_0001.jpg`` in as many folders, checks their ids are
unique and safe, and scores them (``--no-score-same-name`` skips that).

Models are untrained: the driver's work does not depend on the weights. The machine's other
load makes single runs noisy; the ratios come from runs in the same process, minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raysky import results, storage  # noqa: E402
from raysky.local.s3 import local_s3  # noqa: E402


def synthetic_jpegs(count: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[bytes]:
    """``count`` distinct small JPEGs: a skin-coloured field with a darker blob and noise."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    for _ in range(count):
        base = np.array([200, 160, 140]) + rng.normal(0, 10, 3)
        cx, cy, r = rng.uniform(0.3, 0.7) * size[0], rng.uniform(0.3, 0.7) * size[1], rng.uniform(6, 16)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        image = base - blob * rng.uniform(60, 120) + rng.normal(0, 6, (size[1], size[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def upload(prefix: str, keys: list[str], payloads: list[bytes], threads: int = 8) -> float:
    """Write ``keys`` under the ``s3://`` ``prefix`` (cycling ``payloads``); return the seconds
    it took. boto3's ``put_object`` is used here: on moto it is about 2.5x faster than a
    pyarrow output stream per object, and building the archive is not what is measured."""
    import boto3

    client = boto3.client("s3")
    bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
    start = time.perf_counter()

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"{key_prefix}/{keys[i]}",
                          Body=payloads[i % len(payloads)])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(len(keys)), chunksize=256))
    return time.perf_counter() - start


def archive_keys(count: int) -> list[str]:
    return [f"clinic{i // 1000:04d}/img{i:07d}.jpg" for i in range(count)]


def timed_listing(prefix: str) -> tuple[float, int]:
    start = time.perf_counter()
    found = len(storage.list_files(prefix))
    return time.perf_counter() - start, found


class DriverWatch:
    """Peak RSS (``VmHWM``) of one process, polled until it exits."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self.descendants: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as handle:
                    for line in handle:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                process = psutil.Process(self.pid)
                if process.status() == psutil.STATUS_ZOMBIE:
                    return
                self.descendants.update(p.pid for p in process.children(recursive=True))
            except (OSError, psutil.Error):
                return
            time.sleep(self.interval)

    def join(self) -> None:
        self._thread.join(timeout=5)


def score_command(args, checkpoints: dict, archive: str, output: str) -> list[str]:
    return [sys.executable, "-m", "raysky.cli.main", "score", "--input", archive,
            "--output", output, "--segmenter", checkpoints["segmenter"],
            "--classifier", checkpoints["classifier"], "--no-heatmaps", "--json",
            "--batch-size", str(args.batch_size), "--rows-per-file", str(args.rows_per_file),
            "--workers", "1", "--cpus-per-worker", str(args.cpus_per_worker),
            # A decode task reserves memory for the largest image allowed; these are 64 x 48,
            # and the default 64 MP limit would reserve gigabytes a busy machine lacks.
            "--max-pixels", str(args.max_pixels)]


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_score(command: list[str], log: Path) -> tuple[dict, int, float]:
    """Run one ``raysky score``; return its JSON summary, the driver's peak RSS and wall s."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        job = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=subprocess.PIPE,
                               stderr=handle, text=True)
        watch = DriverWatch(job.pid)
        stdout, _ = job.communicate()
    watch.join()
    wall = time.perf_counter() - start
    if job.returncode != 0:
        raise RuntimeError(f"raysky score failed ({job.returncode}); see {log}")
    summary, _ = json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])
    return summary, watch.peak, wall


def kill_tree(watch: DriverWatch, job: subprocess.Popen) -> int:
    """SIGKILL the driver, then the local Ray processes it started (recorded by pid)."""
    pids = set(watch.descendants)
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process(job.pid).children(recursive=True))
    job.send_signal(signal.SIGKILL)
    job.wait()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def published_rows(output: str) -> int:
    files = results.result_files(output) if storage.is_dir(output) else []
    if not files:
        return 0
    return results.read_table(files, ["image_id"]).num_rows


def killed_and_rerun(args, checkpoints: dict, archive: str, output: str, total: int,
                     logs: Path) -> dict:
    """Score ``archive``, SIGKILL the driver halfway, rerun; check exactly one row per input."""
    command = score_command(args, checkpoints, archive, output)
    with open(logs / "killed.log", "w") as handle:
        job = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=handle,
                               stderr=subprocess.STDOUT)
        watch = DriverWatch(job.pid)
        while job.poll() is None and published_rows(output) < total // 2:
            time.sleep(2)
        if job.poll() is not None:
            raise RuntimeError(f"the run ended before it was killed; see {logs / 'killed.log'}")
        before = published_rows(output)
        killed = kill_tree(watch, job)
    summary, _peak, wall = run_score(command, logs / "rerun.log")
    frame = results.read(output, ["image_id", "status", "source_uri"])
    on_disk = results.read_table(results.result_files(output), ["image_id"]).num_rows
    success = json.loads(storage.read_bytes(storage.join(output, "_SUCCESS")))
    checks = {
        "rows_before_kill": before, "processes_killed": killed,
        "rerun_skipped": summary["skipped"], "rerun_scored": summary["scored"],
        "rows": len(frame), "rows_on_disk": on_disk, "unique_ids": int(frame["image_id"].nunique()),
        "unique_sources": int(frame["source_uri"].nunique()), "ok": int((frame["status"] == "ok").sum()),
        "success_rows": success["rows"], "success_inputs": success["inputs"], "rerun_wall_s": wall,
    }
    checks["exactly_once"] = (checks["rows"] == checks["rows_on_disk"] == checks["unique_ids"]
                              == checks["unique_sources"] == total
                              == checks["success_rows"] == checks["success_inputs"])
    return checks


def same_name_check(count: int, payload: bytes, score: bool, args, checkpoints: dict,
                    work: Path, logs: Path) -> dict:
    """``count`` files called IMG_0001.jpg in as many folders (on local disk: building 50,000
    objects on the embedded S3 would take longer than scoring them): ids unique and safe, and
    with ``score`` the whole run."""
    from raysky.score.inputs import list_inputs

    root = work / "same-name"
    for i in range(count):
        folder = root / f"site{i:06d}"
        folder.mkdir(parents=True)
        (folder / "IMG_0001.jpg").write_bytes(payload)
    start = time.perf_counter()
    inputs = list_inputs(str(root))
    ids = inputs.table["image_id"].to_pylist()
    out = {"files": count, "list_inputs_s": round(time.perf_counter() - start, 2),
           "ids": len(ids), "unique_ids": len(set(ids)),
           "unsafe_ids": sum(1 for i in ids if storage.name_problem(i, nested=False)),
           "errors": sum(1 for e in inputs.table["read_error"].to_pylist() if e),
           "example": ids[:2]}
    if score:
        output = work / "same-name-results"
        summary, peak, wall = run_score(score_command(args, checkpoints, str(root), str(output)),
                                        logs / "same-name.log")
        frame = results.read(str(output), ["image_id", "status"])
        out.update(scored=summary["scored"], scored_error=summary["scored_error"],
                   rows=len(frame), unique_rows=int(frame["image_id"].nunique()),
                   success=(output / "_SUCCESS").exists(), wall_s=round(wall, 1),
                   driver_peak_mb=round(peak / 2**20, 1))
    return out


def measure(args, checkpoints: dict, bucket: str, count: int, payloads: list[bytes],
            logs: Path) -> dict:
    prefix = f"{bucket}/archive-{count}"
    upload_s = upload(prefix, archive_keys(count), payloads)
    listing_s, listed = timed_listing(prefix)
    assert listed == count, (listed, count)
    output = f"{bucket}/results-{count}"
    command = score_command(args, checkpoints, prefix, output)
    try:
        summary, peak, wall = run_score(command, logs / f"score-{count}.log")
    except RuntimeError as exc:
        if results.result_files(output) if storage.is_dir(output) else False:
            raise
        # Nothing written: Ray itself did not start on a loaded machine. Measure a fresh try.
        print(f"retrying once: {exc}", flush=True)
        summary, peak, wall = run_score(command, logs / f"score-{count}-again.log")
    assert summary["scored"] == count, summary
    first = summary.get("first_result_s") or 0.0
    return {"images": count, "upload_s": round(upload_s, 1), "bare_listing_s": round(listing_s, 2),
            "driver_peak_mb": round(peak / 2**20, 1), "wall_s": round(wall, 1),
            "elapsed_s": round(summary["elapsed_s"], 1),
            "per_image_ms": round(1000 * summary["elapsed_s"] / count, 3),
            "steady_per_image_ms": round(1000 * (summary["elapsed_s"] - first) / count, 3),
            "startup_s": round(summary.get("listing_s") or 0.0, 2),
            "first_result_s": round(first, 1), "scored_error": summary["scored_error"]}


def _ratio(big: dict, small: dict, key: str) -> float:
    return round(big[key] / small[key], 2) if small[key] else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="small archive size (N)")
    parser.add_argument("--ratio", type=int, default=10, help="big archive is ratio x N")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--max-pixels", type=int, default=1_000_000)
    parser.add_argument("--same-name", type=int, default=50_000,
                        help="files called IMG_0001.jpg in as many folders (0: skip)")
    parser.add_argument("--no-score-same-name", action="store_true",
                        help="only list the same-name archive and check its ids")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    import torch

    from raysky.models import create_classifier, create_segmenter, save_checkpoint

    work = Path(tempfile.mkdtemp(prefix="raysky-archive-scale-"))
    logs = work / "logs"
    logs.mkdir()
    torch.manual_seed(0)
    checkpoints = {"segmenter": str(work / "segmenter"), "classifier": str(work / "classifier")}
    save_checkpoint(create_segmenter("tiny"), checkpoints["segmenter"], "tiny")
    save_checkpoint(create_classifier("tiny"), checkpoints["classifier"], "tiny")
    payloads = synthetic_jpegs(64)
    figures: dict = {"n": args.n, "ratio": args.ratio, "cpus": os.cpu_count(), "logs": str(logs)}
    with local_s3() as s3:
        bucket = s3.create_bucket("archive-scale")
        small = measure(args, checkpoints, bucket, args.n, payloads, logs)
        print("N:", json.dumps(small), flush=True)
        big = measure(args, checkpoints, bucket, args.n * args.ratio, payloads, logs)
        print(f"{args.ratio}N:", json.dumps(big), flush=True)
        figures.update(small=small, big=big, ratios={
            "driver_peak_memory": _ratio(big, small, "driver_peak_mb"),
            "per_image_wall_time": _ratio(big, small, "per_image_ms"),
            "steady_per_image_wall_time": _ratio(big, small, "steady_per_image_ms"),
            "startup_before_pipeline": _ratio(big, small, "startup_s"),
            "time_to_first_result": _ratio(big, small, "first_result_s"),
            "bare_listing": _ratio(big, small, "bare_listing_s"),
        })
        print("ratios (10N / N):", json.dumps(figures["ratios"]), flush=True)
        if not args.skip_kill:
            figures["killed_and_rerun"] = killed_and_rerun(
                args, checkpoints, f"{bucket}/archive-{args.n}", f"{bucket}/results-killed",
                args.n, logs)
            print("killed and rerun:", json.dumps(figures["killed_and_rerun"]), flush=True)
        if args.same_name:
            figures["same_name"] = same_name_check(args.same_name, payloads[0],
                                                   not args.no_score_same_name, args,
                                                   checkpoints, work, logs)
            print("same name:", json.dumps(figures["same_name"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    ok = figures.get("killed_and_rerun", {}).get("exactly_once", True) and (
        not args.same_name or figures["same_name"]["unique_ids"] == args.same_name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
