"""``raysky demo`` end to end, through the command a user runs, and its held-out split: its
figures must come from images training never saw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from raysky.data import read_dataset
from raysky.data.splits import per_class_split
from tests.helpers import REPO

DEMO_TIMEOUT_S = 600


def _raysky_command() -> list[str]:
    """The installed ``raysky`` script beside this interpreter, else ``python -m raysky``."""
    script = Path(sys.executable).parent / "raysky"
    return [str(script)] if script.exists() else [sys.executable, "-m", "raysky"]


def _run_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``raysky ARGS`` in ``cwd`` with this checkout's code, killing its whole process
    group (the demo's Ray, Serve and S3 server) if it overruns."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([*_raysky_command(), *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"raysky {' '.join(args)} ran past {timeout} s:\n{output[-5000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, output, None)


@pytest.mark.slow
def test_raysky_demo_runs_end_to_end_on_the_bundled_sample(tmp_path):
    """What ``make demo`` runs, from a folder outside the repository, with the default data
    location; only the model sizes and epochs are cut through the demo's own flags."""
    out = tmp_path / "out"
    done = _run_cli(["demo", "--preset", "tiny", "--segmenter-epochs", "1",
                     "--classifier-epochs", "1", "--workers", "1", "--out", str(out)],
                    cwd=tmp_path, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-8000:]
    for step in range(1, 8):
        assert f"== [{step}/7]" in done.stdout
    assert "73 files -> s3://raysky-demo/datasets/sample" in done.stdout
    assert "35 images + metadata.csv" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["data"].endswith("ham10000_sample")
    assert summary["scoring"]["scored"] == 35 and summary["scoring"]["scored_error"] == 0
    answer = summary["live_prediction"]
    assert answer["predicted_class"] in answer["classes"] and 0 <= answer["malignant_prob"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["coverage"]["matched"] == 7 and metrics["split"] == "test"
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert list(out.glob("*_heatmap.png")) and list(out.glob("*_mask.png"))


def test_demo_refuses_a_missing_data_folder_before_anything_starts(tmp_path):
    done = _run_cli(["demo", "--data", "/no/such/folder", "--out", str(tmp_path / "out")],
                    cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stdout
    assert "/no/such/folder: no such folder" in done.stdout
    assert "Ray" not in done.stdout and "moto" not in done.stdout
    assert not (tmp_path / "out").exists()


def test_held_out_split_is_lesion_disjoint_and_keeps_every_class_in_test(sample_copy):
    import csv

    # Pair up images into two-image lesions so that disjointness is actually tested.
    path = sample_copy / "HAM10000_metadata.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["lesion_id"] = f"L{row['dx']}{i % 5 // 2}"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = read_dataset(str(sample_copy), "ham10000")
    splits = per_class_split(records, per_class=(1, 1))
    assert set(splits) == {r.image_id for r in records}
    lesion_splits = defaultdict(set)
    for record in records:
        lesion_splits[record.lesion_id].add(splits[record.image_id])
    assert all(len(s) == 1 for s in lesion_splits.values())
    test_classes = Counter(r.label for r in records if splits[r.image_id] == "test")
    assert set(test_classes) == {r.label for r in records}


def test_held_out_split_of_the_bundled_sample(sample_dir):
    records = read_dataset(str(sample_dir), "ham10000")
    counts = Counter(per_class_split(records).values())
    assert counts == {"train": 21, "val": 7, "test": 7}
