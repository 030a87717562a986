"""Model cards: built from the checkpoint itself, written beside every checkpoint, updated only
as a new version with the weights untouched, and printed by ``raysky info --card``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from raysky.cli.main import main
from raysky.models import create_classifier, load_checkpoint, save_checkpoint
from raysky.models.card import SECTIONS, build_card, render_markdown
from raysky.models.checkpoint import update_card

# What raysky train records in a checkpoint's ``extra`` (see raysky.train.loops.write_checkpoint).
TRAINING_EXTRA = {
    "epoch": 3, "run": "cls",
    "metrics": {"epoch": 3, "balanced_accuracy": 0.5849, "auc": 0.9104, "accuracy": 0.806,
                "auc_per_class": {"mel": 0.91, "nv": 0.94}, "val_loss": 0.77, "val_images": 1346,
                "precision": "fp32", "train_seconds": 542.4},
    "settings": {"epochs": 3, "batch_size": 16, "workers": 1, "lr": 0.001, "encoder_lr_scale": 0.2,
                 "weight_decay": 1e-4, "label_smoothing": 0.1, "class_weight_power": 0.5,
                 "precision": "auto"},
    "initial_weights": {"full_encoder": {"source": "imagenet:package:x==1", "sha256": "ab" * 32,
                                         "tensors_loaded": 294, "tensors_total": 294}},
    "provenance": {"training_data": {"data": "s3://derm/ham", "format": "ham10000",
                                     "split": "s3://derm/ham/splits.csv", "split_sha256": "cd" * 32,
                                     "train_images": 7598, "val_images": 1346,
                                     "train_classes": {"mel": 962, "nv": 5790}}},
    "machine": {"cpu": "AMD EPYC", "logical_cpus": 2, "gpu": None},
    "training_seconds": 1950.0,
}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = create_classifier("tiny", classes=["mel", "nv"])
    save_checkpoint(model, str(tmp_path / "cls"), "tiny", extra=TRAINING_EXTRA)
    return tmp_path / "cls"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_card_agrees_with_the_checkpoint(checkpoint):
    meta = json.loads((checkpoint / "config.json").read_text())
    card = json.loads((checkpoint / "model_card.json").read_text())
    assert card == json.loads(json.dumps(build_card(meta)))
    model = card["model"]
    assert (model["version"], model["weights_sha256"]) == (meta["version"], meta["weights_sha256"])
    assert model["weights_sha256"] == _sha256(checkpoint / "model.safetensors")
    assert model["parameters"] == sum(p.numel() for p in load_checkpoint(str(checkpoint)).model.parameters())
    assert model["classes"] == ["mel", "nv"] and model["preset"] == "tiny"
    metrics = meta["extra"]["metrics"]
    for key in ("balanced_accuracy", "auc", "accuracy", "auc_per_class", "val_images"):
        assert card["validation"][key] == metrics[key]
    assert card["initial_weights"] == meta["extra"]["initial_weights"]
    assert card["training_data"]["split_sha256"] == "cd" * 32
    assert card["recipe"]["lr"] == 0.001 and card["recipe"]["precision"] == "fp32"
    assert card["recipe"]["training_seconds"] == 1950.0
    assert all(card[section] is None for section in SECTIONS)
    assert card["calibration"] is None and "not a diagnosis" in card["intended_use"]
    assert any("mel, nv" in limit for limit in card["limitations"])
    text = (checkpoint / "model_card.md").read_text()
    assert text == render_markdown(card)
    assert meta["version"] in text and "0.585" in text and "7598 training" in text
    assert "not measured (`raysky robustness --update-card OUT`)" in text
    assert "class weight power 0.50\n" in text  # no consistency loss recorded, none shown
    consistent = {**meta, "extra": {**meta["extra"], "settings": {
        **meta["extra"]["settings"], "artefact_consistency": 10.0}}}
    assert "class weight power 0.50, artefact consistency 10.00\n" in render_markdown(
        build_card(consistent))


def test_updating_the_card_is_a_new_version_with_the_same_weights(checkpoint, tmp_path):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    robustness = {"images": 4, "masks": "ground truth", "by_artefact": {"ruler": {
        "flip_rate": {"value": 0.25}, "mean_abs_delta_malignant_prob": 0.03,
        "macro_auprc": {"delta": -0.01}, "malignant_auc": {"delta": 0.0},
        "artefact_attention": 0.07, "artefact_area_frac": 0.06}}}
    target = tmp_path / "cls-card"
    meta = update_card(str(checkpoint), str(target), {"robustness": robustness})
    assert _sha256(target / "model.safetensors") == _sha256(checkpoint / "model.safetensors")
    assert meta["version"] == json.loads((checkpoint / "config.json").read_text())["version"]
    assert meta["derived_from"] == str(checkpoint)
    assert load_checkpoint(str(target)).meta["card"]["robustness"] == robustness  # sha verified
    card = json.loads((target / "model_card.json").read_text())
    assert card["robustness"] == robustness and card["validation"]["auc"] == 0.9104
    assert "| ruler | 0.250 |" in (target / "model_card.md").read_text()
    # The original is untouched, and a second update keeps the first section.
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    again = update_card(str(target), str(tmp_path / "v3"), {"evaluation": {"images": 4}})
    assert set(again["card"]) == {"robustness", "evaluation"}


def test_card_updates_refuse_bad_requests(checkpoint):
    with pytest.raises(ValueError, match="unknown card section"):
        update_card(str(checkpoint), str(checkpoint) + "-x", {"weights": {}})
    with pytest.raises(ValueError, match="needs its own location"):
        update_card(str(checkpoint), str(checkpoint), {"evaluation": {}})


def test_info_prints_the_card(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--card"]) == 0
    out = capsys.readouterr().out
    assert out == (checkpoint / "model_card.md").read_text()
    assert main(["info", "--card"]) == 2
    assert "--card needs a checkpoint" in capsys.readouterr().err


def test_training_records_the_split_by_file_hash_and_by_assignment(sample_copy):
    from raysky.data.readers import class_counts
    from raysky.train.datasets import load_splits
    from raysky.train.driver import training_data
    from raysky.train.settings import TrainSettings

    settings = TrainSettings(data=str(sample_copy), name="cls")
    train, val, how = load_splits(str(sample_copy), "ham10000")
    derived = training_data(settings, "classifier", train, val, how)
    # No split file to hash, but the assignment itself is still pinned down.
    assert derived["split_sha256"] is None and len(derived["split_ids_sha256"]) == 64
    assert derived["train_classes"] == class_counts(train)
    assert sum(derived["train_classes"].values()) == derived["train_images"] == len(train)
    assert sum(derived["val_classes"].values()) == derived["val_images"] == len(val)

    # The same split written as splits.csv, rows reversed: the file's own hash, same assignment.
    rows = [f"{r.image_id},train" for r in train] + [f"{r.image_id},val" for r in val]
    (sample_copy / "splits.csv").write_text("image_id,split\n" + "\n".join(rows[::-1]) + "\n")
    train2, val2, how2 = load_splits(str(sample_copy), "ham10000")
    from_file = training_data(settings, "classifier", train2, val2, how2)
    assert from_file["split_sha256"] == _sha256(sample_copy / "splits.csv")
    assert from_file["split_ids_sha256"] == derived["split_ids_sha256"]
    # Moving one image to the other side changes it.
    moved = training_data(settings, "classifier", train2[1:], val2 + train2[:1], how2)
    assert moved["split_ids_sha256"] != derived["split_ids_sha256"]
    card_text = render_markdown(build_card({"kind": "classifier", "extra": {
        "provenance": {"training_data": from_file}}}))
    assert from_file["split_ids_sha256"] in card_text and from_file["split_sha256"] in card_text


def test_markdown_opens_with_hugging_face_front_matter(checkpoint, tmp_path):
    import yaml

    text = (checkpoint / "model_card.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert body.lstrip().startswith("# Model card: raysky classifier")
    # HAM10000 is CC BY-NC 4.0, and weights trained on it carry the term on.
    assert meta["license"] == "cc-by-nc-4.0" and meta["datasets"] == ["ham10000"]
    assert meta["pipeline_tag"] == "image-classification"
    assert {"raysky", "dermoscopy", "preset-tiny"} <= set(meta["tags"])
    assert "calibrated" not in meta["tags"]
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"type": "ham10000", "name": "HAM10000", "split": "validation"}
    figures = {m["type"]: m["value"] for m in result["metrics"]}
    assert figures == {"balanced_accuracy": 0.5849, "auc": 0.9104, "accuracy": 0.806}
    assert sorted(meta["metrics"]) == sorted(figures)

    # Evaluated later: the evaluation figures join the index as a second result.
    update_card(str(checkpoint), str(tmp_path / "evaluated"), {"evaluation": {
        "data": "s3://derm/ham", "format": "ham10000", "split": "test", "images": 500,
        "balanced_accuracy": 0.61, "auc": 0.92, "malignant_auc": float("nan")}})
    meta = yaml.safe_load((tmp_path / "evaluated" / "model_card.md").read_text()[4:].split(
        "\n---\n", 1)[0])
    test = meta["model-index"][0]["results"][1]
    assert test["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in test["metrics"]} == {"balanced_accuracy": 0.61,
                                                                "auc": 0.92}


def test_a_card_without_training_records_says_so_in_its_front_matter(tmp_path):
    import yaml

    from raysky.models import create_segmenter

    save_checkpoint(create_segmenter("tiny"), str(tmp_path / "seg"), "tiny")
    text = (tmp_path / "seg" / "model_card.md").read_text()
    meta = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    assert meta["license"] == "other" and meta["pipeline_tag"] == "image-segmentation"
    assert "datasets" not in meta and "model-index" not in meta


def test_the_evaluation_section_gives_the_decision_rules_balanced_accuracy_beside_isics():
    """A calibrated model serves predicted_class with decision offsets; its card must say what
    that scores, not only ISIC's argmax figure, which can be several points lower."""
    from raysky.review.output import card_sections

    classification = {"balanced_accuracy": 0.659, "auc": 0.92}
    with_rule = card_sections({"classification": {**classification,
                                                  "decision": {"balanced_accuracy": 0.727}}})
    without = card_sections({"classification": classification})
    assert with_rule["evaluation"]["balanced_accuracy_predicted_class"] == 0.727
    assert "balanced_accuracy_predicted_class" not in without["evaluation"]
    text = render_markdown(build_card({"kind": "classifier", "card": with_rule}))
    assert "balanced_accuracy 0.659, balanced_accuracy_predicted_class 0.727" in text
