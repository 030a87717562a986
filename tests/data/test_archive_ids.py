"""Ids that never refuse a run: repeated names across folders, unsafe names, ids kept on reruns.

The rules are unit-tested on listings; the end-to-end tests score a real archive of clinics
that reuse file names (and one unsafe name) with real Ray and tiny models, kill a run with
SIGKILL and rerun it, and add a duplicate name between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysky import results, storage
from raysky.data.archive import list_archive, read_archive
from raysky.data.ids import assign_ids, hashed_image_id, path_hash, stand_in_id
from raysky.score import ScoreSettings, score_archive
from raysky.score.inputs import kept_ids, list_inputs
from tests.helpers import REPO


def _ids(rels, **kwargs) -> dict[str, str]:
    return {rel: a.image_id for rel, a in zip(rels, assign_ids(rels, **kwargs), strict=True)}


def test_unique_names_keep_their_ids_and_repeated_names_take_their_paths():
    rels = ["clinic-a/IMG_0001.jpg", "clinic-b/IMG_0001.jpg", "clinic-b/ISIC_0024306.jpg",
            "x.png", "deep/er/x.jpg"]
    assert _ids(rels) == {"clinic-a/IMG_0001.jpg": "clinic-a~IMG_0001",
                          "clinic-b/IMG_0001.jpg": "clinic-b~IMG_0001",
                          "clinic-b/ISIC_0024306.jpg": "ISIC_0024306",  # today's id
                          "x.png": "x.png", "deep/er/x.jpg": "x"}


def test_a_path_id_never_takes_a_unique_name_and_collisions_get_a_hash():
    # "a~IMG.jpg" keeps its own name id; the path id of a/IMG.jpg would be the same, so it
    # takes the hashed form instead, whatever order the listing comes in.
    rels = ["a/IMG.jpg", "b/IMG.jpg", "a~IMG.jpg"]
    for order in (rels, rels[::-1]):
        ids = _ids(order)
        assert ids["a~IMG.jpg"] == "a~IMG" and ids["b/IMG.jpg"] == "b~IMG"
        assert ids["a/IMG.jpg"] == hashed_image_id("IMG", "a/IMG.jpg") == f"IMG~{path_hash('a/IMG.jpg')}"


def test_unsafe_folders_and_long_paths_fall_back_to_the_hash():
    long = "/".join(["f" * 60] * 4) + "/IMG.jpg"
    rels = ["bad:folder/IMG.jpg", "ok/IMG.jpg", long]
    ids = _ids(rels)
    assert ids["ok/IMG.jpg"] == "ok~IMG"
    assert ids["bad:folder/IMG.jpg"] == hashed_image_id("IMG", "bad:folder/IMG.jpg")
    assert ids[long] == hashed_image_id("IMG", long)
    assert all(not storage.name_problem(i, nested=False) for i in ids.values())


@pytest.mark.parametrize("name", ["patient's lesion.jpg", "scan[1].jpg", "a;b.png", "x:y.jpg"])
def test_unsafe_names_get_a_stand_in_id_and_a_problem(name):
    assigned = assign_ids([f"clinic/{name}", "clinic/fine.jpg"])
    assert assigned[1].image_id == "fine" and assigned[1].problem is None
    stand_in = assigned[0]
    assert stand_in.image_id == stand_in_id(f"clinic/{name}")
    assert not storage.name_problem(stand_in.image_id, nested=False)
    assert "unsafe file name for an image id" in stand_in.problem and "not allowed" in stand_in.problem


def test_kept_ids_win_so_a_folder_that_gains_a_duplicate_name_keeps_its_scored_id():
    first = _ids(["clinic-a/IMG_0001.jpg"])
    assert first == {"clinic-a/IMG_0001.jpg": "IMG_0001"}
    # Later clinic-b exports a file of the same name. In a new output both take their paths;
    # rerun into the output that holds IMG_0001, clinic-a keeps it and the newcomer yields.
    rels = ["clinic-a/IMG_0001.jpg", "clinic-b/IMG_0001.jpg"]
    assert set(_ids(rels).values()) == {"clinic-a~IMG_0001", "clinic-b~IMG_0001"}
    again = _ids(rels, kept={"clinic-a/IMG_0001.jpg": "IMG_0001"})
    assert again == {"clinic-a/IMG_0001.jpg": "IMG_0001", "clinic-b/IMG_0001.jpg": "clinic-b~IMG_0001"}
    # A top-level IMG_0001.jpg arriving next cannot take the kept id either.
    rels.append("IMG_0001.jpg")
    third = _ids(rels, kept={"clinic-a/IMG_0001.jpg": "IMG_0001",
                             "clinic-b/IMG_0001.jpg": "clinic-b~IMG_0001"})
    assert third["IMG_0001.jpg"] == hashed_image_id("IMG_0001", "IMG_0001.jpg")
    assert len(set(third.values())) == 3


def test_hundreds_of_folders_with_one_file_name_get_unique_safe_ids():
    rels = [f"site{i:05d}/IMG_0001.jpg" for i in range(600)]
    ids = [a.image_id for a in assign_ids(rels)]
    assert len(set(ids)) == 600 and ids[7] == "site00007~IMG_0001"
    assert not any(storage.name_problem(i, nested=False) for i in ids)
    assert ids == [a.image_id for a in assign_ids(list(reversed(rels)))][::-1]  # order-free


def _tree(root: Path, sample_dir: Path, names: dict[str, str]) -> None:
    images = sorted((sample_dir / "images").glob("*.jpg"))
    for i, rel in enumerate(names):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images[i % len(images)], target)


def test_listing_and_score_inputs_from_a_local_tree(tmp_path, sample_dir):
    root = tmp_path / "archive"
    _tree(root, sample_dir, dict.fromkeys(["a/IMG.jpg", "b/IMG.jpg", "b/odd;name.jpg",
                                           "c/scan.DCM", ".hidden/IMG.jpg", "b/._IMG.jpg"]))
    listing = list_archive(str(root))
    assert listing.paths == ["a/IMG.jpg", "b/IMG.jpg", "b/odd;name.jpg", "c/scan.DCM"]
    assert listing.image_ids[:2] == ["a~IMG", "b~IMG"] and listing.image_ids[3] == "scan.DCM"
    assert listing.problems[2].startswith("unsafe file name")
    with pytest.raises(ValueError, match=r"odd;name\.jpg: unsafe file name"):
        read_archive(str(root))  # datasets for training still refuse it
    # Scoring lists it with a read_error, so it gets its own error row.
    inputs = list_inputs(str(root))
    rows = inputs.table.to_pylist()
    assert [r["read_error"] is not None for r in rows] == [False, False, True, False]
    # Against an output that already holds a/IMG.jpg as "IMG", that id is kept.
    existing = pa.table({"image_id": ["IMG"], "source_uri": [str(root / "a/IMG.jpg")]})
    assert kept_ids(existing, [str(root / "a/IMG.jpg"), "elsewhere"]) == {
        str(root / "a/IMG.jpg"): "IMG"}
    again = list_inputs(str(root), done=pa.array(["IMG"]), existing=existing)
    assert (again.total, again.todo) == (4, 3)
    assert "IMG" not in again.table["image_id"].to_pylist()


def test_metadata_rows_can_name_files_that_share_a_name_by_their_paths(tmp_path, sample_dir):
    root = tmp_path / "archive"
    _tree(root, sample_dir, dict.fromkeys(["a/IMG.jpg", "b/IMG.jpg"]))
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,lesion_id\na/IMG.jpg,40,L1\nb/IMG,50,L2\n")
    records = {r.image_id: r for r in read_archive(str(root), str(meta))}
    assert (records["a~IMG"].age, records["a~IMG"].lesion_id) == (40.0, "L1")
    assert (records["b~IMG"].age, records["b~IMG"].lesion_id) == (50.0, "L2")


# ------------------------------------------------------------------------------------------
# End to end: real Ray, tiny models
# ------------------------------------------------------------------------------------------


CLINICS = ("clinic-a", "clinic-b", "clinic-c")


def _clinics(sample_dir: Path, root: Path, per_clinic: int = 4) -> int:
    """Every clinic names its files IMG_0001.jpg ... : the same names in each folder."""
    images = sorted((sample_dir / "images").glob("*.jpg"))
    for c, clinic in enumerate(CLINICS):
        (root / clinic).mkdir(parents=True)
        for i in range(per_clinic):
            shutil.copy(images[(c * per_clinic + i) % len(images)],
                        root / clinic / f"IMG_{i + 1:04d}.jpg")
    shutil.copy(images[-1], root / "clinic-a" / "patient's [copy];1.jpg")
    return len(CLINICS) * per_clinic + 1


def _kill_run(command: list[str], output: Path, env: dict) -> str:
    """Start ``raysky score``, SIGKILL it once a file is published, then the local Ray
    processes it started (by pid); return its log."""
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline:
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            with contextlib.suppress(psutil.Error):
                started.update(p.pid for p in psutil.Process(job.pid).children(recursive=True))
            time.sleep(0.1)
        started.update(p.pid for p in psutil.Process(job.pid).children(recursive=True))
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
    return job.stdout.read().decode()


@pytest.mark.slow
def test_clinics_sharing_file_names_score_in_one_run_and_a_killed_run_reruns_exactly_once(
        ray_local, sample_dir, tiny_checkpoints, tmp_path):
    archive, output = tmp_path / "archive", tmp_path / "results"
    total = _clinics(sample_dir, archive)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "raysky.cli.main", "score", "--input", str(archive),
               "--output", str(output), "--batch-size", "2", "--rows-per-file", "2",
               "--workers", "1", "--cpus-per-worker", "1", "--no-heatmaps",
               "--segmenter", tiny_checkpoints["segmenter"],
               "--classifier", tiny_checkpoints["classifier"]]
    _kill_run(command, output, env)
    assert (output / "_raysky.lock").exists(), "a run killed with SIGKILL leaves its lock"
    assert not (output / "_SUCCESS").exists()
    done = len(results.read(str(output), ["image_id"]))
    assert 0 < done < total, f"the run was not killed mid-way ({done} of {total})"

    settings = ScoreSettings(input=str(archive), output=str(output), batch_size=4,
                             rows_per_file=4, workers=1, cpus_per_worker=1, heatmaps=False,
                             progress=False, **tiny_checkpoints)
    summary = score_archive(settings)
    assert (summary.skipped, summary.scored) == (done, total - done)
    frame = results.read(str(output)).set_index("image_id")
    on_disk = pa.concat_tables(pq.read_table(p, columns=["image_id"])
                               for p in output.glob("part-*.parquet"))
    assert len(frame) == on_disk.num_rows == total, "duplicate or missing rows"
    assert frame["source_uri"].is_unique
    for clinic in CLINICS:
        row = frame.loc[f"{clinic}~IMG_0001"]
        assert row["status"] == "ok" and row["source_uri"] == str(archive / clinic / "IMG_0001.jpg")
    unsafe = frame[frame["source_uri"].str.endswith("patient's [copy];1.jpg")]
    assert len(unsafe) == 1 and unsafe.iloc[0]["status"] == "error"
    assert unsafe.iloc[0]["error_kind"] == "bad_input"
    assert "unsafe file name for an image id" in unsafe.iloc[0]["error"]
    assert not storage.name_problem(unsafe.index[0], nested=False)
    success = json.loads((output / "_SUCCESS").read_text())
    assert success["rows"] == success["inputs"] == total
    assert not (output / "_raysky.lock").exists()

    # clinic-d arrives with its own IMG_0001.jpg and a new top-level IMG_0009.jpg: only they
    # are scored, and no earlier id changes.
    before = set(frame.index)
    shutil.copytree(archive / "clinic-a", archive / "clinic-d",
                    ignore=shutil.ignore_patterns("patient*"))
    shutil.copy(archive / "clinic-a" / "IMG_0001.jpg", archive / "IMG_0009.jpg")
    again = score_archive(settings)
    assert (again.scored, again.skipped) == (5, total)
    after = results.read(str(output), ["image_id", "source_uri"])
    assert before <= set(after["image_id"]) and len(after) == total + 5
    assert {"clinic-d~IMG_0001", "IMG_0009"} <= set(after["image_id"])


@pytest.mark.slow
def test_a_scored_name_keeps_its_id_when_another_folder_gains_it(ray_local, sample_dir,
                                                                 tiny_checkpoints, tmp_path):
    archive, output = tmp_path / "archive", tmp_path / "results"
    images = sorted((sample_dir / "images").glob("*.jpg"))
    (archive / "clinic-a").mkdir(parents=True)
    shutil.copy(images[0], archive / "clinic-a" / "IMG_0001.jpg")
    settings = ScoreSettings(input=str(archive), output=str(output), batch_size=2, workers=1,
                             cpus_per_worker=1, heatmaps=False, progress=False,
                             **tiny_checkpoints)
    score_archive(settings)
    assert results.read(str(output))["image_id"].tolist() == ["IMG_0001"]
    (archive / "clinic-b").mkdir()
    shutil.copy(images[1], archive / "clinic-b" / "IMG_0001.jpg")
    summary = score_archive(settings)
    assert (summary.scored, summary.skipped) == (1, 1)
    frame = results.read(str(output)).set_index("image_id")
    assert frame.loc["IMG_0001", "source_uri"] == str(archive / "clinic-a" / "IMG_0001.jpg")
    assert frame.loc["clinic-b~IMG_0001", "source_uri"] == str(archive / "clinic-b" / "IMG_0001.jpg")
