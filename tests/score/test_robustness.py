"""``raysky robustness``: the archive folders it writes, the figures it computes, and (slow) the
whole run through the scoring pipeline on the bundled sample."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysky.audit.artefacts import protected_region
from raysky.audit.paired import compare, example_strip
from raysky.cli.main import main
from raysky.data import load_mask, read_archive, read_ham10000
from raysky.score.robustness import _claim_output, _select, prepare_folders, run_robustness
from raysky.score.settings import RobustnessSettings, ScoringResources
from raysky.settings import ParameterError


def _settings(tmp_path, data, checkpoints=None, batch_size=8, **kw) -> RobustnessSettings:
    checkpoints = checkpoints or {"segmenter": "unused", "classifier": "unused"}
    kw = {"out": str(tmp_path / "out"), "artefacts": ("ruler", "hair"),
          "score": ScoringResources(batch_size=batch_size, progress=False), **kw}
    return RobustnessSettings(data=str(data), format="ham10000", **checkpoints, **kw)


def test_folders_pair_by_id_carry_metadata_and_differ_only_on_the_artefact(tmp_path, sample_dir):
    records = _select(read_ham10000(str(sample_dir)), limit=4, seed=0)
    settings = _settings(tmp_path, sample_dir)
    _claim_output(settings)
    table, skipped = prepare_folders(settings, records)
    assert not skipped and len(table) == 4
    assert set(table["mask_source"]) == {"ground_truth"}
    out = tmp_path / "out"
    folders = {}
    for name in ("clean", "ruler", "hair"):
        found = read_archive(str(out / "images" / name), str(out / "metadata.csv"))
        folders[name] = {r.image_id: r for r in found}
    assert set(folders["clean"]) == set(folders["ruler"]) == set(folders["hair"]) \
        == set(table["file_id"])
    by_id = {r.image_id: r for r in records}
    for row in table.itertuples():
        record, archived = by_id[row.image_id], folders["ruler"][row.file_id]
        assert (archived.age, archived.sex, archived.site) == (record.age, record.sex, record.site)
        clean = np.asarray(Image.open(out / "images" / "clean" / f"{row.image_id}.png"))
        for kind in ("ruler", "hair"):
            altered = np.asarray(Image.open(out / "images" / kind / f"{row.image_id}.png"))
            mask = np.asarray(Image.open(out / "artefact_masks" / kind / f"{row.image_id}.png")) > 0
            np.testing.assert_array_equal((altered != clean).any(axis=2), mask)  # lossless
            assert not (mask & protected_region(load_mask(record.mask_uri), clean.shape)).any()
            assert getattr(row, f"area_{kind}") == pytest.approx(mask.mean())
    # The example strip: clean, altered and (where a heatmap exists) the heatmap per image.
    shown = sorted(table["image_id"])[:2]
    heat = pd.DataFrame({"heatmap_png": [_png(np.linspace(0, 1, 150 * 200).reshape(150, 200)),
                                         None]}, index=shown)
    strip = Image.open(example_strip(str(out), "ruler", heat, shown))
    assert strip.size == (2 * (200 + 4), 3 * 150)
    # The same settings again give byte-identical images.
    before = (out / "images" / "hair" / f"{records[0].image_id}.png").read_bytes()
    prepare_folders(settings, records)
    assert (out / "images" / "hair" / f"{records[0].image_id}.png").read_bytes() == before


def test_without_masks_the_segmenters_are_used_and_said(tmp_path, sample_copy, tiny_checkpoints):
    shutil.rmtree(sample_copy / "masks")
    records = _select(read_ham10000(str(sample_copy)), limit=3, seed=1)
    assert all(r.mask_uri is None for r in records)
    settings = _settings(tmp_path, sample_copy, tiny_checkpoints, batch_size=2)
    _claim_output(settings)
    table, _ = prepare_folders(settings, records)
    assert list(table["mask_source"]) == ["segmenter"] * 3


def test_the_output_folder_is_claimed_carefully(tmp_path, sample_dir):
    settings = _settings(tmp_path, sample_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("not ours")
    with pytest.raises(ValueError, match="did not write"):
        _claim_output(settings)
    (tmp_path / "out" / "precious.txt").unlink()
    _claim_output(settings)
    (tmp_path / "out" / "results").mkdir()
    _claim_output(settings)  # same run: kept, so scoring can resume
    assert (tmp_path / "out" / "results").exists()
    settings.seed = 1
    _claim_output(settings)  # another run: its old results would pair with new images
    assert not (tmp_path / "out" / "results").exists()
    (tmp_path / "out" / "results").mkdir()
    settings.tta = True
    _claim_output(settings)  # scored another way: its old results would mix two pipelines
    assert not (tmp_path / "out" / "results").exists()
    with pytest.raises(ValueError, match="local folder"):
        _claim_output(_settings(tmp_path, sample_dir, out="s3://bucket/x"))


def _png(heat: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(heat * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_compare_computes_flips_deltas_and_attention_exactly(tmp_path):
    n, kind = 20, "ink"
    ids = [f"img{i:02d}" for i in range(n)]
    labels = ["mel" if i % 2 else "nv" for i in range(n)]
    table = pd.DataFrame({"image_id": ids, "file_id": [f"{i}.png" for i in ids], "label": labels,
                          "lesion_id": [f"L{i // 2}" for i in range(n)]})
    (tmp_path / "artefact_masks" / kind).mkdir(parents=True)
    heat = np.zeros((10, 10))
    heat[:, :5] = 1.0  # half the mass on the left
    mask = np.zeros((10, 10), bool)
    mask[:, :2] = True  # 2/5 of the heatmap's mass
    for i in ids:
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            tmp_path / "artefact_masks" / kind / f"{i}.png")
    good = np.array([0.9 if lab == "mel" else 0.1 for lab in labels])
    flipped = good.copy()
    flipped[:4] = 1 - flipped[:4]  # four answers turn around

    def frame(p_mel, heatmap):
        return pd.DataFrame({
            "prob_mel": p_mel, "prob_nv": 1 - p_mel, "malignant_prob": p_mel,
            "predicted_class": np.where(p_mel > 0.5, "mel", "nv"),
            "heatmap_png": [_png(heatmap)] * n}, index=pd.Index(ids, name="record_id"))

    result = compare(frame(good, np.ones((10, 10))), frame(flipped, heat), table, kind,
                     str(tmp_path), replicates=50, seed=0)
    assert result["pairs"] == n and result["flip_rate"]["value"] == pytest.approx(4 / n)
    assert result["flip_rate"]["low"] <= 0.2 <= result["flip_rate"]["high"]
    assert result["argmax_flip_rate"]["value"] == pytest.approx(4 / n)  # the decision is the argmax
    # A decision with offsets flips where the argmax does not: p_mel 0.45 -> 0.35 crosses 0.4.
    near, moved = np.full(n, 0.45), np.full(n, 0.45)
    moved[:3] = 0.35

    def decided(p_mel):
        return frame(p_mel, np.ones((10, 10))).assign(
            predicted_class=np.where(p_mel > 0.4, "mel", "nv"))

    offsets = compare(decided(near), decided(moved), table, kind, str(tmp_path), replicates=20,
                      seed=0)
    assert offsets["flip_rate"]["value"] == pytest.approx(3 / n)
    assert offsets["argmax_flip_rate"]["value"] == 0.0
    assert result["mean_abs_delta_malignant_prob"] == pytest.approx(4 * 0.8 / n)
    assert result["malignant_auc"]["clean"] == 1.0
    assert result["malignant_auc"]["delta"] == pytest.approx(result["malignant_auc"]["altered"] - 1)
    assert result["macro_auprc"]["delta"] < 0
    assert result["macro_auprc"]["low"] <= result["macro_auprc"]["delta"] <= result["macro_auprc"]["high"]
    assert result["artefact_attention"] == pytest.approx(0.4, abs=1e-6)
    assert result["clean_attention_same_pixels"] == pytest.approx(0.2, abs=1e-6)
    assert result["artefact_area_frac"] == pytest.approx(0.2)


def test_cli_names_the_artefact_types_for_an_unknown_one(tmp_path, sample_dir, capsys):
    code = main(["robustness", "--segmenter", "s", "--classifier", "c", "--data",
                 str(sample_dir), "--format", "ham10000", "--artefacts", "ruler,sticker",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'sticker'" in err and "ruler, ink, bubbles, hair, vignette" in err
    assert not (tmp_path / "out").exists()


def test_errors_name_python_parameters_and_the_cli_names_its_flags(tmp_path, sample_dir, capsys):
    """Checked before any image is written: below the CLI in parameter names (the nested
    scoring settings' too), on the command line with the flag the user typed."""
    settings = _settings(tmp_path, sample_dir, replicates=0)
    with pytest.raises(ParameterError, match=r"^replicates=0: must be at least 1$"):
        run_robustness(settings)
    settings = _settings(tmp_path, sample_dir, batch_size=0)
    with pytest.raises(ParameterError, match=r"^batch_size=0: must be at least 1$"):
        run_robustness(settings)
    base = ["robustness", "--segmenter", "s", "--classifier", "c", "--data", str(sample_dir),
            "--format", "ham10000", "--out", str(tmp_path / "out")]
    assert main([*base, "--replicates", "0"]) == 2
    assert "raysky robustness: error: --replicates 0: must be at least 1" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "error: --workers 0: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_robustness_end_to_end_on_the_sample(tmp_path, sample_copy, tiny_checkpoints, ray_local,
                                             capsys):
    records = sorted(read_ham10000(str(sample_copy)), key=lambda r: r.image_id)
    val = {r.image_id for r in records[::7]}  # 5 images
    (sample_copy / "splits.csv").write_text("image_id,split\n" + "".join(
        f"{r.image_id},{'val' if r.image_id in val else 'train'}\n" for r in records))
    out = tmp_path / "robustness"
    code = main(["robustness", "--segmenter", tiny_checkpoints["segmenter"],
                 "--classifier", tiny_checkpoints["classifier"], "--data", str(sample_copy),
                 "--format", "ham10000", "--split", "val", "--artefacts", "ruler,bubbles",
                 "--out", str(out), "--limit", "4", "--workers", "1", "--cpus-per-worker", "1",
                 "--batch-size", "4", "--replicates", "20", "--tta", "--quiet",
                 "--update-card", str(tmp_path / "classifier-carded")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ruler" in printed and "bubbles" in printed
    report = json.loads((out / "robustness.json").read_text())
    assert report["images"] == 4 and report["split"] == "val" and report["tta"] is True
    assert report["mask_source"] == {"ground_truth": 4, "segmenter": 0}
    assert report["masks"] == "ground truth"
    assert set(report["by_artefact"]) == {"ruler", "bubbles"}
    clean = pd.read_parquet(out / "results" / "clean")
    assert set(clean["image_id"].str.removesuffix(".png")) <= val
    for kind, result in report["by_artefact"].items():
        assert result["pairs"] == 4
        assert 0.0 <= result["flip_rate"]["value"] <= 1.0
        altered = pd.read_parquet(out / "results" / kind)
        pairs = clean.merge(altered, on="image_id", suffixes=("_clean", "_alt"))
        pairs = pairs[(pairs["status_clean"] == "ok") & (pairs["status_alt"] == "ok")]
        flips = (pairs["predicted_class_clean"] != pairs["predicted_class_alt"]).mean()
        assert result["flip_rate"]["value"] == pytest.approx(flips)
        delta = (pairs["malignant_prob_alt"] - pairs["malignant_prob_clean"]).abs().mean()
        assert result["mean_abs_delta_malignant_prob"] == pytest.approx(delta)
        assert 0.0 <= result["artefact_attention"] <= 1.0
        for key in ("clean", "altered", "delta", "low", "high"):
            assert key in result["macro_auprc"] and key in result["malignant_auc"]
        strip = Image.open(report["examples"][kind])
        assert strip.height == 3 * 150 and strip.width > 4 * 150  # clean, altered, heatmap x 4
    # raysky report shows the same table and one example strip per type.
    page = tmp_path / "report.html"
    assert main(["report", "--results", str(out / "results" / "clean"), "--robustness", str(out),
                 "--out", str(page)]) == 0
    text = page.read_text()
    assert 'id="robustness"' in text and text.count('examples: clean, altered, heatmap') == 2
    flip = report["by_artefact"]["ruler"]["flip_rate"]["value"]
    assert f"<td>{flip:.3f}</td>" in text
    # The new classifier version's card holds the same table; the weights are the same bytes.
    carded = tmp_path / "classifier-carded"
    card = json.loads((carded / "model_card.json").read_text())
    assert card["robustness"]["by_artefact"] == report["by_artefact"]
    assert (carded / "model.safetensors").read_bytes() == (
        Path(tiny_checkpoints["classifier"]) / "model.safetensors").read_bytes()
