"""The subgroup audit in ``raysky evaluate`` and ``raysky report``: groups from the results,
the records and the dataset's metadata file, the referral threshold on calibrated
probabilities, and the clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from raysky.calibration.temperature import recalibrate
from raysky.cli.main import main
from raysky.data.readers import metadata_frame
from raysky.data.taxonomy import HAM10000_CLASSES, MALIGNANT_CLASSES
from raysky.review.evaluate import evaluate_frame
from tests.helpers import synthetic_rows, write_results

CLASSES = list(HAM10000_CLASSES)


@pytest.fixture(scope="module")
def scored(sample_dir, tmp_path_factory):
    records, rows = synthetic_rows(sample_dir)
    path = tmp_path_factory.mktemp("subgroups") / "results.parquet"
    write_results(str(path), rows, CLASSES)
    frame = pd.DataFrame(rows)
    return records, frame, str(path)


def _truth(frame: pd.DataFrame, records) -> pd.DataFrame:
    """The ok rows with their label, sex and dx_type, joined here without raysky's code."""
    meta = pd.read_csv(f"{records[0].image_uri.rsplit('/images/', 1)[0]}/HAM10000_metadata.csv")
    ok = frame[frame["status"] == "ok"].merge(meta, on="image_id")
    ok["malignant"] = ok["dx"].isin(MALIGNANT_CLASSES)
    return ok


def test_groups_match_an_independent_computation(scored, sample_dir):
    records, frame, _path = scored
    audit = evaluate_frame(frame, records, by=["dx_type"],
                           metadata=metadata_frame(str(sample_dir), "ham10000"))["subgroups"]
    truth = _truth(frame, records)
    sexes = {g["group"]: g for g in audit["groupings"]["sex"]["groups"]}
    for sex, rows in truth.groupby("sex"):
        group = sexes[sex]
        assert (group["n"], group["malignant_n"]) == (len(rows), int(rows["malignant"].sum()))
        if rows["malignant"].nunique() == 2:
            assert group["malignant_auc"]["value"] == pytest.approx(
                roc_auc_score(rows["malignant"], rows["malignant_prob"]))
        low, high = group["malignant_auc"]["low"], group["malignant_auc"]["high"]
        assert low is None or low <= group["malignant_auc"]["value"] <= high
    # The sample has 15 malignant images: every group is too few to rank.
    assert all(g["too_few"] and g["rank"] is None for g in sexes.values())
    # dx_type comes from HAM10000_metadata.csv, which the records do not keep.
    by_type = {g["group"]: g for g in audit["groupings"]["dx_type"]["groups"]}
    assert {k: v["n"] for k, v in by_type.items()} == truth["dx_type"].value_counts().to_dict()
    follow_up = by_type["follow_up"]  # only naevi are confirmed by follow-up
    assert follow_up["malignant_n"] == 0 and follow_up["malignant_auc"]["value"] is None
    assert follow_up["malignant_auc"]["reason"] == "no malignant images"
    # No calibrated checkpoint: no threshold, and the reason says so.
    assert audit["overall"]["sensitivity"]["reason"] == "no referral threshold given"
    assert audit["unavailable"]["skin_tone"] == "no skin_tone or ita_deg values"


def test_the_referral_threshold_applies_to_calibrated_probabilities(scored):
    records, frame, _path = scored
    calibration = {"version": "cal-test", "temperature": 2.0,
                   "referral": {"threshold": 0.3, "target_sensitivity": 0.95}}
    audit = evaluate_frame(frame, records, checkpoint_calibration=calibration)["subgroups"]
    truth = _truth(frame, records)
    probs = recalibrate(truth[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64), 2.0)
    malignant = probs[:, [CLASSES.index(c) for c in MALIGNANT_CLASSES if c in CLASSES]].sum(1)
    referred = malignant >= 0.3
    is_malignant = truth["malignant"].to_numpy()
    assert audit["threshold"] == 0.3
    assert audit["overall"]["sensitivity"]["value"] == pytest.approx(referred[is_malignant].mean())
    assert audit["overall"]["specificity"]["value"] == pytest.approx((~referred[~is_malignant]).mean())
    # The uncalibrated probabilities would have referred a different share.
    assert (truth["malignant_prob"] >= 0.3).mean() != pytest.approx(referred.mean())


def test_by_a_missing_column_lists_the_columns_there_are(scored, sample_dir, capsys):
    _records, _frame, path = scored
    code = main(["evaluate", "--results", path, "--data", str(sample_dir), "--format",
                 "ham10000", "--by", "clinic"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--by clinic: no such column" in err and "HAM10000_metadata.csv" in err
    assert "dx_type" in err and "localization" in err


def test_evaluate_json_and_report_carry_the_subgroups(scored, sample_dir, tmp_path, capsys):
    _records, _frame, path = scored
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--results", path, "--data", str(sample_dir), "--format",
                 "ham10000", "--by", "dx_type", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Subgroups (malignant vs benign" in printed and "dx_type=histo" in printed
    metrics = json.loads(out.read_text())
    assert set(metrics["subgroups"]["groupings"]) == {"sex", "age_band", "site", "dx_type"}
    # The file has the skin-tone columns, all null here: no grouping, and the reason.
    assert metrics["subgroups"]["unavailable"] == {"skin_tone": "no skin_tone or ita_deg values"}
    page = tmp_path / "report.html"
    assert main(["report", "--results", path, "--data", str(sample_dir), "--format", "ham10000",
                 "--by", "dx_type", "--out", str(page)]) == 0
    html = page.read_text()
    assert 'id="subgroups"' in html and "dx_type" in html and "too few" in html
    assert 'aria-label="forest plot of malignant AUC"' in html
