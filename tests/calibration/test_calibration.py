"""Calibration pieces on known answers: temperature, referral threshold, OOD threshold, metrics,
the checkpoint record, the results schema and the refusals. No model training here (see
test_calibration_model.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysky import results
from raysky.calibration import NotEnoughCalibrationData, calibration_version, check_counts
from raysky.calibration.evaluation import referral_metrics
from raysky.calibration.ood import OODScorer, fit_ood
from raysky.calibration.referral import fit_referral, refer
from raysky.calibration.temperature import fit_temperature, recalibrate, softmax, uncalibrate
from raysky.cli.main import main
from raysky.metrics.intervals import proportion_interval
from raysky.metrics.isic import sensitivity_specificity
from raysky.metrics.reliability import brier_score, expected_calibration_error
from raysky.results.columns import output_schema


def _synthetic(temperature: float, n: int = 20000, classes: int = 7, seed: int = 0):
    """Labels drawn from softmax(z); the "model" reports z * temperature (over-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, classes))
    p = softmax(z)
    labels = (rng.random(n)[:, None] > p.cumsum(axis=1)).sum(axis=1)
    return z * temperature, np.minimum(labels, classes - 1)


@pytest.mark.parametrize("true_t", [0.6, 1.0, 2.5])
def test_temperature_fitting_recovers_a_known_temperature(true_t):
    logits, labels = _synthetic(true_t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_ece_and_brier_drop_when_the_known_temperature_is_undone():
    logits, labels = _synthetic(2.5, n=5000)
    before, after = softmax(logits), softmax(logits / 2.5)
    assert expected_calibration_error(labels, after) < 0.5 * expected_calibration_error(labels, before)
    assert brier_score(labels, after) < brier_score(labels, before)
    # Stored probabilities can be taken back and forth through a temperature exactly.
    np.testing.assert_allclose(uncalibrate(after, 2.5), before, atol=1e-9)
    np.testing.assert_allclose(recalibrate(before, 2.5), after, atol=1e-9)


def test_ece_and_brier_of_known_cases():
    perfect = np.eye(3)[[0, 1, 2, 0]]
    assert expected_calibration_error([0, 1, 2, 0], perfect) == 0.0
    assert brier_score([0, 1, 2, 0], perfect) == 0.0
    # Always 0.9 confident, right half of the time: |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error([0, 1, 0, 1], probs) == pytest.approx(0.4)
    assert brier_score([1, 1, 1, 1], probs) == pytest.approx(0.81 + 0.81)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_referral_threshold_meets_its_target_on_the_data_it_was_fitted_to(target):
    rng = np.random.default_rng(1)
    truth = rng.random(400) < 0.3
    scores = np.clip(rng.normal(np.where(truth, 0.6, 0.3), 0.2), 0, 1)
    record = fit_referral(scores, truth, target)
    referred = refer(scores, record["threshold"])
    assert referred[truth].mean() >= target
    assert record["sensitivity"] == pytest.approx(referred[truth].mean())
    assert record["specificity"] == pytest.approx((~referred[~truth]).mean())
    assert (record["n_malignant"], record["n_benign"]) == (truth.sum(), (~truth).sum())
    # The highest such threshold: a hair higher misses the target.
    assert refer(scores, record["threshold"] + 1e-9)[truth].mean() < target


def test_ood_threshold_flags_at_most_five_percent_of_its_own_data():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(300, 8)) + np.repeat(np.eye(3, 8) * 4, 100, axis=0)
    labels = np.repeat(np.arange(3), 100)
    logits = rng.normal(size=(300, 3))
    for method in ("mahalanobis", "energy"):
        record = fit_ood(features, logits, labels, method)
        scorer = OODScorer(json.loads(json.dumps(record)))  # survives config.json
        flagged = scorer.flag(scorer(features, logits))
        assert flagged.mean() <= 0.05 + 1e-9, method
    far = features[:20] + 25.0
    record = fit_ood(features, logits, labels, "mahalanobis")
    scorer = OODScorer(record)
    assert scorer.flag(scorer(far, logits[:20])).all()
    with pytest.raises(ValueError, match="needs the gate encoder's features"):
        fit_ood(features, logits, labels)  # the default, the gate, scores images


def test_gate_thresholds_are_per_class_so_a_rare_class_is_not_flagged_for_being_rare():
    from raysky.calibration.gate import fit_gate, gate_scores

    rng = np.random.default_rng(4)
    # A common class and a rarer one that lies apart from it and spreads wider, so one
    # threshold for both (shared covariance) would flag the rare class far more often.
    common = rng.normal(size=(600, 40))
    rare = rng.normal(size=(120, 40)) * 1.6 + 6.0
    features = np.r_[common, rare]
    labels = np.r_[np.zeros(600, int), np.ones(120, int)]
    record = json.loads(json.dumps(fit_gate(features, labels, {"architecture": "test"}, k=8)))
    assert record["method"] == "imagenet-gate" and record["threshold"] == 1.0
    assert len(record["class_thresholds"]) == 2
    assert record["class_thresholds"][1] > record["class_thresholds"][0]
    new_common = rng.normal(size=(2000, 40))
    new_rare = rng.normal(size=(2000, 40)) * 1.6 + 6.0
    flagged = [(gate_scores(x, record) > 1.0).mean() for x in (new_common, new_rare)]
    assert max(flagged) < 0.12 and abs(flagged[0] - flagged[1]) < 0.08, flagged
    one = json.loads(json.dumps(fit_gate(features, np.zeros(720, int), {}, k=8)))
    assert (gate_scores(new_rare, one) > 1.0).mean() > flagged[1] + 0.1
    far = rng.normal(size=(50, 40)) * 4 - 12
    assert (gate_scores(far, record) > 1.0).all()


def test_referral_rates_are_one_definition_with_lesion_clustered_wilson_intervals():
    referred = np.array([True] * 45 + [False] * 5 + [True] * 30 + [False] * 70)
    truth = np.array([True] * 50 + [False] * 100)
    lesions = np.repeat(np.arange(75), 2)
    figures = referral_metrics(referred, truth, 0.3, lesions)
    assert (figures["sensitivity"], figures["specificity"]) == sensitivity_specificity(truth,
                                                                                       referred)
    assert figures["sensitivity"] == pytest.approx(0.9) and figures["specificity"] == 0.7
    expected = proportion_interval(referred[truth], lesions[truth])
    assert figures["sensitivity_ci95"] == [expected["low"], expected["high"]]
    low, high = figures["sensitivity_ci95"]
    assert low < 0.9 < high and figures["interval"] == "wilson, by lesion"


def test_calibration_version_hashes_the_record():
    record = {"temperature": 1.5, "referral": {"threshold": 0.2}}
    version = calibration_version(record)
    assert version.startswith("cal-") and len(version) == 16
    assert calibration_version({**record, "version": version}) == version
    assert calibration_version({**record, "temperature": 1.6}) != version


def test_too_few_labelled_images_are_refused_with_the_counts():
    classes = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
    labels = [0] * 19 + [1] * 30
    with pytest.raises(NotEnoughCalibrationData, match="19 malignant and 30 benign"):
        check_counts(labels, classes)
    assert check_counts([0] * 20 + [2] * 5 + [1] * 20, classes) == (25, 20)


def test_calibrate_refuses_the_bundled_sample_naming_the_counts(tiny_checkpoints, sample_dir,
                                                                tmp_path, capsys):
    out = tmp_path / "calibrated"
    code = main(["calibrate", "--classifier", tiny_checkpoints["classifier"], "--data",
                 str(sample_dir), "--format", "ham10000", "--gt-masks", "--out", str(out)])
    assert code == 2
    assert "has 15 malignant and 20 benign labelled images; calibration needs at least 20 of " \
           "each" in capsys.readouterr().err
    assert not out.exists()


def test_results_written_before_the_calibration_and_skin_tone_columns_still_read(tmp_path):
    schema = output_schema(("mel", "nv"), heatmaps=False)
    new = ("refer", "ood_score", "ood", "calibration_version", "error_kind", "ita_deg",
           "skin_tone")
    old = pa.schema([f for f in schema if f.name not in new])
    rows = [{"image_id": "a", "source_uri": "a.jpg", "status": "ok", "predicted_class": "nv",
             "prob_mel": 0.2, "prob_nv": 0.8, "malignant_prob": 0.2},
            {"image_id": "b", "source_uri": "b.jpg", "status": "ok", "predicted_class": "mel",
             "prob_mel": 0.7, "prob_nv": 0.3, "malignant_prob": 0.7}]
    (tmp_path / "old").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "old" / "part-0.parquet")
    frame = results.read(str(tmp_path / "old"))
    assert list(frame.columns) == schema.names
    assert frame[list(new)].isna().all().all()
    assert results.read(str(tmp_path / "old"), ["image_id", "refer", "ood"]).shape == (2, 3)
    summary = results.summarize(str(tmp_path / "old"))
    assert summary["refer"] == {"true": 0, "false": 0, "null": 2} == summary["ood"]
    assert "null (no calibration): 2" in results.format_summary(summary)
    assert summary["skin_tone"] == {"unknown": 2}


def test_results_summary_counts_refer_and_ood(tmp_path):
    schema = output_schema(("mel", "nv"), heatmaps=False)
    rows = [{"image_id": str(i), "source_uri": f"{i}.jpg", "status": "ok", "predicted_class": "nv",
             "prob_mel": 0.1 * i, "prob_nv": 1 - 0.1 * i, "malignant_prob": 0.1 * i,
             "refer": i >= 3, "ood_score": float(i), "ood": i == 4, "calibration_version": "cal-x",
             "ita_deg": None if i == 0 else 30.0, "skin_tone": None if i == 0 else "intermediate"}
            for i in range(5)]
    (tmp_path / "r").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "r" / "part-0.parquet")
    summary = results.summarize(str(tmp_path / "r"))
    assert summary["refer"] == {"true": 2, "false": 3, "null": 0}
    assert summary["ood"] == {"true": 1, "false": 4, "null": 0}
    text = results.format_summary(summary)
    assert "referred (refer): 2  not: 3" in text and "out of distribution (ood): 1  not: 4" in text
    assert summary["skin_tone"] == {"intermediate": 4, "unknown": 1}
    assert "skin tone (ITA): intermediate 4, unknown 1" in text


class _CalibratedBackend:
    """Answers like the model deployment of a calibrated (or, without ``cal``, plain) classifier."""

    def __init__(self, cal: bool):
        self.cal = cal

    async def predict(self, request):
        height, width = request["image"].shape[:2]
        answer = {"classes": ["mel", "nv"], "probabilities": [0.25, 0.75],
                  "predicted_class": "nv", "malignant_prob": 0.25, "lesion_area_frac": 0.0,
                  "lesion_focus": float("nan"), "mask": np.zeros((height, width), np.uint8),
                  "heatmap": None, "segmenter_version": "s", "classifier_version": "c"}
        if self.cal:
            answer.update(refer=True, ood_score=3.5, ood=False, calibration_version="cal-1",
                          ita_deg=33.5, skin_tone="intermediate")
        return answer

    async def info(self):
        return {}


@pytest.mark.parametrize("cal", [True, False])
def test_the_serve_answer_carries_refer_ood_and_skin_tone(cal, tmp_path):
    import asyncio
    import io

    import httpx
    from PIL import Image

    from raysky.serve.api import ApiOptions, create_api
    from raysky.serve.security import ApiKeyChecker

    app = create_api(_CalibratedBackend(cal), ApiOptions(access_log=str(tmp_path / "access.log")),
                     keys=ApiKeyChecker(()))
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 60, 40)).save(buffer, format="JPEG")

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raysky") as client:
            return await client.post("/v1/predict", files={"image": ("x.jpg", buffer.getvalue())})

    body = asyncio.run(post()).json()
    expected = ((True, 3.5, False, "cal-1") if cal else (None, None, None, None))
    assert tuple(body[k] for k in ("refer", "ood_score", "ood", "calibration_version")) == expected
    assert (body["ita_deg"], body["skin_tone"]) == ((33.5, "intermediate") if cal else (None, None))
