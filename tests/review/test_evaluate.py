"""``raysky evaluate``: metrics on the bundled sample, cross-checked against ISIC's own scorer.

The results tables are written here, in the schema of ``raysky score``'s Parquet, from the
sample's real masks and labels with controlled perturbations, so that every metric lands in an
informative range (Jaccard on both sides of 0.65, ties in the argmax, imperfect AUCs). The
official ``isic-challenge-scoring`` 5.6.0 runs from ``.venv-isic`` (``make test`` creates it)
on CSV and PNG files written from the same rows.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysky import storage
from raysky.cli.main import main
from raysky.data.records import DatasetRef
from raysky.data.taxonomy import HAM10000_CLASSES, ISIC_COLUMN_NAMES, MALIGNANT_CLASSES
from raysky.metrics.isic import auc_above_sensitivity, average_precision, sensitivity_specificity
from raysky.review.evaluate import evaluate
from raysky.review.inputs import read_results
from raysky.review.output import format_table
from raysky.review.task_metrics import focus_statistics
from tests.helpers import (
    EXTRA_ID,
    REPO,
    TIE_INDICES,
    synthetic_rows,
    write_results,
)

ISIC_PYTHON = REPO / ".venv-isic" / "bin" / "python"
TOL = 1e-6

@pytest.fixture(scope="module")
def synthetic(sample_dir, tmp_path_factory):
    """The sample's records, the synthetic rows and their results Parquet file."""
    records, rows = synthetic_rows(sample_dir)
    path = tmp_path_factory.mktemp("results") / "results.parquet"
    write_results(str(path), rows, HAM10000_CLASSES)
    return records, rows, path


@pytest.fixture(scope="module")
def evaluated(synthetic, sample_dir, tmp_path_factory):
    """``raysky evaluate`` run through the CLI on the synthetic results: (exit code, JSON)."""
    _, _, path = synthetic
    out = tmp_path_factory.mktemp("eval") / "metrics.json"
    code = main(["evaluate", "--results", str(path), "--data", str(sample_dir),
                 "--format", "ham10000", "--out", str(out)])
    return code, json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# The official scorer
# --------------------------------------------------------------------------------------------


def run_isic(*args: str) -> dict:
    """Run ``isic-challenge-scoring`` from its own venv and return its JSON output."""
    assert ISIC_PYTHON.exists(), (
        f"{ISIC_PYTHON} is missing: run `make .venv-isic/.installed` (make test does it)")
    proc = subprocess.run([str(ISIC_PYTHON), "-m", "isic_challenge_scoring", "-o", "json", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_isic_classification(directory: Path, image_ids, labels, probs: pd.DataFrame,
                              columns: dict[str, str]) -> tuple[Path, Path]:
    """ISIC-format ground-truth and prediction CSVs; ``columns`` maps class code to CSV name."""
    truth = pd.DataFrame({"image": image_ids})
    pred = pd.DataFrame({"image": image_ids})
    for code, name in columns.items():
        truth[name] = [1.0 if label == code else 0.0 for label in labels]
        pred[name] = probs[code].to_numpy(dtype=np.float64)
    truth_csv, pred_csv = directory / "truth.csv", directory / "pred.csv"
    truth.to_csv(truth_csv, index=False)
    # float64 repr round-trips exactly, so both sides see the same probabilities.
    pred.to_csv(pred_csv, index=False, float_format="%.17g")
    return truth_csv, pred_csv


def _close(ours, theirs, what: str) -> None:
    assert ours is not None, f"{what}: raysky gave null, ISIC {theirs}"
    assert abs(ours - theirs) <= TOL, f"{what}: raysky {ours} != ISIC {theirs}"


def _ok_rows(rows, records):
    by_id = {r.image_id: r for r in records}
    return [row for row in rows if row["status"] == "ok" and row["image_id"] in by_id]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_evaluate_counts_coverage_and_writes_isic_names(evaluated):
    code, metrics = evaluated
    assert code == 0
    cov = metrics["coverage"]
    assert cov == {**cov, "results": 36, "ground_truth": 35, "matched": 35, "scoring_errors": 1,
                   "results_without_ground_truth": 1, "ground_truth_without_results": 0}
    assert cov["examples_without_ground_truth"] == [EXTRA_ID]
    cls, seg = metrics["classification"], metrics["segmentation"]
    assert cls["n"] == 34 and seg["n"] == 34
    for key in ("balanced_accuracy", "auc", "auc_sens_80", "ap", "sensitivity", "specificity"):
        assert 0.0 <= cls[key] <= 1.0, key
    for key in ("dice", "jaccard", "threshold_jaccard"):
        assert 0.0 <= seg[key] <= 1.0, key
    # The perturbations put images on both sides of ISIC's 0.65 Jaccard threshold.
    jaccards = [row["jaccard"] for row in seg["per_image"]]
    assert min(jaccards) < 0.65 < max(jaccards)
    cm = cls["confusion_matrix"]
    assert sum(cm["undecided"]) == len(TIE_INDICES)
    assert sum(map(sum, cm["matrix"])) + sum(cm["undecided"]) == cls["n"]
    assert metrics["lesion_focus"]["missing"] > 0
    table = format_table(metrics)  # what the CLI printed, rebuilt from the JSON
    for word in ("balanced_accuracy", "threshold_jaccard", "confusion matrix", "Lesion focus"):
        assert word in table


def test_classification_matches_official_isic_scorer(evaluated, synthetic, tmp_path):
    _, metrics = evaluated
    records, rows, _ = synthetic
    ok = _ok_rows(rows, records)
    labels = {r.image_id: r.label for r in records}
    ids = [row["image_id"] for row in ok]
    probs = pd.DataFrame({c: [row[f"prob_{c}"] for row in ok] for c in HAM10000_CLASSES})
    names = ISIC_COLUMN_NAMES["isic2018"]
    truth_csv, pred_csv = write_isic_classification(
        tmp_path, ids, [labels[i] for i in ids], probs, names)
    official = run_isic("classification", str(truth_csv), str(pred_csv))
    cls = metrics["classification"]
    _close(cls["balanced_accuracy"], official["aggregate"]["balanced_accuracy"], "balanced_accuracy")
    per_category = official["per_category"]
    for key in ("auc", "auc_sens_80", "ap", "sensitivity", "specificity"):
        _close(cls[key], official["macro_average"][key], f"macro {key}")
        for code, name in names.items():
            _close(cls["per_class"][code][key], per_category[key][name], f"{code} {key}")
    # The sample has 5 images per class and one melanoma failed to score: its 4 positives put
    # 80% sensitivity between ROC points, where auc_sens_80 interpolates.
    assert cls["per_class"]["mel"]["support"] == 4


def test_malignant_metrics_match_official_isic_scorer(evaluated, synthetic, tmp_path):
    _, metrics = evaluated
    records, rows, _ = synthetic
    ok = _ok_rows(rows, records)
    labels = {r.image_id: r.label for r in records}
    ids = [row["image_id"] for row in ok]
    binary_labels = ["malignant" if labels[i] in MALIGNANT_CLASSES else "benign" for i in ids]
    malignant = np.array([row["malignant_prob"] for row in ok], dtype=np.float64)
    probs = pd.DataFrame({"malignant": malignant, "benign": 1.0 - malignant})
    truth_csv, pred_csv = write_isic_classification(
        tmp_path, ids, binary_labels, probs, {"malignant": "MALIGNANT", "benign": "BENIGN"})
    official = run_isic("classification", str(truth_csv), str(pred_csv), "-m", "auc")
    ours = metrics["classification"]["malignant"]
    for key in ("auc", "auc_sens_80", "ap", "sensitivity", "specificity"):
        _close(ours[key], official["per_category"][key]["MALIGNANT"], f"malignant {key}")


def test_segmentation_matches_official_isic_scorer(evaluated, synthetic, tmp_path):
    _, metrics = evaluated
    records, rows, _ = synthetic
    by_id = {r.image_id: r for r in records}
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for row in _ok_rows(rows, records):
        image_id = row["image_id"]
        (truth_dir / f"{image_id}_segmentation.png").write_bytes(
            Path(by_id[image_id].mask_uri).read_bytes())
        (pred_dir / f"{image_id}.png").write_bytes(row["mask_png"])
    official = run_isic("segmentation", str(truth_dir), str(pred_dir))["macro_average"]
    seg = metrics["segmentation"]
    for key in ("dice", "jaccard", "threshold_jaccard"):
        _close(seg[key], official[key], key)


def test_evaluate_reads_s3_and_partitioned_results(synthetic, sample_dir, s3, evaluated, tmp_path):
    from raysky.storage import upload_directory

    records, rows, _ = synthetic
    bucket = s3.create_bucket("evaluate-test")
    upload_directory(str(sample_dir), f"{bucket}/sample")
    write_results(f"{bucket}/results", rows, HAM10000_CLASSES, parts=3)
    remote = evaluate(f"{bucket}/results", DatasetRef(f"{bucket}/sample", "ham10000"))
    _, local = evaluated
    assert remote["coverage"] == local["coverage"]
    assert remote["classification"]["confusion_matrix"] == local["classification"]["confusion_matrix"]
    for key in ("balanced_accuracy", "auc", "auc_sens_80", "ap"):
        assert remote["classification"][key] == pytest.approx(local["classification"][key])
    for key in ("dice", "jaccard", "threshold_jaccard"):
        assert remote["segmentation"][key] == pytest.approx(local["segmentation"][key])
    # --out accepts an s3:// URI too.
    assert main(["evaluate", "--results", f"{bucket}/results", "--data", f"{bucket}/sample",
                 "--format", "ham10000", "--out", f"{bucket}/metrics.json"]) == 0
    written = json.loads(storage.read_bytes(f"{bucket}/metrics.json"))
    assert written["classification"]["auc"] == pytest.approx(local["classification"]["auc"])


def test_evaluate_extends_classes_the_model_lacks(sample_dir, tmp_path):
    # A model trained without "vasc" scored against all seven classes: vasc gets probability 0.
    records, rows = synthetic_rows(sample_dir, seed=1)
    classes = [c for c in HAM10000_CLASSES if c != "vasc"]
    for row in rows:
        row.pop("prob_vasc", None)
    path = tmp_path / "results.parquet"
    write_results(str(path), rows, classes)
    metrics = evaluate(str(path), DatasetRef(str(sample_dir), "ham10000"))
    cls = metrics["classification"]
    assert metrics["model_classes"] == classes
    assert cls["classes"] == list(HAM10000_CLASSES)
    assert cls["classes_not_predicted"] == ["vasc"]
    assert cls["per_class"]["vasc"]["recall"] == 0.0
    assert cls["per_class"]["vasc"]["auc"] == pytest.approx(0.5)


def test_evaluate_reports_bad_input_clearly(sample_dir, synthetic, tmp_path, capsys):
    _, rows, path = synthetic
    missing = tmp_path / "nope.parquet"
    assert main(["evaluate", "--results", str(missing), "--data", str(sample_dir),
                 "--format", "ham10000"]) == 2
    assert f"{missing}: no such file or object" in capsys.readouterr().err

    not_parquet = tmp_path / "results.parquet"
    not_parquet.write_text("image_id,status\n")
    assert main(["evaluate", "--results", str(not_parquet), "--data", str(sample_dir),
                 "--format", "ham10000"]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err

    no_probs = tmp_path / "no_probs.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "status": ["ok"]}), no_probs)
    assert main(["evaluate", "--results", str(no_probs), "--data", str(sample_dir),
                 "--format", "ham10000"]) == 2
    assert "no prob_<class> probability columns" in capsys.readouterr().err

    bad_class = tmp_path / "bad_class.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "status": ["ok"], "prob_cat": [1.0]}), bad_class)
    assert main(["evaluate", "--results", str(bad_class), "--data", str(sample_dir),
                 "--format", "ham10000"]) == 2
    assert "column 'prob_cat'" in capsys.readouterr().err

    # A retried image has an error row and an ok row: the ok row is the one evaluated.
    duplicated = tmp_path / "duplicated.parquet"
    failed = {**rows[1], "status": "error", "error": "truncated image"}
    write_results(str(duplicated), [failed, rows[1], rows[2]], HAM10000_CLASSES)
    frame = read_results(str(duplicated))
    assert list(frame["image_id"]) == sorted([rows[1]["image_id"], rows[2]["image_id"]])
    assert set(frame["status"]) == {"ok"}

    strangers = tmp_path / "strangers.parquet"
    write_results(str(strangers), [rows[-1]], HAM10000_CLASSES)
    assert main(["evaluate", "--results", str(strangers), "--data", str(sample_dir),
                 "--format", "ham10000"]) == 2
    assert "no result in" in capsys.readouterr().err

    assert main(["evaluate", "--results", str(path), "--data", str(sample_dir),
                 "--format", "ham10000", "--split", "test"]) == 2
    assert "--split test: needs" in capsys.readouterr().err


def test_split_restricts_the_figures_to_held_out_images(synthetic, sample_copy):
    records, rows, path = synthetic
    held_out = sorted(r.image_id for r in records)[::5]
    scored = {row["image_id"] for row in _ok_rows(rows, records)}
    lines = ["image_id,split"] + [f"{r.image_id},{'test' if r.image_id in held_out else 'train'}"
                                  for r in records]
    (sample_copy / "splits.csv").write_text("\n".join(lines) + "\n")
    metrics = evaluate(str(path), DatasetRef(str(sample_copy), "ham10000", split="test"))
    assert metrics["split"] == "test"
    assert metrics["classification"]["n"] == len(scored & set(held_out)) > 0
    everything = evaluate(str(path), DatasetRef(str(sample_copy), "ham10000"))
    assert everything["classification"]["n"] == len(scored)


def test_focus_statistics_and_binary_metric_edge_cases():
    stats = focus_statistics([0.2, 0.6, math.nan, 0.9], area_frac=[0.1, 0.3, 0.2, 0.5],
                             correct=[False, True, True, True], low_threshold=0.5)
    assert stats["n"] == 3 and stats["missing"] == 1 and stats["low_focus"] == 1
    assert stats["median"] == pytest.approx(0.6)
    assert stats["mean_area_frac"] == pytest.approx(0.3)
    assert stats["mean_correct"] == pytest.approx(0.75) and stats["mean_wrong"] == pytest.approx(0.2)
    assert focus_statistics([math.nan])["n"] == 0

    truth = np.array([1, 1, 0, 0, 0], dtype=bool)
    # The curve above 80% sensitivity, integrated over FPR: the whole unit square for a perfect
    # ranking, nothing for the worst one, and from FPR 1/3 on at TPR 1 for this one.
    assert auc_above_sensitivity(truth, [0.9, 0.8, 0.3, 0.2, 0.1]) == pytest.approx(1.0)
    assert auc_above_sensitivity(truth, [0.1, 0.2, 0.7, 0.8, 0.9]) == pytest.approx(0.0)
    assert auc_above_sensitivity(truth, [0.9, 0.3, 0.8, 0.2, 0.1]) == pytest.approx(2 / 3)
    assert math.isnan(auc_above_sensitivity(np.zeros(3, bool), [0.1, 0.2, 0.3]))
    assert average_precision(truth, [0.9, 0.8, 0.3, 0.2, 0.1]) == pytest.approx(1.0)
    assert math.isnan(average_precision(np.zeros(3, bool), [0.1, 0.2, 0.3]))
    # ISIC's per-category rates: probabilities above 0.5 are positive.
    sens, spec = sensitivity_specificity(truth, np.array([0.9, 0.4, 0.6, 0.2, 0.1]) > 0.5)
    assert sens == pytest.approx(0.5) and spec == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="min_sensitivity"):
        auc_above_sensitivity(truth, [0.1] * 5, 0.0)


def test_read_results_selects_columns_and_rows(synthetic):
    _, rows, path = synthetic
    wanted = [rows[1]["image_id"], rows[2]["image_id"]]
    frame = read_results(str(path), columns=["image_id", "lesion_focus", "not_a_column"],
                         image_ids=wanted)
    assert sorted(frame["image_id"]) == sorted(wanted)
    assert "mask_png" not in frame.columns and "lesion_focus" in frame.columns
    assert "prob_mel" in frame.columns  # class columns always come along


def test_an_undecodable_mask_is_listed_and_the_rest_scored(sample_dir, tmp_path):
    # One result's mask_png is not a PNG: it is named under undecodable_masks, with the reason,
    # and the other masks are still scored.
    records, rows = synthetic_rows(sample_dir, seed=2)
    with_masks = [row for row in rows if row["status"] == "ok" and row.get("mask_png")]
    broken = with_masks[0]
    broken["mask_png"] = b"not a png"
    path = tmp_path / "results.parquet"
    write_results(str(path), rows, HAM10000_CLASSES)
    segmentation = evaluate(str(path), DatasetRef(str(sample_dir), "ham10000"))["segmentation"]
    assert [bad["image_id"] for bad in segmentation["undecodable_masks"]] == [broken["image_id"]]
    assert segmentation["undecodable_masks"][0]["error"]
    assert segmentation["n"] == len([r for r in with_masks
                                     if r["image_id"] in {rec.image_id for rec in records}]) - 1
