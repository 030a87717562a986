"""benchmarks/quality.py end to end on small data: ``run`` trains a tiny segmenter and two
classifier arms through the product's training path and scores each val view, a second ``run``
adds the TTA and larger-input views without retraining, and ``report`` writes every figure with
its interval.
The figures mean nothing about a model here; the test checks that each is produced and that
their bookkeeping (lesion counts, views, paired differences) is right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import dihedral_dataset, load_benchmark


@pytest.mark.slow
def test_quality_benchmark_trains_scores_and_reports(sample_dir, ray_local, tmp_path):
    data, out = tmp_path / "ham", tmp_path / "quality"
    dihedral_dataset(sample_dir, data, val_per_class=2)
    quality = load_benchmark("quality")
    common = ["--data", str(data), "--preset", "tiny", "--out", str(out),
              "--arms", "shared", "single"]
    assert quality.main(["run", *common, "--seeds", "0", "--threads", "1"]) == 0
    trained = json.loads((out / "runs.json").read_text())
    assert set(trained) == {"seg-s0", "cls-shared-s0", "cls-single-s0"}
    for key in ("cls-shared-s0", "cls-single-s0"):
        assert set(trained[key]["results"]) == set(quality.DEFAULT_VIEWS)

    # A view asked for later is scored for the runs already trained, which are not retrained.
    later = ("frame200_tta", "frame200_at192", "crop224_at192")
    assert quality.main(["run", *common, "--seeds", "0", "--views", *later]) == 0
    rescored = json.loads((out / "runs.json").read_text())
    for key in ("cls-shared-s0", "cls-single-s0"):
        assert rescored[key]["wall_s"] == trained[key]["wall_s"]
        assert rescored[key]["checkpoint"] == trained[key]["checkpoint"]
        assert (out / "results" / key / "frame200-tta" / "_SUCCESS").exists()
        assert (out / "results" / key / "frame200-at192" / "_SUCCESS").exists()
        assert (out / "results" / key / "crop224-at192" / "_SUCCESS").exists()
        # The larger-input view runs a copy of the same weights that says 192 px.
        resized = json.loads((out / "resized" / f"{key}-192" / "config.json").read_text())
        original = json.loads((Path(trained[key]["checkpoint"]) / "config.json").read_text())
        assert resized["input_size"] == 192 != original["input_size"]
        assert resized["weights_sha256"] == original["weights_sha256"]
        seconds = rescored[key]["score_view_s"]
        assert set(seconds) == {*quality.DEFAULT_VIEWS, *later}
        assert {v: seconds[v] for v in quality.DEFAULT_VIEWS} == trained[key]["score_view_s"]

    assert quality.main(["report", *common]) == 0
    figures = json.loads((out / "figures.json").read_text())
    with open(data / "HAM10000_metadata.csv", newline="") as f:
        lesions = {r["image_id"]: (r["lesion_id"], r["dx"]) for r in csv.DictReader(f)}
    val = {lesions[line.split(",")[0]] for line in
           (data / "splits.csv").read_text().splitlines()[1:] if line.endswith(",val")}
    for key in ("cls-shared-s0", "cls-single-s0"):
        run = figures["runs"][key]
        for name in ("balanced_accuracy", "balanced_accuracy_offsets",
                     "balanced_accuracy_frame200_tta", "auc_frame200_tta", "auc_crop224",
                     "balanced_accuracy_offsets_frame200_at192"):
            assert run[name]["low"] <= run[name]["value"] <= run[name]["high"], name
        per_class = run["auc_per_class"]
        assert set(per_class) == {dx for _lesion, dx in val}
        for dx, entry in per_class.items():
            assert entry["lesions"] == len({lesion for lesion, d in val if d == dx})
            assert entry["images"] == 8 * entry["lesions"]  # no sample lesion has two images
        influential = run["auc_most_influential_lesion"]
        if influential["lesion"] is not None:  # None: no lesion moves the macro AUC at all
            assert (influential["lesion"], influential["class"]) in val
            assert influential["images"] == 8
            assert influential["macro_auc_without"] == pytest.approx(
                run["auc"]["value"] + influential["change"])
    assert set(figures["summary"]) == {"shared", "single"}
    assert "balanced_accuracy_offsets_frame200_tta" in figures["summary"]["shared"]
    difference = figures["differences"]["single - shared (offsets)"]
    assert len(difference["per_seed"]) == 1
    # The same weights at 192 px against the side they trained at, paired on the same images
    # of the same view (the frames against the frames, the crops against the crops), and
    # with test-time augmentation against without.
    for arm in ("shared", "single"):
        for view, base in (("frame200_at192", "frame200"), ("crop224_at192", "crop224"),
                           ("frame200_tta", "frame200")):
            for figure in ("argmax", "offsets", "auc"):
                larger = figures["differences"][f"{arm}: {view} - {base} ({figure})"]
                (seed,) = larger["per_seed"]
                assert seed["low"] <= seed["value"] <= seed["high"]
        assert not any(key.startswith(f"{arm}: no_metadata_at192") for key in figures["differences"])
