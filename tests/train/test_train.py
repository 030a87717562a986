"""Training with Ray Train: real local Ray, the moto S3 server, the bundled sample, tiny preset.

The integration tests share one segmenter run (2 workers, 1 epoch, checkpoints on S3): the
resume/fault test continues it to epoch 2, and the classifier test trains on its masks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysky import storage
from raysky.cli.main import main
from raysky.data import read_dataset
from raysky.data.taxonomy import order_classes
from raysky.models import load_checkpoint
from raysky.settings import ParameterError
from raysky.storage import upload_directory
from raysky.train import TrainSettings, train_classifier, train_segmenter
from raysky.train.datasets import (
    build_dataset,
    class_weights,
    decode_rows,
    encode_rows,
    load_splits,
    readable_rows,
)
from raysky.train.settings import LoopConfig

TINY = {"preset": "tiny", "batch_size": 4, "workers": 2, "cpus_per_worker": 1, "progress_interval": 5.0}


# ------------------------------------------------------------------------------------------
# Splits, weights, augmentation, decoding: no Ray needed
# ------------------------------------------------------------------------------------------


def _rewrite_metadata(root: Path, edit) -> None:
    path = root / "HAM10000_metadata.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = [edit(i, row) for i, row in enumerate(rows)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_validation_split_never_shares_a_lesion(sample_copy: Path):
    # Make lesions with several images: images i and i+1 of each class pair up on one lesion.
    _rewrite_metadata(sample_copy, lambda i, row: {**row, "lesion_id": f"L{row['dx']}{i % 5 // 2}"})
    train, val, how = load_splits(str(sample_copy), "ham10000", val_fraction=0.3, seed=1)
    assert "split_by_lesion" in how
    assert train and val
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in val}
    assert len(train) + len(val) == 35
    assert {r.label for r in val} <= {r.label for r in train}


def test_splits_csv_at_the_root_is_honoured(sample_copy: Path):
    records = read_dataset(str(sample_copy), "ham10000")
    val_ids = {r.image_id for r in records[::5]}
    with open(sample_copy / "splits.csv", "w") as handle:
        handle.write("image_id,split\n")
        for r in records:
            handle.write(f"{r.image_id},{'val' if r.image_id in val_ids else 'train'}\n")
    train, val, how = load_splits(str(sample_copy), "ham10000")
    assert how.endswith("splits.csv")
    assert {r.image_id for r in val} == val_ids
    assert len(train) == 35 - len(val_ids)


def test_class_weights_are_inverse_sqrt_frequency_with_unit_mean():
    labels = [0] * 64 + [1] * 16 + [2] * 4
    weights = class_weights(labels, 3)
    assert weights[1] / weights[0] == pytest.approx(2.0)
    assert weights[2] / weights[0] == pytest.approx(4.0)
    assert np.mean([weights[label] for label in labels]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        class_weights(labels, 4)


def test_decoding_marks_an_unreadable_image_and_the_loop_can_drop_it(sample_copy: Path):
    records = read_dataset(str(sample_copy), "ham10000")[:4]
    Path(records[1].image_uri).write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows = encode_rows(records, order_classes({r.label for r in records}))
    batch = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    out = decode_rows(batch, size=32)
    # The row stays (shards keep their planned size), flagged with its reason ...
    assert list(out["readable"]) == [1, 0, 1, 1]
    assert out["read_error"][1].startswith(records[1].image_id + ": ")
    readable, errors = readable_rows(out)
    # ... and readable_rows leaves only what can be trained on.
    assert list(readable["image_id"]) == [records[i].image_id for i in (0, 2, 3)]
    assert errors == [out["read_error"][1]]
    assert readable["image"].shape == (3, 32, 32, 3)
    assert readable["mask"].shape == (3, 32, 32)
    assert readable["mask"].max() == 1  # the sample's masks survive decoding into the cache
    assert readable["age"].shape == (3, 2)


def test_cli_rejects_bad_settings_before_starting_ray(sample_dir: Path, tmp_path: Path, capsys):
    common = ["--data", str(sample_dir), "--preset", "tiny", "--storage", str(tmp_path)]
    # The command line names its flags, the fix's flags too, never a Python parameter.
    assert main(["train", "segmenter", *common, "--name", "big", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysky train: error: --batch-size 64: ")
    assert err.rstrip().endswith("fewer than one batch; lower --batch-size or --workers")
    assert main(["train", "segmenter", *common, "--name", "big", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "raysky train: error: --epochs 0: must be at least 1"
    assert main(["train", "segmenter", *common, "--name", "a/b"]) == 2
    assert "error: --name a/b: not a valid run name" in capsys.readouterr().err
    assert main(["train", "classifier", *common, "--name", "c", "--segmenter",
                 str(tmp_path / "missing")]) == 2
    assert "not a raysky checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing may be written for rejected settings"


def _wait_for_free_cpus(ray, at_least: float = 0.0, at_most: float = float("inf")) -> None:
    """Ray's view of free resources lags actors starting and ending by up to a second."""
    deadline = time.monotonic() + 30
    while not at_least <= ray.available_resources().get("CPU", 0.0) <= at_most:
        assert time.monotonic() < deadline, f"free CPUs stayed {ray.available_resources()}"
        time.sleep(0.2)


def test_busy_cpus_are_a_warning_that_training_will_wait(ray_local, sample_dir: Path,
                                                         tmp_path: Path, capsys):
    """A cluster big enough but busy now only delays a run, and Ray Train waits without a
    word; the preflight says so, and says nothing when the CPUs are free."""
    from raysky.train.preflight import check_cpus

    settings = TrainSettings(data=str(sample_dir), preset="tiny", storage=str(tmp_path),
                             name="run", workers=1, cpus_per_worker=1)
    _wait_for_free_cpus(ray_local, at_least=2)
    check_cpus(settings)
    assert "warning" not in capsys.readouterr().out

    @ray_local.remote(num_cpus=3)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray_local.get(holder.ready.remote())
        _wait_for_free_cpus(ray_local, at_most=1)
        check_cpus(settings)
    finally:
        ray_local.kill(holder)
    out = capsys.readouterr().out
    assert "warning: 1 of the Ray cluster's 4 CPUs are free now; this run needs 2 " in out
    assert "Ray Train waits" in out


def test_python_callers_read_the_parameters_they_passed(sample_dir: Path, tmp_path: Path):
    """Below the CLI, errors name the keyword argument, and a fix its keyword, never a flag."""
    base = {"data": str(sample_dir), "preset": "tiny", "storage": str(tmp_path), "name": "run"}
    with pytest.raises(ParameterError, match=r"^batch_size=0: must be at least 1$"):
        train_segmenter(TrainSettings(**base, batch_size=0))
    with pytest.raises(ParameterError, match=r"^precision='fp8': must be one of auto, fp32, bf16$"):
        train_segmenter(TrainSettings(**base, precision="fp8"))
    with pytest.raises(ParameterError, match=r"^batch_size=64: .* fewer than one batch; lower "
                       r"batch_size or workers$"):
        train_segmenter(TrainSettings(**base, batch_size=64))
    with pytest.raises(ParameterError, match=r"^segmenter=None: .*mask_source='ground-truth'"):
        train_classifier(TrainSettings(**base))
    with pytest.raises(ParameterError, match=r"^artefact_consistency=-1.0: must be 0 \(off\) "
                       r"or positive$"):
        train_classifier(TrainSettings(**base, segmenter="seg", artefact_consistency=-1.0))
    with pytest.raises(ParameterError, match=r"^artefact_consistency=10.0: needs a recipe that "
                       r"pastes artefacts .* the tiny preset's classifier recipe pastes none; "
                       r"set it to 0$"):
        train_classifier(TrainSettings(**base, segmenter="seg", artefact_consistency=10.0))
    with pytest.raises(ParameterError, match=r"^artefact_consistency=10.0: applies to the "
                       r"classifier only"):
        train_segmenter(TrainSettings(**{**base, "preset": "lite"}, artefact_consistency=10.0))
    with pytest.raises(ParameterError, match=r"^name='a/b': not a valid run name"):
        TrainSettings(**{**base, "name": "a/b"})
    with pytest.raises(ParameterError, match=r"^inference_size=16: must be at least 32"):
        TrainSettings(**base, inference_size=16)
    with pytest.raises(ParameterError, match=r"^val_fraction=0.0: .* both need at least one "
                       r"\(use more data or another val_fraction\)$"):
        load_splits(str(sample_dir), "ham10000", val_fraction=0.0)
    assert not list(tmp_path.iterdir()), "nothing may be written for rejected settings"


def _earlier_checkpoint(storage_dir: Path, name: str, lr: float) -> None:
    """A run's checkpoint as an earlier run with learning rate ``lr`` left it (no Ray needed:
    resuming is refused before Ray starts)."""
    from raysky.models import create_segmenter
    from raysky.models.checkpoint import save_checkpoint
    from raysky.train.settings import hyperparameters, with_recipe

    settings = with_recipe(TrainSettings(data="d", name=name, preset="tiny", lr=lr), "segmenter")
    save_checkpoint(create_segmenter("tiny"), str(storage_dir / name / "checkpoint_epoch_0001"),
                    "tiny", extra={"hyperparameters": hyperparameters(settings)})


def test_a_resume_with_other_settings_names_the_fix_in_the_callers_words(sample_dir: Path,
                                                                          tmp_path: Path, capsys):
    from raysky.train.preflight import check_existing_run
    from raysky.train.settings import with_recipe

    _earlier_checkpoint(tmp_path, "run", lr=1e-3)
    settings = with_recipe(TrainSettings(data=str(sample_dir), name="run", preset="tiny",
                                         storage=str(tmp_path), lr=2e-3), "segmenter")
    with pytest.raises(ParameterError, match=r"^name='run': run .* was trained with other "
                       r"settings: lr was 0.001, now 0.002; .* continue anyway with "
                       r"force_resume=True, or use a new name$"):
        check_existing_run(str(tmp_path / "run"), "segmenter", settings, ())
    code = main(["train", "segmenter", "--data", str(sample_dir), "--preset", "tiny",
                 "--storage", str(tmp_path), "--name", "run", "--lr", "0.002"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("raysky train: error: --name run: run ")
    assert err.rstrip().endswith("continue anyway with --force-resume, or use a new name")
    assert "force_resume" not in err


def test_the_loop_config_crosses_to_the_workers_as_a_plain_dict():
    settings = TrainSettings(data="d", name="run", preset="tiny", threads_per_worker=3)
    config = LoopConfig.from_settings("classifier", settings, classes=["mel", "nv"],
                                      record={"split": "splits.csv"})
    # The preset's recipe fills what the settings left open; the rest is the settings' own.
    assert config.settings.lr is not None and config.settings.batch_size is not None
    assert config.recipe["lr"] == config.settings.lr and config.threads == 3
    # Without threads_per_worker, a worker (and the mask job before training) runs one torch
    # thread per CPU it holds.
    assert TrainSettings(data="d", name="run", cpus_per_worker=2).worker_threads == 2
    assert TrainSettings(data="d", name="run", cpus_per_worker=0.5).worker_threads == 1
    plain = config.to_dict()
    assert plain["settings"]["name"] == "run" and plain["record"] == {"split": "splits.csv"}
    assert LoopConfig.from_dict(plain) == config
    # Plain data all the way down: even through JSON the settings come back as they were.
    assert LoopConfig.from_dict(json.loads(json.dumps(plain))).settings == config.settings


# ------------------------------------------------------------------------------------------
# Ray Train on 2 workers, checkpoints on S3
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.create_bucket("raysky-train")


@pytest.fixture(scope="module")
def segmenter_run(ray_local, bucket, sample_dir):
    settings = TrainSettings(data=str(sample_dir), name="seg", epochs=1, storage=f"{bucket}/runs", **TINY)
    return settings, train_segmenter(settings)


@pytest.mark.slow
def test_segmenter_checkpoints_and_metrics_land_in_s3(segmenter_run, bucket):
    _settings, result = segmenter_run
    assert result.run_uri == f"{bucket}/runs/seg"
    assert result.best_checkpoint_uri == f"{bucket}/runs/seg/checkpoint_epoch_0001"
    loaded = load_checkpoint(result.best_checkpoint_uri)
    assert loaded.kind == "segmenter" and loaded.meta["preset"] == "tiny"
    assert loaded.meta["extra"]["epoch"] == 1

    metrics = result.metrics
    # Per image dice = 2J / (1 + J) >= J, and ISIC's thresholded Jaccard zeroes J below 0.65:
    # the means keep both orders, whatever the untrained model predicts.
    assert 0.0 <= metrics["threshold_jaccard"] <= metrics["jaccard"] <= metrics["dice"] <= 1.0
    assert metrics["val_loss"] > 0.0 and metrics["train_loss"] > 0.0
    assert metrics["val_images"] == 7  # 35 images, about 15% per class held out by lesion
    # Each of the 2 workers ran 3 steps of 4 on its own 14-image shard; the reported total
    # covers both shards.
    assert metrics["train_images"] == 24

    summary = json.loads(storage.read_bytes(f"{bucket}/runs/seg/result.json"))
    assert summary["best_checkpoint_uri"] == result.best_checkpoint_uri
    assert summary["metrics"]["dice"] == pytest.approx(metrics["dice"])
    in_checkpoint = json.loads(storage.read_bytes(f"{result.best_checkpoint_uri}/metrics.json"))
    assert in_checkpoint["epoch"] == 1 and in_checkpoint["dice"] == pytest.approx(metrics["dice"])
    # The model card beside the weights, built from the same checkpoint.
    card = json.loads(storage.read_bytes(f"{result.best_checkpoint_uri}/model_card.json"))
    assert card["model"]["version"] == loaded.version
    assert card["validation"]["dice"] == pytest.approx(metrics["dice"])
    assert card["training_data"]["train_images"] + card["training_data"]["val_images"] == 35
    assert card["training_data"]["val_classes"] == {"with_mask": 7}
    assert card["recipe"]["epochs"] == 1 and card["recipe"]["machine"]["logical_cpus"] >= 1
    assert card["recipe"]["training_seconds"] == pytest.approx(metrics["train_seconds"])
    markdown = storage.read_bytes(f"{result.best_checkpoint_uri}/model_card.md").decode()
    assert loaded.version in markdown and "## Intended use" in markdown


def _ours(process) -> bool:
    """Whether ``process`` descends from this test process: the local Ray this test started
    (its raylet is our child, its workers the raylet's), never another run on the machine."""
    import psutil

    try:
        return any(parent.pid == os.getpid() for parent in process.parents())
    except psutil.Error:
        return False


def _kill_first_train_worker(killed: dict, stop: threading.Event) -> None:
    """From outside the run: SIGKILL the first Ray Train worker process of this test's Ray
    that comes up.

    Ray names its worker processes after the actor (``ray::RayTrainWorker``), so the process
    table finds them without the state API, which needs the dashboard.
    """
    import psutil

    while not stop.is_set():
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::RayTrainWorker") and _ours(process):
                killed["at"] = time.time()
                os.kill(process.pid, signal.SIGKILL)
                killed["pid"] = process.pid
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_same_name_resumes_and_a_killed_worker_is_replaced(segmenter_run):
    settings, first = segmenter_run
    # Two epochs instead of one is another schedule: the resume must be forced.
    settings = TrainSettings(**{**settings.__dict__, "epochs": 2, "force_resume": True})
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_train_worker, args=(killed, stop), daemon=True)
    killer.start()
    try:
        result = train_segmenter(settings)
    finally:
        stop.set()
        killer.join(timeout=10)

    assert "pid" in killed, "no Ray Train worker was seen alive"
    assert [h["epoch"] for h in result.history] == [1, 2]
    # Epoch 1 is the first run's, not retrained: same record, same worker start time.
    assert result.history[0] == first.history[0]
    # Epoch 2 came from a worker group started after the kill, restored from epoch 1.
    epoch2 = result.history[1]
    assert epoch2["start_epoch"] == 1
    assert epoch2["worker_started_unix"] > killed["at"]
    assert result.latest_checkpoint_uri.endswith("checkpoint_epoch_0002")
    assert load_checkpoint(result.latest_checkpoint_uri).meta["extra"]["epoch"] == 2


@pytest.mark.slow
def test_classifier_cli_trains_on_segmenter_masks_from_s3(segmenter_run, bucket, sample_dir, capsys):
    _settings, seg = segmenter_run
    data = f"{bucket}/sample"
    upload_directory(str(sample_dir), data)
    code = main(["train", "classifier", "--data", data, "--segmenter", seg.best_checkpoint_uri,
                 "--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--workers", "2",
                 "--storage", f"{bucket}/runs", "--name", "cls", "--inference-size", "80"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(storage.read_bytes(f"{bucket}/runs/cls/result.json"))
    assert summary["best_checkpoint_uri"] in out

    loaded = load_checkpoint(summary["best_checkpoint_uri"], expected_kind="classifier")
    labels = {r.label for r in read_dataset(str(sample_dir), "ham10000")}
    assert loaded.classes == order_classes(labels)
    assert loaded.meta["extra"]["settings"]["segmenter"] == seg.best_checkpoint_uri
    # It trained at the preset's 64 px; scoring, serving and calibration run it at 80.
    assert loaded.meta["input_size"] == 80 and loaded.meta["config"]["input_size"] == 64
    metrics = summary["metrics"]
    assert set(metrics["auc_per_class"]) == set(loaded.classes)
    # Macro AUC is the mean of the per-class AUCs that are defined on this validation split.
    defined = [a for a in metrics["auc_per_class"].values() if a == a]
    assert defined and metrics["auc"] == pytest.approx(sum(defined) / len(defined))
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["val_loss"] > 0.0 and metrics["train_loss"] > 0.0

    # The Ray Data job wrote one segmenter mask per training and validation image.
    version = load_checkpoint(seg.best_checkpoint_uri).version
    masks = storage.list_files(f"{bucket}/runs/cls/masks/{version}", suffixes=(".png",))
    assert len(masks) == 35
    first = np.asarray(Image.open(io.BytesIO(storage.read_bytes(masks[0]))))
    assert first.shape == (150, 200) and set(np.unique(first)) <= {0, 255}
    assert os.path.basename(masks[0]).startswith("ISIC_")


@pytest.mark.slow
def test_the_training_order_is_new_every_epoch_and_the_same_in_every_run_of_a_seed(ray_local,
                                                                                   sample_dir):
    """Each ``build_dataset`` call stands for one run, each iteration for one epoch (Ray
    re-executes the block order then, as it does for every epoch of a Ray Train run)."""
    records = read_dataset(str(sample_dir), "ham10000")
    rows = encode_rows(records, order_classes({r.label for r in records}))

    def epoch_orders(seed: int, epochs: int = 2) -> list[list[str]]:
        dataset = build_dataset(rows, size=16, train=True, decode_batch_size=2, seed=seed)
        return [[str(i) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy")
                 for i in batch["image_id"]] for _ in range(epochs)]

    run, rerun, other_seed = epoch_orders(3), epoch_orders(3), epoch_orders(4)
    assert run == rerun
    assert run[0] != run[1] and sorted(run[0]) == sorted(run[1]) == sorted(r.image_id for r in records)
    assert run != other_seed


@pytest.mark.slow
def test_classifier_trains_from_a_pretrained_encoder_on_ground_truth_masks(ray_local, sample_dir,
                                                                           tmp_path):
    import torch

    from raysky.models import create_classifier

    # Recognisable "pretrained" weights: a fresh encoder with every parameter shifted by 0.25.
    torch.manual_seed(123)
    source = create_classifier("tiny").full_encoder
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.25)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "encoder.pth")

    # A learning rate of 1e-12 trains for real while leaving the weights where they started.
    code = main(["train", "classifier", "--data", str(sample_dir), "--gt-masks", "--preset", "tiny",
                 "--pretrained-encoder", str(tmp_path / "encoder.pth"), "--lr", "1e-12",
                 "--epochs", "1", "--batch-size", "4", "--workers", "1",
                 "--storage", str(tmp_path / "runs"), "--name", "pretrained"])
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "pretrained" / "result.json").read_text())
    total = 2 * len(source.state_dict())  # both streams start from the same file
    assert summary["metrics"]["pretrained_tensors_loaded"] == total
    assert summary["metrics"]["pretrained_tensors_total"] == total
    loaded = load_checkpoint(summary["best_checkpoint_uri"], expected_kind="classifier").model
    for stream in (loaded.full_encoder, loaded.lesion_encoder):
        trained = dict(stream.named_parameters())
        for name, value in source.named_parameters():
            torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
    # Ground-truth masks were used: no segmenter mask job ran.
    assert not (tmp_path / "runs" / "pretrained" / "masks").exists()
    assert summary["metrics"]["train_images"] > 0
    # The classifier's card names the encoder file and its sha256, and the run's recipe.
    best = Path(summary["best_checkpoint_uri"])
    card = json.loads((best / "model_card.json").read_text())
    digest = hashlib.sha256((tmp_path / "encoder.pth").read_bytes()).hexdigest()
    for stream in ("full_encoder", "lesion_encoder"):
        record = card["initial_weights"][stream]
        assert (record["source"], record["sha256"]) == (f"file:{tmp_path / 'encoder.pth'}", digest)
    assert card["recipe"]["lr"] == 1e-12 and card["model"]["classes"] == json.loads(
        (best / "config.json").read_text())["classes"]
    data = card["training_data"]
    assert sum(data["train_classes"].values()) == data["train_images"]
    assert data["split"].startswith("split_by_lesion") and len(data["split_ids_sha256"]) == 64
    assert digest in (best / "model_card.md").read_text()


@pytest.mark.slow
def test_an_epoch_that_cannot_read_over_1_percent_of_its_images_fails(ray_local, sample_copy,
                                                                      tmp_path):
    train, _, _ = load_splits(str(sample_copy), "ham10000", val_fraction=0.15, seed=0)
    for record in train[:2]:  # 2 of ~30 training images: well over 1%
        Path(record.image_uri).write_bytes(b"\xff\xd8\xff truncated")
    settings = TrainSettings(data=str(sample_copy), name="unreadable", epochs=1, max_failures=0,
                             storage=str(tmp_path / "runs"), **{**TINY, "workers": 1})
    with pytest.raises(Exception, match=r"2 of \d+ training images .* could not be read"):
        train_segmenter(settings)
    assert not list((tmp_path / "runs").rglob("checkpoint_epoch_*/model.safetensors"))
