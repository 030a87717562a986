"""The clinical audit's building blocks: ITA, bootstrap intervals, artefacts, attention,
subgroups. Pure numpy/pandas: no Ray, no models."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from skimage import color as skimage_color

from raysky.audit.artefacts import ARTEFACT_KINDS, add_artefact, parse_kinds, protected_region
from raysky.audit.attention import artefact_attention
from raysky.audit.subgroups import age_band, audit_table, format_subgroups, subgroup_audit, too_few
from raysky.data import load_mask, load_rgb, read_ham10000
from raysky.data.skin_tone import ita_degrees, skin_tone_category, srgb_to_lab
from raysky.metrics.intervals import bootstrap_interval
from raysky.metrics.isic import rank_auc

# --- skin tone ----------------------------------------------------------------------------


def test_srgb_to_lab_matches_scikit_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(srgb_to_lab(pixels), skimage_color.rgb2lab(pixels), atol=1e-6)
    floats = rng.random((10, 3))
    np.testing.assert_allclose(srgb_to_lab(floats), skimage_color.rgb2lab(floats), atol=1e-6)


def _patch(lightness: float, b: float, a: float = 12.0, shape=(150, 200), noise=1.5, seed=0):
    """A skin patch of chosen L*, a*, b* with a little per-pixel noise, as uint8 sRGB."""
    rng = np.random.default_rng(seed)
    lab = np.empty((*shape, 3))
    lab[..., 0], lab[..., 1], lab[..., 2] = lightness, a, b
    lab += rng.normal(0, noise, lab.shape)
    return np.rint(skimage_color.lab2rgb(lab) * 255).astype(np.uint8)


SKIN = [(78, 8), (70, 12), (62, 16), (55, 18), (48, 20), (40, 18), (33, 14), (28, 10)]


@pytest.mark.parametrize("lightness,b", SKIN)
def test_ita_of_known_skin_colours_within_a_degree(lightness, b):
    expected = math.degrees(math.atan2(lightness - 50, b))
    empty = np.zeros((150, 200), np.uint8)
    assert ita_degrees(_patch(lightness, b), empty) == pytest.approx(expected, abs=1.0)


def test_ita_excludes_the_lesion_and_ignores_hairs():
    lightness, b = 65.0, 15.0
    expected = math.degrees(math.atan2(lightness - 50, b))
    rgb = _patch(lightness, b)
    lesion = np.zeros((150, 200), np.uint8)
    lesion[15:135, 25:175] = 1  # 60% of the image: a dark-brown lesion
    rgb[lesion > 0] = _patch(25, 30, a=20)[lesion > 0]
    assert abs(ita_degrees(rgb, np.zeros_like(lesion)) - expected) > 5  # it would pull the angle
    assert ita_degrees(rgb, lesion) == pytest.approx(expected, abs=1.0)
    for x in range(5, 200, 12):  # hairs: thin dark strokes over the skin
        rgb[:, x:x + 2] = (40, 30, 25)
    assert ita_degrees(rgb, lesion) == pytest.approx(expected, abs=1.0)
    # A mask at another resolution is resized to the image.
    small = lesion[::2, ::2]
    assert ita_degrees(rgb, small) == pytest.approx(expected, abs=1.0)


def test_ita_is_none_when_too_dark_or_too_small():
    empty = np.zeros((150, 200), np.uint8)
    assert ita_degrees(np.full((150, 200, 3), 12, np.uint8), empty) is None  # aperture black
    assert ita_degrees(_patch(65, 15, shape=(20, 20)), np.zeros((20, 20))) is None  # 400 px
    nearly_all = np.ones((150, 200), np.uint8)
    nearly_all[:4, :4] = 0  # 16 pixels of skin left, all within the lesion's margin
    assert ita_degrees(_patch(65, 15), nearly_all) is None
    rgb = _patch(65, 15)
    rgb[:, 12:] = 5  # a large black corner: 6% of the image is skin, but still > 500 px
    assert ita_degrees(rgb, empty) is not None
    rgb[:, 9:] = 5  # under 5%
    assert ita_degrees(rgb, empty) is None


@pytest.mark.parametrize("ita,category", [
    (70, "very light"), (55.01, "very light"), (55, "light"), (41.01, "light"),
    (41, "intermediate"), (28.01, "intermediate"), (28, "tan"), (10.01, "tan"), (10, "brown"),
    (0, "brown"), (-30, "brown"), (-30.01, "dark"), (-79, "dark"),
    (80, "very light"), (-80, "dark"), (None, None), (float("nan"), None), (80.5, None),
    (-85, None), (120, None),
])
def test_skin_tone_categories_and_their_bounds(ita, category):
    assert skin_tone_category(ita) == category


# --- bootstrap ----------------------------------------------------------------------------


def test_bootstrap_interval_covers_a_known_rate_and_widens_as_n_shrinks():
    rate, covered = 0.3, 0
    for seed in range(60):
        sample = np.random.default_rng(seed).random(200) < rate
        ci = bootstrap_interval(np.mean, sample, replicates=400, seed=seed)
        covered += ci["low"] <= rate <= ci["high"]
    assert covered >= 52  # nominal 95%: about 57 of 60

    def width(n: int) -> float:
        widths = []
        for seed in range(10):
            ci = bootstrap_interval(np.mean, np.random.default_rng(seed).random(n) < rate,
                                    replicates=400, seed=seed)
            widths.append(ci["high"] - ci["low"])
        return float(np.mean(widths))

    assert width(40) > width(160) > width(640)


def test_bootstrap_is_seeded_and_clusters_widen_correlated_samples():
    base = np.random.default_rng(1).random(60) < 0.4
    repeated = np.repeat(base, 4)  # four images of every lesion
    lesions = np.repeat(np.arange(60), 4)
    by_image = bootstrap_interval(np.mean, repeated, replicates=500, seed=3)
    by_lesion = bootstrap_interval(np.mean, repeated, clusters=lesions, replicates=500, seed=3)
    assert by_lesion == bootstrap_interval(np.mean, repeated, clusters=lesions, replicates=500,
                                           seed=3)
    assert (by_lesion["high"] - by_lesion["low"]) > 1.5 * (by_image["high"] - by_image["low"])
    empty = bootstrap_interval(np.mean, np.array([]))
    assert empty["value"] is None and empty["low"] is None


def test_rank_auc_matches_scikit_learn_with_ties_and_too_few():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    truth = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + truth * 0.3, 1)  # many ties
    assert rank_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))
    assert math.isnan(rank_auc(np.zeros(5, bool), np.arange(5)))
    assert too_few(np.array([True] * 9 + [False] * 50))
    assert too_few(np.array([True] * 50 + [False] * 9))
    assert not too_few(np.array([True] * 10 + [False] * 10))


# --- artefacts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_images(sample_dir):
    records = sorted(read_ham10000(str(sample_dir)), key=lambda r: r.image_id)[::5]
    return [(np.asarray(load_rgb(r.image_uri)), load_mask(r.mask_uri)) for r in records]


@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_artefacts_change_only_skin_outside_the_lesion_and_are_seeded(kind, sample_images):
    placed = 0
    for i, (rgb, mask) in enumerate(sample_images):
        altered, changed = add_artefact(rgb, mask, kind, np.random.default_rng([7, i]))
        assert altered.shape == rgb.shape and altered.dtype == np.uint8
        np.testing.assert_array_equal(changed, (altered != rgb).any(axis=2))
        assert not (changed & (mask > 0)).any()
        assert not (changed & protected_region(mask, rgb.shape)).any()
        placed += changed.mean() > 0.002
        again, changed_again = add_artefact(rgb, mask, kind, np.random.default_rng([7, i]))
        np.testing.assert_array_equal(again, altered)
        np.testing.assert_array_equal(changed_again, changed)
        other, _ = add_artefact(rgb, mask, kind, np.random.default_rng([8, i]))
        assert not np.array_equal(other, altered)
    assert placed >= len(sample_images) - 1  # a lesion filling the frame leaves no room


def test_unknown_artefact_kinds_are_refused_with_the_list():
    with pytest.raises(ValueError, match="ruler, ink, bubbles, hair, vignette"):
        add_artefact(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20)), "sticker",
                     np.random.default_rng(0))
    with pytest.raises(ValueError, match="'tattoo'"):
        parse_kinds("ruler,tattoo")
    assert parse_kinds("ruler, ink,ruler") == ("ruler", "ink")


# --- attention ----------------------------------------------------------------------------


def test_artefact_attention_is_exact_on_a_crafted_heatmap():
    heat = np.zeros((40, 50), np.float32)
    heat[0:10, 0:10] = 1.0  # mass 100, on the artefact
    heat[20:30, 20:40] = 0.5  # mass 100, off it
    mask = np.zeros((40, 50), bool)
    mask[0:10, 0:5] = True  # half of the first block: 50 of 200
    mask[35:40, :] = True  # where the heatmap is zero
    assert artefact_attention(heat, mask) == pytest.approx(0.25)
    assert artefact_attention((heat * 255).astype(np.uint8), mask) == pytest.approx(0.25, abs=1e-3)
    flat = np.full((20, 25), 0.7, np.float32)  # another size: resized, so the share is the area
    assert artefact_attention(flat, mask) == pytest.approx(mask.mean(), abs=1e-6)
    assert math.isnan(artefact_attention(np.zeros((40, 50)), mask))


# --- subgroups ----------------------------------------------------------------------------


def _group(rng, name, malignant, benign, hit_rate, site="back"):
    """Rows of one group: malignant images above the 0.5 threshold with prob ``hit_rate``."""
    rows = []
    for i in range(malignant + benign):
        is_mal = i < malignant
        p = (rng.uniform(0.55, 0.95) if rng.random() < hit_rate else rng.uniform(0.05, 0.45)) \
            if is_mal else rng.uniform(0.02, 0.5)
        rows.append({"image_id": f"{name}_{i}", "status": "ok", "label": "mel" if is_mal else "nv",
                     "malignant_prob": p, "prob_mel": p, "prob_nv": 1 - p, "group": name,
                     "site": site, "lesion_id": f"L_{name}_{i // 2}"})
    return rows


@pytest.fixture(scope="module")
def joined_table():
    rng = np.random.default_rng(0)
    rows = (_group(rng, "good", 40, 40, 0.95) + _group(rng, "small", 5, 40, 0.9)
            + _group(rng, "nopos", 0, 30, 0.9, site="face") + _group(rng, "poor", 40, 40, 0.3))
    frame = pd.DataFrame(rows)
    frame.loc[len(frame)] = {**rows[0], "image_id": "failed", "status": "error"}
    return frame


def test_subgroup_audit_marks_too_few_nulls_auc_without_positives_and_flags(joined_table):
    audit = subgroup_audit(joined_table, by=["group"], threshold=0.5, seed=0, replicates=200)
    assert audit["n"] == len(joined_table) - 1  # the error row is left out
    assert audit["resampled_by"] == "lesion_id"
    groups = {g["group"]: g for g in audit["groupings"]["group"]["groups"]}
    assert groups["small"]["too_few"] and groups["small"]["rank"] is None
    assert groups["small"]["malignant_n"] == 5 and not groups["small"]["flagged"]
    nopos = groups["nopos"]
    assert nopos["too_few"] and nopos["malignant_auc"]["value"] is None
    assert nopos["malignant_auc"]["reason"] == "no malignant images"
    assert nopos["sensitivity"]["reason"] == "no malignant images"
    assert nopos["specificity"]["value"] is not None
    assert groups["poor"]["flagged"] and not groups["good"]["flagged"]
    assert groups["poor"]["sensitivity"]["high"] < audit["overall"]["sensitivity"]["value"]
    assert groups["good"]["rank"] == 1 and groups["poor"]["rank"] == 2
    for name in ("balanced_accuracy", "malignant_auc", "sensitivity", "specificity"):
        entry = groups["good"][name]
        assert entry["low"] <= entry["value"] <= entry["high"]
    assert audit["unavailable"] == {"sex": "no sex values", "age_band": "no age values",
                                    "skin_tone": "no skin_tone or ita_deg values"}
    assert audit == subgroup_audit(joined_table, by=["group"], threshold=0.5, seed=0,
                                   replicates=200)
    assert "FLAGGED" in format_subgroups(audit)


def test_subgroup_audit_without_threshold_and_derived_groups(joined_table):
    table = joined_table.assign(
        age=np.resize([25, 30, 49.5, 50, 69, 70, np.nan], len(joined_table)),
        ita_deg=np.resize([60, 45, 30, 20, 0, -40, 120], len(joined_table)))
    audit = subgroup_audit(table, replicates=50)
    assert audit["overall"]["sensitivity"] == {"value": None, "low": None, "high": None,
                                               "reason": "no referral threshold given"}
    bands = [g["group"] for g in audit["groupings"]["age_band"]["groups"]]
    assert bands == ["<30", "30-49", "50-69", "70+", "unknown"]
    tones = {g["group"] for g in audit["groupings"]["skin_tone"]["groups"]}
    assert tones == {"very light", "light", "intermediate", "tan", "brown", "dark", "unknown"}
    assert not any(g["flagged"] for g in audit["groupings"]["site"]["groups"])
    assert [age_band(a) for a in (None, "x", 29.9, 30)] == ["unknown", "unknown", "<30", "30-49"]


def test_subgroup_audit_refuses_an_unknown_column_listing_the_columns(joined_table):
    with pytest.raises(ValueError, match=r"no column 'dx_type'.*malignant_prob.*lesion_id"):
        subgroup_audit(joined_table, by=["dx_type"])


def test_audit_table_joins_ground_truth_and_metadata(sample_dir):
    records = read_ham10000(str(sample_dir))
    results = pd.DataFrame({"image_id": [r.image_id for r in records], "status": "ok",
                            "prob_mel": 0.5, "prob_nv": 0.5, "malignant_prob": 0.5})
    table = audit_table(results.iloc[:-3], records)
    assert len(table) == len(records) - 3
    first = next(r for r in records if r.image_id == table["image_id"][0])
    row = table.iloc[0]
    assert (row["label"], row["lesion_id"], row["sex"], row["site"]) == (
        first.label, first.lesion_id, first.sex, first.site)
    audit = subgroup_audit(table, replicates=20)
    assert set(audit["groupings"]) == {"sex", "age_band", "site"}
