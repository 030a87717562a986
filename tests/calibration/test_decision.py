"""The balanced decision rule on known answers: logit adjustment recovers the prior it must
undo, absent classes are reported rather than zeroed silently, and records from before
decision offsets keep the plain argmax. Pure numpy; the trained-model side is in
test_calibration_model.py."""

from __future__ import annotations

import numpy as np
import pytest

from raysky.calibration.decision import (
    TAU_GRID,
    balanced_accuracy,
    cross_fit,
    decide,
    describe_decision,
    fit_decision_rule,
    fit_tau,
    lesion_halves,
    offsets_vector,
    prior_offsets,
)

CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
# HAM10000's training split: two thirds naevi, 59 dermatofibromas.
TRAIN_COUNTS = {"mel": 843, "nv": 5186, "bcc": 377, "akiec": 217, "bkl": 832, "df": 59, "vasc": 84}


def _posterior_logits(n: int = 6000, seed: int = 0, separation: float = 0.6):
    """Labels drawn from the HAM prior and logits = log-likelihood + log prior: the
    accuracy-optimal posterior, whose balanced-accuracy decision removes ``log prior``."""
    rng = np.random.default_rng(seed)
    prior = np.array([TRAIN_COUNTS[c] for c in CLASSES], float)
    prior /= prior.sum()
    labels = rng.choice(len(CLASSES), n, p=prior)
    means = rng.normal(0, separation, (len(CLASSES), len(CLASSES)))
    x = means[labels] + rng.normal(0, 1, (n, len(CLASSES)))
    loglik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    return loglik + np.log(prior), labels, [f"lesion{i // 2}" for i in range(n)]


def test_logit_adjustment_recovers_the_prior_and_lifts_balanced_accuracy():
    logits, labels, groups = _posterior_logits()
    offsets, rule = fit_decision_rule(logits, labels, CLASSES, groups, TRAIN_COUNTS)
    assert list(offsets) == list(CLASSES)
    assert abs(sum(offsets.values())) < 1e-4  # centred: only differences decide
    # The Bayes rule for balanced error is tau = 1 on the true prior.
    assert rule["tau"] == pytest.approx(1.0, abs=0.3)
    assert rule["prior_source"] == "training split" and rule["classes_not_fitted"] == {}
    ba = rule["balanced_accuracy"]
    assert ba["after"] > ba["before"] + 0.05
    crossed = ba["cross_fitted"]
    assert crossed["prior"] > crossed["none"] + 0.05  # held-out, not only in-sample
    assert rule["variant"] in ("prior", "prior+classwise")
    # Rare classes get pushed up, the common one down.
    assert offsets["df"] > offsets["mel"] > offsets["nv"]
    # predicted from probabilities (a per-row shift of logits / T) is the same decision.
    vector = offsets_vector(offsets, CLASSES)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(decide(logp, vector), decide(logits, vector))
    assert "decision offsets (logit adjustment" in describe_decision(
        {"decision_offsets": offsets, "decision_rule": rule})


def test_a_class_absent_from_the_calibration_data_is_reported_not_zeroed():
    logits, labels, groups = _posterior_logits(seed=1)
    df = CLASSES.index("df")
    keep = labels != df
    logits, labels = logits[keep], labels[keep]
    groups = [g for g, k in zip(groups, keep, strict=True) if k]
    # With the training prior, df keeps its tau * log prior offset, the largest of all.
    offsets, rule = fit_decision_rule(logits, labels, CLASSES, groups, TRAIN_COUNTS)
    assert list(rule["classes_not_fitted"]) == ["df"]
    assert "training split" in rule["classes_not_fitted"]["df"]
    prior = prior_offsets(np.log(np.array([TRAIN_COUNTS[c] for c in CLASSES]) / 7598),
                          rule["tau"])
    if rule["variant"] == "prior":
        assert offsets["df"] == pytest.approx(prior[df], abs=1e-5)
    text = describe_decision({"decision_offsets": offsets, "decision_rule": rule})
    assert "df not fitted" in text
    # Without any prior for it, df gets the mean offset (0 after centring), said out loud.
    offsets, rule = fit_decision_rule(logits, labels, CLASSES, groups, None)
    assert rule["prior_source"] == "calibration data"
    assert "no prior" in rule["classes_not_fitted"]["df"]
    if rule["variant"] == "prior":
        assert offsets["df"] == pytest.approx(0.0, abs=1e-6)
    assert all(np.isfinite(v) for v in offsets.values())


def test_records_without_offsets_keep_the_plain_argmax():
    logits, _, _ = _posterior_logits(n=50)
    assert offsets_vector(None, CLASSES) is None and offsets_vector({}, CLASSES) is None
    np.testing.assert_array_equal(decide(logits, None), logits.argmax(axis=1))
    assert "no decision offsets are set" in describe_decision({"temperature": 1.0})
    with pytest.raises(ValueError, match=r"lacks class\(es\) \['vasc'\]"):
        offsets_vector({c: 0.0 for c in CLASSES[:-1]}, CLASSES)


def test_tau_plateaus_resolve_to_their_middle():
    # Two well-separated classes: every tau from -0.5 up to where the prior flips the
    # decision gives balanced accuracy 1, and the choice sits in the middle of that run.
    scaled = np.array([[2.0, -2.0], [-2.0, 2.0]] * 10)
    labels = np.array([0, 1] * 10)
    logp = np.log(np.array([0.9, 0.1]))
    tau, ba = fit_tau(scaled, labels, logp)
    assert ba == 1.0
    best = [t for t in TAU_GRID if balanced_accuracy(
        labels, decide(scaled, prior_offsets(logp, t))) == 1.0]
    assert tau == best[len(best) // 2]


def test_halves_never_split_a_lesion_and_cross_fit_is_seeded():
    groups = [f"L{i // 3}" for i in range(60)]
    first = lesion_halves(groups, seed=0)
    for lesion in set(groups):
        sides = {bool(f) for f, g in zip(first, groups, strict=True) if g == lesion}
        assert len(sides) == 1
    logits, labels, _ = _posterior_logits(n=60)
    logp = np.log(np.full(7, 1 / 7))
    assert cross_fit(logits, labels, logp, groups) == cross_fit(logits, labels, logp, groups)


def test_decision_metrics_score_predicted_class_strings():
    from raysky.calibration.decision import decision_metrics

    figures = decision_metrics(["mel", "mel", "nv", "nv", "nv", "df"],
                               ["mel", "nv", "nv", "nv", "nv", "nv"])
    assert figures["recall"] == {"df": 0.0, "mel": 0.5, "nv": 1.0}
    assert figures["balanced_accuracy"] == pytest.approx(0.5)
    assert figures["accuracy"] == pytest.approx(4 / 6)
