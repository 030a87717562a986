"""Experiment tracking: a real MLflow store (sqlite in a temporary folder), read back through
MLflow's own client; a real Ray Train run of the tiny preset; and a tracking server that is not
there (a closed port on 127.0.0.1), which must cost a warning, never the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from raysky.cli.main import main
from raysky.data.taxonomy import HAM10000_CLASSES
from raysky.models import load_checkpoint
from raysky.train import TrainSettings, train_segmenter
from raysky.train.tracking import (
    LOCAL_STORE,
    RUN_TAG,
    flatten,
    numeric,
    open_run,
    resolve_uri,
)
from tests.helpers import synthetic_rows, write_results

NOWHERE = "http://127.0.0.1:1"
"""Port 1 on the loopback address: nothing listens there, so every request is refused."""
TINY = {"preset": "tiny", "epochs": 1, "batch_size": 4, "workers": 1, "cpus_per_worker": 1,
        "progress_interval": 5.0}


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning: MLflow tracking is off" in line]


def test_uris_resolve_to_absolute_local_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # MLflow's own default, made absolute: Ray Train workers run in other folders.
    assert resolve_uri(LOCAL_STORE) == (f"sqlite:///{tmp_path}/mlflow.db", f"{tmp_path}/mlruns")
    assert resolve_uri("tracking") == (f"sqlite:///{tmp_path}/tracking/mlflow.db",
                                       f"{tmp_path}/tracking/mlruns")
    assert resolve_uri("sqlite:////abs/x.db") == ("sqlite:////abs/x.db", "/abs/mlruns")
    assert resolve_uri("http://mlflow:5000") == ("http://mlflow:5000", None)


def test_metrics_are_flattened_and_only_numbers_are_logged():
    metrics = {"dice": 0.8, "epoch": 2, "precision": "fp32", "auc_per_class": {"mel": 0.9},
               "flag": True, "best": float("-inf"), "ci": [0.1, 0.2], "nan": float("nan")}
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}
    logged = numeric(metrics)
    assert set(logged) == {"dice", "epoch", "auc_per_class.mel", "nan"}
    assert logged["auc_per_class.mel"] == 0.9


def test_a_run_id_the_store_lacks_is_an_error_and_an_unreachable_store_a_warning(tmp_path,
                                                                               capsys):
    with pytest.raises(ValueError, match="'0123abc' does not exist"):
        open_run(str(tmp_path / "store"), "0123abc")
    tracker = open_run(NOWHERE, "0123abc")
    assert not tracker.enabled
    assert len(_warnings(capsys.readouterr().err)) == 1
    tracker.log_results("evaluation", {"auc": 0.5})  # off: does nothing, says nothing
    assert not _warnings(capsys.readouterr().err)


def test_evaluate_logs_its_figures_to_the_given_run(sample_dir, tmp_path, capsys):
    _, rows = synthetic_rows(sample_dir)
    results = tmp_path / "results.parquet"
    write_results(str(results), rows, HAM10000_CLASSES)
    store = str(tmp_path / "store")
    uri, artifacts_dir = resolve_uri(store)
    client = MlflowClient(uri)
    # An experiment made here without a location would put its artifacts in ./mlruns.
    experiment = client.create_experiment("raysky", artifact_location=artifacts_dir)
    run_id = client.create_run(experiment).info.run_id

    assert main(["evaluate", "--results", str(results), "--data", str(sample_dir),
                 "--format", "ham10000", "--mlflow", store, "--mlflow-run-id", run_id,
                 "--out", str(tmp_path / "metrics.json")]) == 0
    assert f"logged to MLflow run {run_id}" in capsys.readouterr().out
    written = json.loads((tmp_path / "metrics.json").read_text())
    run = client.get_run(run_id)
    assert run.data.metrics["evaluation.balanced_accuracy"] == pytest.approx(
        written["classification"]["balanced_accuracy"])
    assert run.data.metrics["evaluation.images"] == written["coverage"]["matched"]
    assert run.data.tags["raysky.evaluated_results"] == str(results)
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert artifacts == ["evaluation.json"]

    # A mistyped run id fails before the evaluation is computed.
    assert main(["evaluate", "--results", str(results), "--data", str(sample_dir),
                 "--format", "ham10000", "--mlflow", store, "--mlflow-run-id", "nope"]) == 2
    assert "'nope' does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tracked_training_run_reads_back_through_mlflow(ray_local, sample_dir, tmp_path):
    store = str(tmp_path / "store")
    settings = TrainSettings(data=str(sample_dir), name="seg", storage=str(tmp_path / "runs"),
                             mlflow=store, mlflow_experiment="raysky-test", **TINY)
    result = train_segmenter(settings)

    client = MlflowClient(resolve_uri(store)[0])
    experiment = client.get_experiment_by_name("raysky-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    # The full settings with the preset's recipe filled in, and the data it trained on.
    assert (params["kind"], params["preset"], params["epochs"]) == ("segmenter", "tiny", "1")
    assert float(params["lr"]) > 0 and params["batch_size"] == "4"
    assert params["data.format"] == "ham10000" and int(params["data.train_images"]) > 0
    # The machine the model card records, and the checkpoint as tags.
    best = load_checkpoint(result.best_checkpoint_uri)
    card = best.meta["extra"]["machine"]
    assert tags["system.cpu"] == card["cpu"] and tags["system.torch"] == card["torch"]
    assert tags["raysky.best_checkpoint_uri"] == result.best_checkpoint_uri
    assert tags["raysky.best_checkpoint_version"] == best.version
    assert tags[RUN_TAG] == result.run_uri
    # Every epoch's metrics, at the epoch's step, equal to what the checkpoint recorded.
    dice = client.get_metric_history(run.info.run_id, "dice")
    assert [(m.step, m.value) for m in dice] == [(1, pytest.approx(result.metrics["dice"]))]
    assert "train_loss" in run.data.metrics and "worker_started_unix" not in run.data.metrics

    # The same name resumes into the same MLflow run, which gains the new epoch.
    resumed = TrainSettings(**{**settings.__dict__, "epochs": 2, "force_resume": True})
    train_segmenter(resumed)
    (run,) = client.search_runs([experiment.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "dice")]
    assert steps == [1, 2]
    assert run.data.tags["raysky.latest_checkpoint_uri"].endswith("checkpoint_epoch_0002")


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_warning_and_training_completes(
        ray_local, sample_dir, tmp_path, capsys):
    code = main(["train", "segmenter", "--data", str(sample_dir), "--preset", "tiny",
                 "--epochs", "1", "--batch-size", "4", "--workers", "1",
                 "--storage", str(tmp_path / "runs"), "--name", "seg", "--mlflow", NOWHERE])
    assert code == 0
    captured = capsys.readouterr()
    (warning,) = _warnings(captured.err)
    assert NOWHERE in warning
    summary = json.loads((Path(tmp_path) / "runs" / "seg" / "result.json").read_text())
    assert summary["best_checkpoint_uri"] and summary["metrics"]["dice"] >= 0.0
