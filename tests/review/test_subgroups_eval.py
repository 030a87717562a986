"""``raysky evaluate``'s subgroup section on a crafted table, against figures computed here
without raysky (scikit-learn, pandas): counts, malignant AUC, balanced accuracy, sensitivity and
specificity at the referral threshold, ranks, flags, the no-positive reason, results without a
skin-tone column, the ``--by`` error, and the report's rendering of flagged and too-few groups.
No Ray, no models, no files."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from raysky.data.records import LesionRecord
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.review.audit_plots import subgroup_view
from raysky.review.evaluate import evaluate_frame
from raysky.review.report import render_macro

CLASSES = ["bcc", "mel", "nv"]
THRESHOLD = 0.5
# Per site: malignant lesions, benign lesions, and how often a malignant one is caught. The
# face is where the model fails (flagged), the hand has no malignant lesion at all (AUC null),
# the scalp too few to judge.
SITES = {"back": (40, 40, 0.95), "trunk": (30, 30, 0.9), "face": (30, 30, 0.2),
         "hand": (0, 25, 0.9), "scalp": (4, 20, 0.9)}


def subgroup_section(audit: dict) -> str:
    """The report's subgroup section for ``audit``, rendered by its macro as the page does."""
    return str(render_macro("sections.html.j2", "subgroups", subgroup_view(audit)))


@pytest.fixture(scope="module")
def crafted() -> tuple[list[LesionRecord], pd.DataFrame, pd.DataFrame]:
    """Records, results and the ground truth as a plain table; two images per lesion."""
    rng = np.random.default_rng(7)
    records, results, truth = [], [], []
    for site, (malignant, benign, hit) in SITES.items():
        for lesion in range(malignant + benign):
            is_mal = lesion < malignant
            label = ("mel" if lesion % 2 else "bcc") if is_mal else "nv"
            meta = {"lesion_id": f"L_{site}_{lesion}", "age": float(rng.integers(18, 90)),
                    "sex": "female" if rng.random() < 0.5 else "male", "site": site}
            tone = str(rng.choice(["light", "intermediate", "brown"]))
            for view in range(2):
                image_id = f"ISIC_{site}_{lesion}_{view}"
                if is_mal:
                    p_mal = rng.uniform(0.55, 0.95) if rng.random() < hit else rng.uniform(0.05, 0.45)
                else:
                    p_mal = rng.uniform(0.02, 0.6)
                split = rng.uniform(0.2, 0.8)
                probs = {"bcc": p_mal * split, "mel": p_mal * (1 - split), "nv": 1 - p_mal}
                records.append(LesionRecord(image_id, f"/data/{image_id}.jpg", label=label, **meta))
                results.append({"image_id": image_id, "status": "ok", "skin_tone": tone,
                                **{f"prob_{c}": v for c, v in probs.items()},
                                "malignant_prob": p_mal})
                truth.append({"image_id": image_id, "label": label, "skin_tone": tone, **meta,
                              "malignant_prob": p_mal, **{f"prob_{c}": v for c, v in probs.items()}})
    # A failed row is in no group's n.
    results.append({"image_id": "ISIC_back_0_0x", "status": "error", "skin_tone": None,
                    **{f"prob_{c}": None for c in CLASSES}, "malignant_prob": None})
    records.append(LesionRecord("ISIC_back_0_0x", "/data/x.jpg", label="nv", site="back"))
    return records, pd.DataFrame(results), pd.DataFrame(truth)


@pytest.fixture(scope="module")
def audit(crafted) -> dict:
    records, results, _truth = crafted
    # Temperature 1 leaves the probabilities as they are: the threshold applies to them.
    calibration = {"version": "cal-test", "temperature": 1.0, "referral": {"threshold": THRESHOLD}}
    return evaluate_frame(results, records, checkpoint_calibration=calibration)["subgroups"]


def _expected(rows: pd.DataFrame) -> dict:
    """A group's figures computed here, from its own rows."""
    malignant = rows["label"].isin(MALIGNANT_CLASSES).to_numpy()
    predicted = np.array(CLASSES)[rows[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)]
    refer = rows["malignant_prob"].to_numpy() >= THRESHOLD
    return {
        "n": len(rows), "malignant_n": int(malignant.sum()),
        "balanced_accuracy": balanced_accuracy_score(rows["label"], predicted),
        "malignant_auc": (roc_auc_score(malignant, rows["malignant_prob"])
                          if 0 < malignant.sum() < len(rows) else None),
        "sensitivity": refer[malignant].mean() if malignant.any() else None,
        "specificity": (~refer[~malignant]).mean() if (~malignant).any() else None,
    }


def _check(group: dict, rows: pd.DataFrame) -> None:
    expected = _expected(rows)
    assert (group["n"], group["malignant_n"]) == (expected["n"], expected["malignant_n"])
    for key in ("balanced_accuracy", "malignant_auc", "sensitivity", "specificity"):
        entry = group[key]
        if expected[key] is None:
            assert entry["value"] is None and entry["reason"], key
            continue
        assert entry["value"] == pytest.approx(expected[key]), key
        assert entry["low"] <= entry["value"] <= entry["high"], key


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the hand: nv only
def test_every_grouping_matches_an_independent_computation(crafted, audit):
    _records, _results, truth = crafted
    _check(audit["overall"], truth)
    assert audit["threshold"] == THRESHOLD and audit["resampled_by"] == "lesion_id"
    bands = pd.cut(truth["age"], [-np.inf, 30, 50, 70, np.inf], right=False,
                   labels=["<30", "30-49", "50-69", "70+"]).astype(str)
    for grouping, labels in (("site", truth["site"]), ("sex", truth["sex"]),
                             ("age_band", bands), ("skin_tone", truth["skin_tone"])):
        groups = {g["group"]: g for g in audit["groupings"][grouping]["groups"]}
        assert set(groups) == set(labels), grouping
        for value, rows in truth.groupby(labels):
            _check(groups[value], rows)
    assert audit["unavailable"] == {}


def test_too_few_flagged_ranked_and_no_positives(audit):
    sites = {g["group"]: g for g in audit["groupings"]["site"]["groups"]}
    overall_sensitivity = audit["overall"]["sensitivity"]["value"]
    face = sites["face"]
    assert face["flagged"] and face["sensitivity"]["high"] < overall_sensitivity
    assert not any(sites[s]["flagged"] for s in ("back", "trunk", "hand", "scalp"))
    # Ranked by AUC among the groups that can be judged; too-few groups get no rank.
    judged = sorted((s for s in sites if not sites[s]["too_few"]),
                    key=lambda s: -sites[s]["malignant_auc"]["value"])
    assert [sites[s]["rank"] for s in judged] == [1, 2, 3]
    assert sites["scalp"]["too_few"] and sites["scalp"]["rank"] is None
    hand = sites["hand"]
    assert hand["too_few"] and hand["rank"] is None and hand["malignant_n"] == 0
    assert hand["malignant_auc"] == {"value": None, "low": None, "high": None, "level": 0.95,
                                     "method": "bootstrap", "replicates": 0,
                                     "reason": "no malignant images"}
    assert hand["sensitivity"]["reason"] == "no malignant images"
    assert hand["specificity"]["value"] is not None


def test_results_without_a_skin_tone_column_skip_that_grouping(crafted):
    records, results, _truth = crafted
    audit = evaluate_frame(results.drop(columns="skin_tone"), records)["subgroups"]
    assert "skin_tone" not in audit["groupings"]
    assert audit["unavailable"] == {"skin_tone": "no skin_tone or ita_deg values"}
    assert {"sex", "age_band", "site"} <= set(audit["groupings"])


def test_by_a_results_column_and_a_missing_one(crafted):
    records, results, _truth = crafted
    tagged = results.assign(classifier_version=np.where(results.index % 3, "v1", "v2"))
    audit = evaluate_frame(tagged, records, by=["classifier_version"])["subgroups"]
    assert {g["group"]: g["n"] for g in audit["groupings"]["classifier_version"]["groups"]} == (
        tagged[tagged["status"] == "ok"]["classifier_version"].value_counts().to_dict())
    with pytest.raises(ValueError, match=r"by=\['clinic'\]: no such column") as error:
        evaluate_frame(tagged, records, by=["clinic"])
    there = str(error.value).split("columns to group by: ")[1].split(", ")
    assert {"age", "sex", "site", "lesion_id", "skin_tone", "classifier_version"} <= set(there)
    assert not any(c.startswith("prob_") or c in ("image_id", "malignant_prob") for c in there)


def test_report_section_highlights_flagged_and_marks_too_few(audit):
    page = subgroup_section(audit)
    rows = {name: kind for kind, name in
            re.findall(r'<tr(?: class="(\w+)")?><th class="l">([^<]+)</th>', page)}
    assert rows["site = face"] == "flagged"
    assert rows["site = scalp"] == rows["site = hand"] == "few"
    assert rows["site = back"] == rows["overall"] == ""
    assert "no malignant images" in page  # the hand's missing AUC, said in the plot
    svg = page[page.index("<svg"):]
    assert 'aria-label="forest plot of malignant AUC"' in svg
    # One point per group with an AUC: all but the hand, plus the overall one.
    with_auc = 1 + sum(g["malignant_auc"]["value"] is not None
                       for body in audit["groupings"].values() for g in body["groups"])
    assert svg.count("<circle") == with_auc
    assert "face (flagged)" in svg and "scalp (too few)" in svg


def test_forest_plot_extends_its_axis_below_chance(audit):
    worse = {**audit, "groupings": {"site": {"column": "site", "groups": [
        {**audit["groupings"]["site"]["groups"][0], "group": "inverted",
         "malignant_auc": {"value": 0.31, "low": 0.18, "high": 0.44}}]}}}
    svg = subgroup_section(worse)
    ticks = re.findall(r'text-anchor="middle">(\d\.\d)</text>', svg)
    assert ticks[0] == "0.1" and ticks[-1] == "1.0"
    assert "AUC 0.310, 95% CI 0.180-0.440" in svg


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_one_figure_has_one_interval_in_evaluate_the_report_the_card_and_the_audit(
        crafted, tiny_checkpoints):
    """The referral sensitivity and specificity appear in evaluate's calibration section and in
    the subgroup audit's overall row; every place that prints them prints the same text."""
    from raysky.metrics.intervals import format_interval
    from raysky.models.card import build_card, render_markdown
    from raysky.models.checkpoint import read_checkpoint_meta
    from raysky.review.output import card_sections, format_table
    from raysky.review.reliability_plot import calibration_view

    records, results, _truth = crafted
    calibration = {"version": "cal-test", "temperature": 1.0, "referral": {"threshold": THRESHOLD}}
    metrics = evaluate_frame(results, records, checkpoint_calibration=calibration)
    referral, overall = metrics["calibration"]["referral"], metrics["subgroups"]["overall"]
    assert referral["interval"] == "wilson, by lesion"
    for name in ("sensitivity", "specificity"):
        assert referral[name] == overall[name]["value"]
        assert referral[f"{name}_ci95"] == [overall[name]["low"], overall[name]["high"]]
    texts = [format_interval(overall[name]) for name in ("sensitivity", "specificity")]
    assert all(re.fullmatch(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", t) for t in texts), texts

    printed = format_table(metrics)
    meta = read_checkpoint_meta(tiny_checkpoints["classifier"])
    card = render_markdown(build_card({**meta, "card": card_sections(metrics)}))
    calibration = render_macro("sections.html.j2", "calibration",
                               calibration_view(metrics["calibration"]))
    report = _text(str(calibration) + subgroup_section(metrics["subgroups"]))
    for text in texts:
        # Twice each: the calibration or evaluation part, and the subgroup table's overall row.
        assert printed.count(text) == 2, (text, printed)
        assert card.count(text) == 2, (text, card)
        assert report.count(text) == 2, (text, report)
