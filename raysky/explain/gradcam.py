"""Grad-CAM over both classifier streams, computed from the prediction's own forward pass.

The classifier exposes its two last feature maps, so no hooks are needed: the explainer runs
the encoders once, marks their outputs as differentiable leaves, and differentiates the target
logits back to them through the (cheap) fusion and head only. That gives the heatmap for the
price of the prediction plus a small backward pass, and nothing is left registered on the model
between calls, so repeated use cannot leak hooks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from raysky.models.classifier import DualStreamClassifier


class Explanation(NamedTuple):
    """Class probabilities (float32 ``[B, C]``) and heatmaps (float32 ``[B, H, W]`` in [0, 1])."""

    probabilities: torch.Tensor
    heatmaps: torch.Tensor


# The last module each timm encoder family runs in ``forward_features``: its output is the
# feature map raysky explains, so hook-based Grad-CAM tools must target exactly that module.
_FEATURE_LAYERS: tuple[str, ...] = ("bn2", "features")


def feature_layer(encoder: torch.nn.Module) -> torch.nn.Module:
    """The module of ``encoder`` whose output is ``encoder.forward_features(x)``.

    That is the layer :class:`GradCAMExplainer` explains (EfficientNet's ``bn2`` after the
    head convolution, DenseNet's ``features`` block), for reference implementations such as
    pytorch-grad-cam that hook a named layer. Other encoder families are a ``ValueError``.
    """
    for name in _FEATURE_LAYERS:
        layer = getattr(encoder, name, None)
        if isinstance(layer, torch.nn.Module):
            return layer
    raise ValueError(f"{type(encoder).__name__}: no known last feature layer (looked for "
                     f"{', '.join(_FEATURE_LAYERS)}); add this encoder family to _FEATURE_LAYERS")


def cam_from_gradients(feature_map: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM for one layer: ReLU of the feature maps weighted by their spatially pooled gradients."""
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * feature_map.float()).sum(dim=1))


def normalize_heatmaps(cams: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each map to [0, 1] by its maximum; an all-zero map stays zero."""
    peak = cams.flatten(1).amax(dim=1).clamp_min(eps)
    return (cams / peak[:, None, None]).clamp_(0.0, 1.0)


def combine_stream_cams(cams: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Upsample each stream's CAM to ``size``, normalise each, sum them and renormalise.

    Normalising per stream first keeps one stream's larger activations from hiding the other.
    """
    resized = [
        F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        for cam in cams
    ]
    return normalize_heatmaps(sum(normalize_heatmaps(c) for c in resized))


def lesion_focus(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each heatmap's mass inside its lesion mask, in [0, 1]; NaN for an empty heatmap.

    This is the number behind the paper's claim that the model looks at the lesion: 1.0 means
    all of the evidence lies on the lesion, the mask's own area fraction is what chance gives.
    """
    heat = heatmaps.float().flatten(1)
    inside = (heat * masks.float().flatten(1)).sum(1)
    total = heat.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.full_like(total, float("nan")))


class GradCAMExplainer:
    """Predict and explain a batch in one pass; targets default to the predicted class."""

    def __init__(self, model: DualStreamClassifier):
        self.model = model

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 metadata: dict[str, torch.Tensor] | None = None,
                 targets: torch.Tensor | None = None,
                 autocast=None, temperature: float = 1.0,
                 offsets: torch.Tensor | None = None) -> Explanation:
        """Return probabilities and heatmaps at the input's resolution (see :meth:`explain`)."""
        return self.explain(image, mask, metadata, targets, autocast, temperature, offsets)[0]

    def explain(self, image: torch.Tensor, mask: torch.Tensor,
                metadata: dict[str, torch.Tensor] | None = None,
                targets: torch.Tensor | None = None, autocast=None,
                temperature: float = 1.0, offsets: torch.Tensor | None = None
                ) -> tuple[Explanation, torch.Tensor, torch.Tensor]:
        """Probabilities and heatmaps, plus the raw logits and image features of the same pass.

        ``autocast`` is an optional context manager factory (see ``raysky.models.runtime``)
        applied to the forward pass. The probabilities are ``softmax(logits / temperature)``,
        so a calibrated checkpoint's temperature applies here too. The default target is the
        predicted class: ``argmax(logits / temperature + offsets)`` with a calibration's
        decision ``offsets`` (``[C]``), else the plain argmax, so the heatmap explains the
        class the answer names. The raw logits and the features (``[B, D]``), both
        detached float32, are what :mod:`raysky.calibration.ood` scores. Gradients are enabled here even if the caller is
        under ``no_grad``, since Grad-CAM cannot work without them.
        """
        import contextlib

        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM needs autograd: call the explainer outside torch.inference_mode()")
        ctx = autocast or contextlib.nullcontext
        with torch.no_grad(), ctx():
            full_map, lesion = self.model.encode(image, mask)
        # Leaves cut here: the backward pass stops at the feature maps and never re-enters the
        # encoders, which is where almost all of the compute is. The shared lesion branch's
        # pooling weights are no feature map: its evidence flows back into the full map.
        full_leaf = full_map.detach().requires_grad_(True)
        maps = [full_leaf]
        if lesion is not None and not self.model.shares_encoder:
            lesion = lesion.detach().requires_grad_(True)
            maps.append(lesion)
        with torch.enable_grad():
            with ctx():
                logits, features = self.model.classify_with_features(full_leaf, lesion, metadata)
            logits = logits.float()
            if targets is None:
                decision = logits.detach() / temperature
                if offsets is not None:
                    decision = decision + offsets.to(decision.device, decision.dtype)
                targets = decision.argmax(dim=1)
            score = logits.gather(1, targets.to(logits.device).long().view(-1, 1)).sum()
            grads = torch.autograd.grad(score, maps)
        cams = [cam_from_gradients(m.detach(), g) for m, g in zip(maps, grads, strict=True)]
        heatmaps = combine_stream_cams(cams, tuple(image.shape[-2:]))
        probabilities = torch.softmax(logits.detach() / temperature, dim=1)
        return (Explanation(probabilities, heatmaps.detach()), logits.detach(),
                features.detach().float())
