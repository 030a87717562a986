"""benchmarks/clinical.py end to end on small data, so it is ready for the trained models:
the bundled sample in its eight dihedral views (same lesion ids, so the lesion-disjoint halves
keep each lesion's views together; 120 malignant and 160 benign images, enough for each half
to calibrate), tiny checkpoints in the layout benchmarks/quality.py leaves, the gate as OOD
method. The figures mean nothing about a model here; the test checks that every one is produced, through the product's commands."""

from __future__ import annotations

import csv
import json

import pytest

from raysky.cli.main import main
from tests.helpers import dihedral_dataset, load_benchmark


def test_clinical_benchmark_runs_on_tiny_models(sample_dir, tiny_checkpoints, ray_local,
                                                tmp_path):
    data = tmp_path / "ham"
    dihedral_dataset(sample_dir, data)
    # The layout benchmarks/quality.py run leaves: the val frames, their metadata, the scored
    # frames and runs.json naming each model.
    run = tmp_path / "run"
    images = run / "val" / "frame200"
    images.mkdir(parents=True)
    for path in sorted((data / "images").glob("*.jpg")):
        (images / path.name).symlink_to(path)
    with open(data / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (run / "val" / "metadata.csv").write_text("image_id,age,sex,localization\n" + "".join(
        f"{r['image_id']},{r['age']},{r['sex']},{r['localization']}\n" for r in rows))
    seg, cls = tiny_checkpoints["segmenter"], tiny_checkpoints["classifier"]
    scored = run / "results" / "cls-shared-s0" / "frame200"
    assert main(["score", "--input", str(images), "--metadata", str(run / "val" / "metadata.csv"),
                 "--segmenter", seg, "--classifier", cls, "--no-heatmaps",
                 "--output", str(scored)]) == 0
    (run / "runs.json").write_text(json.dumps({
        "seg-s0": {"checkpoint": seg},
        "cls-shared-s0": {"arm": "shared", "seed": 0, "checkpoint": cls, "segmenter": "seg-s0",
                          "results": {"frame200": str(scored)}}}))

    clinical = load_benchmark("clinical")
    with pytest.raises(SystemExit, match="no cls-shared-s1; run quality.py run"):
        clinical.run_models(run, seed=1)
    assert clinical.main(["--data", str(data), "--run", str(run), "--seed", "0",
                          "--skip-robustness", "--ood-methods", "imagenet-gate",
                          "--per-kind", "2"]) == 0
    figures = json.loads((run / "clinical-s0" / "figures.json").read_text())
    assert (figures["segmenter"], figures["classifier"]) == (seg, cls)
    assert figures["val_results"] == str(scored) and figures["single_stream"] is None
    assert figures["in_sample"]["after"]["ece"] is not None
    for half in (1, 2):
        decision = figures[f"decision_half{half}"]
        assert decision["images"] > 100  # a half of 280 images, lesions kept whole
        for key in ("before", "after"):
            assert 0.0 <= decision[key]["value"] <= 1.0
            assert decision[key]["low"] <= decision[key]["value"] <= decision[key]["high"]
        assert decision["difference"]["value"] == decision["after"]["value"] - \
            decision["before"]["value"]
        assert set(decision["decision_offsets"]) == {"mel", "nv", "bcc", "akiec", "bkl", "df",
                                                     "vasc"}
        assert decision["decision_rule"]["variant"] in ("prior", "prior+classwise")
        ood = figures[f"ood_half{half}-imagenet-gate"]
        assert {"photo", "text", "screenshot", "chart", "clinical"} <= set(ood["auroc_by_kind"])
        assert 0.0 <= ood["auroc"] <= 1.0 and ood["photos"] >= 30
        assert set(ood["dermoscopy_flagged_by_class"]) == {"mel", "nv", "bcc", "akiec", "bkl",
                                                           "df", "vasc"}
        assert figures[f"cross_fit_half{half}"]["referral"] is not None


def test_clinical_models_come_from_the_run_unless_given(tmp_path):
    # quality.py's runs.json names the models; a checkpoint given instead means the run's val
    # scores belong to other models, so they are scored again (val_results None).
    (tmp_path / "runs.json").write_text(json.dumps({
        "seg-s0": {"checkpoint": "seg0"},
        "cls-shared-s0": {"checkpoint": "shared0", "segmenter": "seg-s0",
                          "results": {"frame200": "scored0"}},
        "cls-single-s0": {"checkpoint": "single0", "segmenter": "seg-s0"}}))
    clinical = load_benchmark("clinical")
    args = clinical._parse_args(["--data", "d", "--run", str(tmp_path)])
    assert clinical._models(args) == {"segmenter": "seg0", "classifier": "shared0",
                                      "val_results": "scored0", "single_stream": "single0"}
    args = clinical._parse_args(["--data", "d", "--run", str(tmp_path), "--segmenter", "seg9"])
    assert clinical._models(args) == {"segmenter": "seg9", "classifier": "shared0",
                                      "val_results": None, "single_stream": "single0"}
    args = clinical._parse_args(["--data", "d", "--run", str(tmp_path / "none"),
                                 "--segmenter", "s", "--classifier", "c"])
    assert clinical._models(args) == {"segmenter": "s", "classifier": "c", "val_results": None,
                                      "single_stream": None}
    with pytest.raises(SystemExit, match="runs.json: no such file"):
        clinical.run_models(tmp_path / "none", seed=0)
