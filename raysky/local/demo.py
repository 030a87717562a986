"""The end-to-end demo behind ``make demo``: train, screen, report and serve, all on 127.0.0.1.

It runs the same code paths a cluster runs, scaled down: an embedded S3 endpoint (the moto
server) stands in for S3, a local Ray for the cluster. Every artefact lands in the embedded S3
bucket, and the review page and a JSON summary are also written to a local folder so they
outlive the demo.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raysky import storage
from raysky.local.net import free_port
from raysky.progress import format_duration
from raysky.sample_data import SAMPLE_DIR as BUNDLED_SAMPLE
from raysky.settings import setting


@dataclass
class DemoSettings:
    """What the demo runs on; the fields with help text are ``raysky demo`` flags."""

    data: str = setting(str(BUNDLED_SAMPLE), help="dataset folder or s3:// prefix; the "
                        "bundled sample by default")
    format: str = setting("ham10000", help="dataset layout")
    preset: str = setting("lite", help="model sizes and training recipe (see `raysky info`)")
    segmenter_epochs: int = setting(12, help="segmenter training epochs")
    classifier_epochs: int = setting(12, help="classifier training epochs")
    batch_size: int = setting(4, help="images per training step and per model call")
    workers: int = setting(2, help="Ray Train workers")
    out: str = setting("demo-output", help="local folder for the review page, metrics and summary")
    bucket: str = "raysky-demo"
    storage: str | None = setting(None, help="use this existing s3:// prefix (AWS_* variables) "
                                  "instead of the embedded S3 endpoint")
    serve_port: int = 0


def _step(number: int, text: str) -> None:
    print(f"\n== [{number}/7] {text}", flush=True)


def check_data(settings: DemoSettings) -> None:
    """Fail before anything starts when ``settings.data`` is not a readable dataset.

    A local folder is read with the dataset reader here, so a wrong path or layout is one line
    naming the folder or file, not an error minutes later after Ray and S3 have started. An
    ``s3://`` prefix is read where it lives, in step 2.
    """
    if storage.is_s3(settings.data):
        return
    if not os.path.isdir(settings.data):
        raise FileNotFoundError(f"data {settings.data}: no such folder (give a dataset folder "
                                f"in the {settings.format} layout, or an s3:// prefix)")
    from raysky.data.readers import read_dataset

    read_dataset(settings.data, settings.format)


@dataclass
class _Run:
    """What the demo's steps hand on to each other: where things are and what was made."""

    settings: DemoSettings
    stack: ExitStack
    out: Path
    root: str = ""
    dataset_uri: str = ""
    archive_uri: str = ""
    metadata_uri: str = ""
    records: list = field(default_factory=list)
    runs: str = ""
    segmenter: Any = None
    classifier: Any = None
    results_uri: str = ""
    scored: Any = None
    report_path: Path | None = None


# Each step imports what it runs inside its body: `raysky demo --help` reads DemoSettings from
# this module, and the steps pull in Ray, pandas, torch and jinja2.


def _storage_and_ray(run: _Run) -> None:
    import ray

    from raysky.cluster import ensure_ray
    from raysky.local.s3 import local_s3

    _step(1, "storage and Ray")
    if run.settings.storage:
        run.root = run.settings.storage.rstrip("/")
        print(f"using {run.root}")
    else:
        s3 = run.stack.enter_context(local_s3())
        run.root = s3.create_bucket(run.settings.bucket)
        print(f"embedded S3 (moto) at {s3.endpoint_url}, bucket {run.root}")
    if not ray.is_initialized():
        # Worker output reaches this terminal for the Train workers' epoch/loss/ETA lines;
        # Ray Data's per-epoch INFO lines from the same workers would bury them. The local
        # cluster inherits this process's environment.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        ensure_ray(log_to_driver=True)
        run.stack.callback(ray.shutdown)
    print(f"Ray with {ray.cluster_resources().get('CPU', 0):g} logical CPUs")


def _upload(run: _Run) -> None:
    from raysky.data.readers import read_dataset
    from raysky.data.splits import SPLIT_FILE, per_class_split, write_split_file

    settings = run.settings
    _step(2, "upload the sample as a dataset and as an archive")
    run.dataset_uri = storage.join(run.root, "datasets", "sample")
    run.archive_uri = storage.join(run.root, "archive")
    if storage.is_s3(settings.data):
        run.dataset_uri = settings.data
    else:
        count = storage.upload_directory(settings.data, run.dataset_uri)
        print(f"{count} files -> {run.dataset_uri}")
    records = run.records = read_dataset(run.dataset_uri, settings.format)
    split_uri = storage.join(run.dataset_uri, SPLIT_FILE)
    if not storage.exists(split_uri):
        splits = per_class_split(records)
        write_split_file(split_uri, splits)
        counts = {name: list(splits.values()).count(name) for name in ("train", "val", "test")}
        print(f"splits.csv: {counts['train']} train, {counts['val']} val, {counts['test']} "
              "test images (test is held out of training; the figures below are on it)")
    for record in records:
        storage.write_bytes(storage.join(run.archive_uri, "images", Path(record.image_uri).name),
                            storage.read_bytes(record.image_uri))
    run.metadata_uri = storage.join(run.archive_uri, "metadata.csv")
    lines = ["image_id,age,sex,site"] + [
        f"{r.image_id},{'' if r.age is None else r.age},{r.sex or ''},{r.site or ''}"
        for r in records
    ]
    storage.write_bytes(run.metadata_uri, ("\n".join(lines) + "\n").encode())
    print(f"{len(records)} images + metadata.csv -> {run.archive_uri}")


def _train(run: _Run) -> None:
    from raysky.train.driver import train_classifier, train_segmenter
    from raysky.train.settings import TrainSettings

    settings = run.settings
    _step(3, f"train the segmenter ({settings.preset} preset, {settings.workers} Ray Train workers)")
    run.runs = storage.join(run.root, "runs")
    # Everything else is the preset's recipe (ImageNet encoders, learning rates, precision).
    common = dict(data=run.dataset_uri, format=settings.format, preset=settings.preset,
                  batch_size=settings.batch_size, workers=settings.workers, storage=run.runs,
                  progress_interval=15.0)
    seg = run.segmenter = train_segmenter(TrainSettings(
        name="demo-segmenter", epochs=settings.segmenter_epochs, **common))
    print(f"best segmenter: {seg.best_checkpoint_uri} {_short(seg.metrics)}")

    _step(4, "train the classifier on the segmenter's masks")
    cls = run.classifier = train_classifier(TrainSettings(
        name="demo-classifier", epochs=settings.classifier_epochs,
        segmenter=seg.best_checkpoint_uri, **common))
    print(f"best classifier: {cls.best_checkpoint_uri} {_short(cls.metrics)}")


def _screen(run: _Run) -> None:
    from raysky.score.pipeline import score_archive
    from raysky.score.settings import ScoreSettings

    _step(5, "screen the archive with Ray Data (masks, predictions, Grad-CAM) into Parquet")
    run.results_uri = storage.join(run.root, "results")
    run.scored = score_archive(ScoreSettings(
        input=storage.join(run.archive_uri, "images"), output=run.results_uri,
        segmenter=run.segmenter.best_checkpoint_uri,
        classifier=run.classifier.best_checkpoint_uri,
        metadata=run.metadata_uri, batch_size=run.settings.batch_size, cpus_per_worker=1))
    print(run.scored.format())


def _evaluate_and_report(run: _Run) -> None:
    from raysky.data.records import DatasetRef
    from raysky.review.evaluate import evaluate
    from raysky.review.output import format_table
    from raysky.review.report import build_report

    _step(6, "evaluate on the held-out test images and write the review page")
    held_out = DatasetRef(run.dataset_uri, run.settings.format, split="test")
    metrics = evaluate(run.results_uri, held_out)
    print(format_table(metrics))
    print(f"(on {metrics['coverage']['matched']} held-out images: indicative only; "
          "benchmarks/quality.py measures the full val split)")
    (run.out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    run.report_path = run.out / "report.html"
    build_report(run.results_uri, str(run.report_path), held_out)
    storage.write_bytes(storage.join(run.root, "report.html"), run.report_path.read_bytes())
    print(f"review page: {run.report_path}")


def _serve_and_predict(run: _Run) -> dict:
    """Serve both models and make one live prediction; returns the answer."""
    import httpx

    from raysky.serve.config import ServeSettings
    from raysky.serve.server import run_server, shutdown

    _step(7, "serve the models and make one live prediction")
    port = run.settings.serve_port or free_port()
    # A fresh key per demo: the endpoint, like any raysky endpoint, refuses to run open.
    api_key = secrets.token_urlsafe(32)
    url = run_server(ServeSettings(segmenter=run.segmenter.best_checkpoint_uri,
                                   classifier=run.classifier.best_checkpoint_uri, port=port,
                                   api_keys=(api_key,), ray_address="local"))
    run.stack.callback(shutdown)
    example = run.records[0]
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as client:
        response = client.post(
            f"{url}/v1/predict",
            files={"image": (Path(example.image_uri).name, storage.read_bytes(example.image_uri),
                             "image/jpeg")},
            data={k: str(v) for k, v in (("age", example.age), ("sex", example.sex),
                                         ("site", example.site), ("image_id", example.image_id))
                  if v is not None})
    response.raise_for_status()
    answer = response.json()
    _save_png(answer.get("heatmap_png"), run.out / f"{example.image_id}_heatmap.png")
    _save_png(answer.get("mask_png"), run.out / f"{example.image_id}_mask.png")
    print(f"POST {url}/v1/predict ({example.image_id}, truth {example.label}): "
          f"{answer['predicted_class']} (malignant_prob {answer['malignant_prob']:.3f}, "
          f"lesion_focus {answer['lesion_focus']}, {answer['latency_ms']:.0f} ms)")
    return answer


def _summarize(run: _Run, answer: dict, summary: dict, started: float) -> None:
    """Write ``summary.json`` (locally and beside the run) and print where everything is."""
    out, seg, cls = run.out, run.segmenter, run.classifier
    example = run.records[0]
    summary.update({
        "storage": run.root,
        "dataset": run.dataset_uri,
        "archive": run.archive_uri,
        "segmenter": seg.to_dict(),
        "classifier": cls.to_dict(),
        "results": run.results_uri,
        "scoring": run.scored.to_dict(),
        "metrics": str(out / "metrics.json"),
        "report": str(run.report_path),
        "live_prediction": {k: v for k, v in answer.items() if not k.endswith("_png")},
        "elapsed_s": round(time.monotonic() - started, 1),
    })
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    storage.write_bytes(storage.join(run.root, "summary.json"), (out / "summary.json").read_bytes())

    print(f"\n== done in {format_duration(summary['elapsed_s'])}. Where everything is:")
    print(f"  training runs      {run.runs}")
    print(f"  segmenter          {seg.best_checkpoint_uri}")
    print(f"  classifier         {cls.best_checkpoint_uri}")
    print(f"  scored Parquet     {run.results_uri}")
    print(f"  review page        {run.report_path}")
    print(f"  metrics, summary   {out / 'metrics.json'}, {out / 'summary.json'}")
    print(f"  live heatmap/mask  {out / (example.image_id + '_heatmap.png')}")
    if not run.settings.storage:
        print("  (the embedded S3 endpoint stops with the demo; local copies are in "
              f"{out})")
    print("shutting down Serve, Ray and the embedded S3 endpoint")


def run_demo(settings: DemoSettings) -> dict:
    """Run the whole demo, its seven steps in order, and return a summary of where everything
    is."""
    check_data(settings)
    started = time.monotonic()
    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"settings": asdict(settings)}
    with ExitStack() as stack:
        run = _Run(settings, stack, out)
        _storage_and_ray(run)
        _upload(run)
        _train(run)
        _screen(run)
        _evaluate_and_report(run)
        answer = _serve_and_predict(run)
        _summarize(run, answer, summary, started)
    return summary


def _short(metrics: dict) -> str:
    keys = ("epoch", "dice", "threshold_jaccard", "balanced_accuracy", "auc", "val_loss")
    return ", ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics.get(k), float) else f"{k}={metrics[k]}"
                     for k in keys if k in metrics)


def _save_png(data: str | None, path: Path) -> None:
    if data:
        path.write_bytes(base64.b64decode(data))


def _jsonable(value):
    from raysky.jsonable import to_jsonable

    return json.loads(json.dumps(to_jsonable(value), default=str))


__all__ = ["BUNDLED_SAMPLE", "DemoSettings", "check_data", "run_demo"]
