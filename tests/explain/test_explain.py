"""Grad-CAM: shape and range, agreement with pytorch-grad-cam, no leaks, lesion focus."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from raysky.explain import GradCAMExplainer, feature_layer, lesion_focus
from raysky.models import create_classifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return create_classifier("tiny").eval()


def test_heatmaps_have_input_shape_and_unit_range(classifier):
    image, mask = torch.randn(3, 3, 64, 64), (torch.rand(3, 1, 64, 64) > 0.5).float()
    probs, heat = GradCAMExplainer(classifier)(image, mask)
    assert probs.shape == (3, 7) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    assert heat.shape == (3, 64, 64) and heat.dtype == torch.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    # Each non-empty map is scaled so that its peak is exactly 1.
    peaks = heat.flatten(1).amax(1)
    assert all(p == pytest.approx(1.0) or p == 0.0 for p in peaks.tolist())


def test_explainer_works_under_no_grad_but_refuses_inference_mode(classifier):
    image, mask = torch.randn(1, 3, 64, 64), torch.ones(1, 1, 64, 64)
    with torch.no_grad():
        assert GradCAMExplainer(classifier)(image, mask).heatmaps.shape == (1, 64, 64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        GradCAMExplainer(classifier)(image, mask)


def test_explicit_targets_change_the_map_and_default_is_the_prediction(classifier):
    image, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64)
    explainer = GradCAMExplainer(classifier)
    default = explainer(image, mask)
    predicted = explainer(image, mask, targets=default.probabilities.argmax(1))
    assert torch.allclose(default.heatmaps, predicted.heatmaps)
    n_classes = default.probabilities.shape[1]
    other = explainer(image, mask, targets=(default.probabilities.argmax(1) + 1) % n_classes)
    for i in range(2):
        assert not torch.allclose(other.heatmaps[i], default.heatmaps[i], atol=1e-4), i


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_feature_layer_outputs_what_forward_features_returns(preset):
    model = create_classifier(preset, pretrained_encoder="none").eval()
    seen = []
    handle = feature_layer(model.full_encoder).register_forward_hook(
        lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            expected = model.full_encoder.forward_features(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    with pytest.raises(ValueError, match="no known last feature layer"):
        feature_layer(torch.nn.Linear(2, 2))


def test_single_stream_cam_matches_pytorch_grad_cam():
    """Our hook-free Grad-CAM equals the reference library's on the same layer."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(3)
    model = create_classifier("tiny", use_lesion_stream=False, use_metadata=False).eval()
    image, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64)
    ours = GradCAMExplainer(model)(image, mask, targets=torch.tensor([1, 4]))

    class ImageOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, torch.ones(x.shape[0], 1, *x.shape[-2:]))

    with GradCAM(model=ImageOnly(), target_layers=[feature_layer(model.full_encoder)]) as cam:
        reference = cam(input_tensor=image, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(4)])
    for ours_map, ref_map in zip(ours.heatmaps.numpy(), reference, strict=True):
        if ref_map.max() == 0:
            assert ours_map.max() == 0
            continue
        # The library min-max scales; ours scales by the peak. Compare shapes of the maps.
        corr = np.corrcoef(ours_map.ravel(), ref_map.ravel())[0, 1]
        assert corr > 0.99, corr


def test_repeated_calls_leak_neither_hooks_nor_memory(classifier):
    import psutil

    explainer = GradCAMExplainer(classifier)
    image, mask = torch.randn(4, 3, 64, 64), torch.ones(4, 1, 64, 64)

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                   for m in classifier.modules())

    hooks_before = hook_count()
    for _ in range(20):  # warm up allocator caches
        explainer(image, mask)
    gc.collect()
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    for _ in range(200):
        explainer(image, mask)
    gc.collect()
    growth = psutil.Process(os.getpid()).memory_info().rss - rss_before
    assert hook_count() == hooks_before
    assert all(p.grad is None for p in classifier.parameters())  # no gradient left on weights
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 calls"


def test_lesion_focus_measures_mass_inside_the_mask():
    heat = torch.zeros(3, 4, 4)
    heat[0, :2, :2] = 1.0  # all inside
    heat[1, :, :] = 1.0  # uniform: focus equals the mask's area
    mask = torch.zeros(3, 4, 4)
    mask[:, :2, :2] = 1.0
    focus = lesion_focus(heat, mask)
    assert focus[0] == pytest.approx(1.0)
    assert focus[1] == pytest.approx(0.25)
    assert torch.isnan(focus[2])  # an empty heatmap has no focus
