"""The paper's two networks: shapes, dtypes, gradient flow, config errors, and real learning."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raysky.data.metadata import MetadataVocab
from raysky.models import (
    count_parameters,
    create_classifier,
    create_segmenter,
    get_preset,
    segmentation_loss,
)
from raysky.models.blocks import ASPP, DualAttentionGate
from raysky.models.preprocess import images_to_tensor, masks_to_tensor, metadata_to_tensors
from raysky.models.runtime import autocast
from raysky.train.settings import LoopConfig, TrainSettings
from raysky.train.tasks import ClassifierTask

torch.set_num_threads(2)


def _meta(batch: int) -> dict[str, torch.Tensor]:
    return metadata_to_tensors(MetadataVocab().encode_batch(
        [45, None] * (batch // 2) + [60] * (batch % 2),
        ["male", "female"] * (batch // 2) + [""] * (batch % 2),
        ["back", "face"] * (batch // 2) + ["nowhere"] * (batch % 2)))


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_segmenter_shapes_and_dtypes(preset):
    size = get_preset(preset).segmenter.input_size
    model = create_segmenter(preset).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 1, size, size) and out.dtype == torch.float32
        # Non-square and odd sizes still come back at the input resolution.
        assert model(torch.randn(1, 3, size + 8, size - 8)).shape == (1, 1, size + 8, size - 8)
        with autocast("cpu", "bf16"):
            assert model(torch.randn(2, 3, size, size)).dtype == torch.bfloat16
        cl = model.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
        assert cl(x).shape == (2, 1, size, size)


@pytest.mark.parametrize("preset", ["tiny", "lite"])
@pytest.mark.parametrize("use_metadata", [True, False])
def test_classifier_shapes_and_dtypes(preset, use_metadata):
    size = get_preset(preset).classifier.input_size
    model = create_classifier(preset, use_metadata=use_metadata).eval()
    image, mask = torch.randn(3, 3, size, size), torch.ones(3, 1, size, size)
    with torch.no_grad():
        logits = model(image, mask, _meta(3))
        assert logits.shape == (3, 7) and logits.dtype == torch.float32
        out = model.forward_features(image, mask, None)  # metadata absent -> unknown tokens
        if model.shares_encoder:  # one feature map serves both views
            assert out.lesion_features is None
        else:
            assert out.full_features.shape[:2] == out.lesion_features.shape[:2]
        with autocast("cpu", "bf16"):
            assert model(image, mask, _meta(3)).dtype == torch.bfloat16


def test_metadata_is_numpy_until_the_one_tensor_conversion():
    encoded = MetadataVocab().encode_batch([45, None, "abc"], ["male", "F", None],
                                           ["back", "palms/soles", "elbow"])
    assert isinstance(encoded.age, np.ndarray) and encoded.age.dtype == np.float32
    assert encoded.age.shape == (3, 2) and encoded.age[:, 1].tolist() == [0.0, 1.0, 1.0]
    assert encoded.sex.dtype == encoded.site.dtype == np.int64
    assert encoded.sex.tolist() == [1, 2, 0] and encoded.site.tolist() == [5, 8, 0]
    assert MetadataVocab().encode_batch([], [], []).age.shape == (0, 2)
    tensors = metadata_to_tensors(encoded)
    assert {k: v.dtype for k, v in tensors.items()} == {
        "age": torch.float32, "sex": torch.long, "site": torch.long}
    assert torch.equal(tensors["age"], torch.from_numpy(encoded.age))

    # Training's batch columns (read-only, as Ray may hand them over) take the same path.
    settings = TrainSettings(data="unused", name="metadata", preset="tiny", epochs=1,
                             batch_size=3, lr=1e-3)
    config = LoopConfig.from_settings("classifier", settings,
                                      classes=list(get_preset("tiny").classifier.classes))
    task = ClassifierTask(config)
    batch = {**task.synthetic_batch(3), "age": encoded.age, "sex": encoded.sex,
             "site": encoded.site}
    for name in ("age", "sex", "site"):
        batch[name].setflags(write=False)
    inputs = task.inputs(batch, torch.device("cpu"))
    assert all(torch.equal(inputs["metadata"][k], tensors[k]) for k in tensors)

    # The classifier's own fallback for absent metadata is the all-unknown encoding.
    model = create_classifier("tiny").eval()
    image, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64)
    unknown = metadata_to_tensors(model.vocab.encode_batch([None] * 2, [None] * 2, [None] * 2))
    with torch.no_grad():
        assert torch.equal(model(image, mask), model(image, mask, unknown))


def test_data_package_imports_without_torch():
    code = "import sys, raysky.data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_isic2019_classifier_has_eight_outputs():
    from raysky.data.taxonomy import ISIC2019_CLASSES

    model = create_classifier("tiny", classes=ISIC2019_CLASSES).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 64, 64)).shape == (1, 8)
    assert model.config.classes == ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")


def test_paper_preset_builds_with_expected_sizes():
    segmenter = create_segmenter("paper").eval()
    classifier = create_classifier("paper").eval()
    assert segmenter.encoder.feature_info.channels() == [24, 32, 48, 136, 384]  # EfficientNet-B3
    assert type(classifier.full_encoder).__name__ == "DenseNet"
    # DenseNet201 is 18.1M parameters without its head; two of them dominate the classifier.
    assert count_parameters(classifier.full_encoder) == pytest.approx(18.09e6, rel=0.01)
    assert 36e6 < count_parameters(classifier) < 45e6
    assert 10e6 < count_parameters(segmenter) < 20e6
    with torch.no_grad():
        assert segmenter(torch.randn(1, 3, 256, 256)).shape == (1, 1, 256, 256)
        assert classifier(torch.randn(1, 3, 224, 224), torch.ones(1, 1, 224, 224)).shape == (1, 7)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_gradients_reach_every_segmenter_branch():
    model = create_segmenter("tiny").train()
    x = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    segmentation_loss(model(x), target).backward()
    gates = [m for m in model.modules() if isinstance(m, DualAttentionGate)]
    assert len(gates) == 4  # one per skip connection
    branches = {"encoder": model.encoder, "aspp": next(m for m in model.modules() if isinstance(m, ASPP)),
                "head": model.head}
    branches |= {f"gate{i}": g for i, g in enumerate(gates)}
    branches |= {f"gate{i}.channel": g.channel for i, g in enumerate(gates)}
    branches |= {f"gate{i}.spatial": g.psi for i, g in enumerate(gates)}
    for name, module in branches.items():
        assert _grad_norm(module) > 0, f"no gradient reached {name}"


def test_gradients_reach_every_classifier_branch():
    model = create_classifier("tiny").train()
    logits = model(torch.randn(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.3).float(), _meta(4))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    branches = {
        "full stream": model.full_encoder,
        "lesion stream": model.lesion_encoder,
        "cross-attention full->lesion": model.fusion.full_to_lesion,
        "cross-attention lesion->full": model.fusion.lesion_to_full,
        "metadata transformer": model.metadata.encoder,
        "metadata embeddings": model.metadata.site,
        "head": model.head,
    }
    for name, module in branches.items():
        assert _grad_norm(module) > 0, f"no gradient reached {name}"


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="decoder_channels has 3 entries"):
        create_segmenter("tiny", decoder_channels=(8, 8, 8))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_classifier("tiny", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        create_segmenter("huge")
    with pytest.raises(ValueError, match="unknown diagnosis label"):
        create_classifier("tiny", classes=["mel", "zebra"])


def _load_sample(sample_dir, count: int, one_per_class: bool):
    import pandas as pd

    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv")
    rows = meta.groupby("dx").head(1) if one_per_class else meta.head(count)
    rows = rows.head(count)
    images = [np.asarray(Image.open(sample_dir / "images" / f"{i}.jpg").convert("RGB"))
              for i in rows.image_id]
    masks = [(np.asarray(Image.open(sample_dir / "masks" / f"{i}_segmentation.png")) > 127)
             .astype(np.uint8) for i in rows.image_id]
    return rows, images, masks


def test_tiny_segmenter_overfits_real_images(sample_dir):
    torch.manual_seed(0)
    _, images, masks = _load_sample(sample_dir, 6, one_per_class=False)
    preset = get_preset("tiny").segmenter
    x = images_to_tensor(images, preset.input_size, preset.mean, preset.std)
    y = masks_to_tensor(masks, preset.input_size)
    model = create_segmenter("tiny").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = segmentation_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses[::10]


def test_tiny_classifier_overfits_real_images(sample_dir):
    torch.manual_seed(0)
    rows, images, masks = _load_sample(sample_dir, 7, one_per_class=True)
    model = create_classifier("tiny").train()
    cfg = model.config
    x = images_to_tensor(images, cfg.input_size, cfg.mean, cfg.std)
    m = masks_to_tensor(masks, cfg.input_size)
    y = torch.tensor([cfg.classes.index(dx) for dx in rows.dx])
    meta = metadata_to_tensors(model.vocab.encode_batch(list(rows.age), list(rows.sex),
                                                        list(rows.localization)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, m, meta), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # ~ln(7) at the start
    assert min(losses[-5:]) < 0.25 * losses[0], losses[::10]
