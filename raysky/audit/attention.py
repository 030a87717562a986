"""Artefact attention: the share of a Grad-CAM heatmap's mass on an inserted artefact's pixels.

The artefact's mask is known exactly (:func:`raysky.audit.artefacts.add_artefact` returns the
pixels it changed), so this is a measurement, not an estimate: 0 means the explanation ignores
the artefact, and the artefact's own area fraction is what a heatmap spread evenly would give.
It is :func:`raysky.explain.gradcam.lesion_focus` with the artefact in place of the lesion.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def decode_heatmap(data: bytes) -> np.ndarray:
    """A results ``heatmap_png`` (8-bit grey) as float32 ``[H, W]`` in [0, 1]."""
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("L"), dtype=np.float32) / 255.0


def resize_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``heatmap`` bilinearly resized to ``shape`` (height, width); unchanged when it fits."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape == tuple(shape):
        return heatmap
    return np.asarray(Image.fromarray(heatmap, mode="F").resize((shape[1], shape[0]),
                                                                 Image.BILINEAR))


def artefact_attention(heatmap: np.ndarray, artefact_mask: np.ndarray) -> float:
    """Share of ``heatmap``'s mass on ``artefact_mask`` (nonzero pixels), in [0, 1].

    ``heatmap`` is ``[h, w]`` non-negative (a uint8 map is read as value/255, which leaves the
    share unchanged), resized to the mask's size when the sizes differ. NaN for an all-zero
    heatmap, which has no mass to share.
    """
    heat = np.asarray(heatmap)
    heat = heat.astype(np.float64) / 255.0 if heat.dtype == np.uint8 else heat.astype(np.float64)
    mask = np.asarray(artefact_mask) > 0
    heat = resize_heatmap(heat.astype(np.float32), mask.shape).astype(np.float64)
    heat = np.clip(heat, 0.0, None)
    total = float(heat.sum())
    if total <= 0.0:
        return math.nan
    return float(heat[mask].sum() / total)
