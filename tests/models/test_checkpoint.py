"""Checkpoints: exact round trips on local disk and S3, versions, guard rails, encoder weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raysky import storage
from raysky.data.taxonomy import ISIC2019_CLASSES
from raysky.models import create_classifier, create_segmenter, load_checkpoint, save_checkpoint
from raysky.models.checkpoint import (
    CheckpointIntegrityError,
    read_checkpoint_meta,
)
from raysky.models.preprocess import metadata_to_tensors, model_input


def _classifier_inputs():
    torch.manual_seed(1)
    model = create_classifier("tiny", classes=ISIC2019_CLASSES).eval()
    meta = metadata_to_tensors(model.vocab.encode_batch([30, None], ["female", None],
                                                        ["palms/soles", "acral"]))
    return model, (torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64), meta)


def test_local_round_trip_gives_identical_outputs(tmp_path):
    segmenter = create_segmenter("tiny").eval()
    classifier, inputs = _classifier_inputs()
    seg_meta = save_checkpoint(segmenter, str(tmp_path / "seg"), preset="tiny")
    cls_meta = save_checkpoint(classifier, str(tmp_path / "cls"), preset="tiny", extra={"epoch": 3})

    seg_loaded = load_checkpoint(str(tmp_path / "seg"), expected_kind="segmenter")
    cls_loaded = load_checkpoint(str(tmp_path / "cls"), expected_kind="classifier")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(segmenter(x), seg_loaded.model(x))
        assert torch.equal(classifier(*inputs), cls_loaded.model(*inputs))

    assert seg_loaded.version == seg_meta["version"] and seg_loaded.version.startswith("seg-")
    assert cls_loaded.classes == ISIC2019_CLASSES
    description = json.loads((tmp_path / "cls" / "config.json").read_text())
    for key in ("preset", "classes", "input_size", "normalization", "metadata_vocab", "version"):
        assert key in description, key
    assert description["extra"] == {"epoch": 3}
    assert cls_meta["metadata_vocab"]["site"][0] == "unknown"


def test_s3_round_trip_and_version_tracks_weights(s3, tmp_path):
    bucket = s3.create_bucket("raysky-checkpoints")
    classifier, inputs = _classifier_inputs()
    uri = storage.join(bucket, "runs", "cls")
    meta = save_checkpoint(classifier, uri, preset="tiny")
    loaded = load_checkpoint(uri)
    with torch.no_grad():
        assert torch.equal(classifier(*inputs), loaded.model(*inputs))
    # Same weights -> same version; changed weights -> new version.
    assert save_checkpoint(classifier, str(tmp_path / "again"), "tiny")["version"] == meta["version"]
    with torch.no_grad():
        classifier.head[-1].bias.add_(1.0)
    assert save_checkpoint(classifier, str(tmp_path / "changed"), "tiny")["version"] != meta["version"]


def test_channels_last_model_saves(tmp_path):
    model = create_segmenter("tiny").eval().to(memory_format=torch.channels_last)
    save_checkpoint(model, str(tmp_path / "seg"), "tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), load_checkpoint(str(tmp_path / "seg")).model(x), atol=1e-6)


def test_guard_rails_name_the_problem(tmp_path):
    save_checkpoint(create_segmenter("tiny"), str(tmp_path / "seg"), "tiny")
    with pytest.raises(ValueError, match="is a segmenter checkpoint, but a classifier was expected"):
        load_checkpoint(str(tmp_path / "seg"), expected_kind="classifier")
    with pytest.raises(FileNotFoundError, match="not a raysky checkpoint"):
        load_checkpoint(str(tmp_path / "nothing-here"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_checkpoint_meta(str(tmp_path / "bad"))


def test_truncated_or_swapped_weights_are_refused_naming_the_checkpoint(s3, tmp_path):
    first = str(tmp_path / "first")
    meta = save_checkpoint(create_segmenter("tiny"), first, "tiny")
    assert meta["version"] == f"seg-{meta['weights_sha256'][:12]}"
    assert len(meta["weights_sha256"]) == 64
    other = str(tmp_path / "other")
    save_checkpoint(create_segmenter("tiny"), other, "tiny")
    weights = tmp_path / "first" / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointIntegrityError, match=f"{first}: model.safetensors does not match"):
        load_checkpoint(first)
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointIntegrityError, match="truncated, damaged or from another"):
        load_checkpoint(first)

    # The same on S3, where Serve and the score actors load from.
    bucket = s3.create_bucket("raysky-integrity")
    uri = storage.join(bucket, "seg")
    save_checkpoint(create_segmenter("tiny"), uri, "tiny")
    storage.write_bytes(storage.join(uri, "model.safetensors"), good)
    with pytest.raises(CheckpointIntegrityError, match=f"{uri}: model.safetensors does not match"):
        load_checkpoint(uri)


def test_checkpoints_without_the_full_hash_are_checked_against_their_version(tmp_path):
    old = tmp_path / "old"
    save_checkpoint(create_segmenter("tiny"), str(old), "tiny")
    description = json.loads((old / "config.json").read_text())
    del description["weights_sha256"]  # what checkpoints written before the full hash hold
    (old / "config.json").write_text(json.dumps(description))
    assert load_checkpoint(str(old)).version == description["version"]

    save_checkpoint(create_segmenter("tiny"), str(tmp_path / "new"), "tiny")
    (old / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointIntegrityError, match=f"expected {description['version'][4:]}"):
        load_checkpoint(str(old))
    description["version"] = "seg-unknown"
    (old / "config.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointIntegrityError, match="cannot verify"):
        load_checkpoint(str(old))


def test_a_classifier_runs_at_its_inference_size_outside_training(tmp_path):
    """``inference_size`` (FixRes) is what scoring, serving and calibration resize to: the
    checkpoint says so, the card says both sides, and the same weights run at it."""
    model = create_classifier("tiny", inference_size=96).eval()
    meta = save_checkpoint(model, str(tmp_path / "cls"), preset="tiny")
    assert meta["input_size"] == 96 and meta["config"]["input_size"] == 64

    loaded = load_checkpoint(str(tmp_path / "cls"), expected_kind="classifier")
    images = [np.full((150, 200, 3), 120, np.uint8), np.zeros((450, 600, 3), np.uint8)]
    pixels = model_input(images, loaded.meta)
    assert pixels.shape == (2, 3, 96, 96)
    encoded = metadata_to_tensors(loaded.model.vocab.encode_batch([None, 40], [None, "male"],
                                                                  [None, "back"]))
    with torch.no_grad():
        logits = loaded.model(pixels, torch.ones(2, 1, 96, 96), encoded)
    assert logits.shape == (2, len(loaded.classes)) and torch.isfinite(logits).all()
    card = (tmp_path / "cls" / "model_card.md").read_text()
    assert "at 96 px (trained at 64 px)" in card

    plain = save_checkpoint(create_classifier("tiny"), str(tmp_path / "plain"), preset="tiny")
    assert plain["input_size"] == 64
    assert "trained at" not in (tmp_path / "plain" / "model_card.md").read_text()


def test_an_inference_size_below_the_encoder_stride_is_refused():
    with pytest.raises(ValueError, match="inference_size=16 .* at least 32"):
        create_classifier("tiny", inference_size=16)
