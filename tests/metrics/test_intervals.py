"""raysky.metrics: one place for the figures and their intervals. Wilson intervals with a
lesion design effect for proportions, a seeded lesion bootstrap for the rest; neither claims
certainty at 0 or 1. Pure numpy, against scipy's own Wilson interval."""

from __future__ import annotations

import ast
import importlib

import numpy as np
import pytest
from scipy.stats import binomtest

from raysky.metrics.intervals import (
    BOOTSTRAP_COLLAPSED,
    bootstrap_interval,
    bootstrap_intervals,
    design_effect,
    format_interval,
    proportion_interval,
    wilson_interval,
)
from raysky.metrics.isic import rank_auc, sensitivity_specificity
from tests.helpers import REPO

METRICS_DIR = REPO / "raysky" / "metrics"


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (62, 62), (245, 257)])
def test_wilson_matches_scipy(successes, n):
    expected = binomtest(successes, n).proportion_ci(0.95, method="wilson")
    low, high = wilson_interval(successes / n, n)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_a_perfect_rate_keeps_an_honest_interval_where_the_bootstrap_collapses():
    # The model card's "site = back: sensitivity 1.000 [1.000, 1.000]" on 62 images.
    caught = np.ones(62, dtype=bool)
    bootstrapped = bootstrap_interval(np.mean, caught)
    assert bootstrapped["low"] == bootstrapped["high"] == 1.0
    wilson = proportion_interval(caught)
    assert wilson["value"] == 1.0 and wilson["high"] == 1.0
    assert wilson["low"] == pytest.approx(62 / (62 + 1.959964 ** 2), abs=1e-6)  # 0.942
    assert proportion_interval(~caught)["high"] > 0.05
    assert format_interval(wilson) == "1.000 [0.942, 1.000]"
    assert proportion_interval(np.array([], dtype=bool))["value"] is None


def test_the_design_effect_counts_a_lesion_once_when_its_images_agree():
    lesions = np.repeat(np.arange(40), 3)  # three images of every lesion
    per_lesion = np.random.default_rng(0).random(40) < 0.3
    repeated = np.repeat(per_lesion, 3)
    assert design_effect(repeated, lesions) == pytest.approx(3.0)
    clustered = proportion_interval(repeated, lesions)
    assert clustered["effective_n"] == pytest.approx(40.0)
    low, high = wilson_interval(per_lesion.mean(), 40)
    assert (clustered["low"], clustered["high"]) == pytest.approx((low, high))
    # One image per lesion, or no lesion ids: independent images.
    assert design_effect(repeated, np.arange(120)) == 1.0 == design_effect(repeated, None)
    # Images of a lesion that disagree as much as independent ones cost nothing.
    independent = np.random.default_rng(1).random(120) < 0.3
    assert design_effect(independent, lesions) < 1.3


def test_clustered_intervals_keep_their_coverage_where_per_image_ones_do_not():
    rate, covered, naive = 0.3, 0, 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        per_lesion = rng.random(30) < rate
        outcomes, lesions = np.repeat(per_lesion, 4), np.repeat(np.arange(30), 4)
        clustered = proportion_interval(outcomes, lesions)
        plain = proportion_interval(outcomes)
        covered += clustered["low"] <= rate <= clustered["high"]
        naive += plain["low"] <= rate <= plain["high"]
    assert covered >= 180  # nominal 95%: about 190 of 200
    assert naive < covered - 20  # four copies of each lesion are not four lesions


def test_bootstrap_is_seeded_clustered_and_falls_back_to_wilson_when_it_collapses():
    base = np.random.default_rng(1).random(60) < 0.4
    repeated, lesions = np.repeat(base, 4), np.repeat(np.arange(60), 4)
    by_image = bootstrap_interval(np.mean, repeated, replicates=500, seed=3)
    by_lesion = bootstrap_interval(np.mean, repeated, clusters=lesions, replicates=500, seed=3)
    assert by_lesion == bootstrap_interval(np.mean, repeated, clusters=lesions, replicates=500,
                                           seed=3)
    assert (by_lesion["high"] - by_lesion["low"]) > 1.5 * (by_image["high"] - by_image["low"])
    # A perfect ranking: every replicate's AUC is 1.0.
    truth = np.array([True] * 12 + [False] * 30)
    scores = truth + np.random.default_rng(2).random(42) * 0.5
    perfect = bootstrap_intervals({"auc": rank_auc}, truth, scores, collapse_n={"auc": 12})["auc"]
    assert perfect["value"] == 1.0 and perfect["method"] == BOOTSTRAP_COLLAPSED
    assert perfect["low"] == pytest.approx(wilson_interval(1.0, 12)[0]) and perfect["low"] < 0.8
    empty = bootstrap_interval(np.mean, np.array([]))
    assert empty["value"] is None and empty["low"] is None


def test_rank_auc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    truth = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + truth * 0.3, 1)  # many ties
    assert rank_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))
    assert np.isnan(rank_auc(np.zeros(5, bool), np.arange(5)))


def test_one_sensitivity_specificity_with_one_argument_order():
    truth = np.array([True, True, False, False, False])
    assert sensitivity_specificity(truth, np.array([True, False, False, True, False])) == (
        pytest.approx(0.5), pytest.approx(2 / 3))
    for module, name in (("raysky.calibration.referral", "sensitivity_specificity"),
                         ("raysky.audit.subgroups", "sensitivity_specificity")):
        # Either the package's one function, imported, or none at all.
        found = getattr(importlib.import_module(module), name, sensitivity_specificity)
        assert found is sensitivity_specificity, module
    for gone in ("raysky.review.metrics", "raysky.audit.bootstrap"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)


def test_metrics_is_a_low_layer():
    """raysky.metrics imports numpy, scikit-learn, scipy and the standard library only."""
    import sys

    allowed = {"numpy", "sklearn", "scipy", "__future__"} | set(sys.stdlib_module_names)
    for path in METRICS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
