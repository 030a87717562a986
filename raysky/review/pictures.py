"""The pictures of ``raysky report``: gallery thumbnails (the image with its mask outline,
the Grad-CAM overlay), JPEG ``data:`` URIs, and the ROC curves as plot data (drawn as inline
SVG by ``templates/plots.html.j2``)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import load_rgb
from raysky.review.svg import Curve, SquarePlot, UnitSquare

THUMBNAIL_SIZE = 240
"""Longest side of gallery pictures, in pixels."""

# Small fixed palette (Okabe-Ito), readable by colour-blind reviewers.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000")
# Anchors of a perceptually ordered blue-green-yellow-red ramp for heatmaps.
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_COLORS = np.array([[48, 18, 59], [40, 140, 250], [60, 220, 120], [250, 200, 40],
                         [190, 20, 10]], dtype=np.float64)

def heat_colors(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB ``float64`` colours along the heatmap ramp."""
    heat = np.clip(heat, 0.0, 1.0)
    return np.stack([np.interp(heat, _HEAT_STOPS, _HEAT_COLORS[:, c]) for c in range(3)], -1)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean boundary of a 0/1 mask: lesion pixels with a background 4-neighbour, thickened."""
    inside = mask.astype(bool)
    padded = np.pad(inside, 1, mode="edge")
    eroded = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
              & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = inside & ~eroded
    for _ in range(width - 1):
        padded = np.pad(edge, 1)
        edge = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
                | padded[1:-1, :-2] | padded[1:-1, 2:])
    return edge


def _thumbnail_size(width: int, height: int) -> tuple[int, int]:
    scale = THUMBNAIL_SIZE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def lesion_pictures(image: np.ndarray | None, mask: np.ndarray | None,
                    heatmap: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Two thumbnails: the image with the mask outlined, and the Grad-CAM overlay (or None).

    Any of the inputs may be missing (an image that can no longer be read, a row without a
    heatmap); a grey canvas of the mask's or heatmap's size stands in for a missing image.
    """
    shape = next(a.shape[:2] for a in (image, mask, heatmap) if a is not None)
    size = _thumbnail_size(shape[1], shape[0])
    if image is None:
        base = np.full((size[1], size[0], 3), 96.0)
    else:
        base = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float64)
    edge = None
    if mask is not None:
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST))
        edge = mask_outline(small > 127, width=2)
    outlined = base.copy()
    if edge is not None:
        outlined[edge] = (0, 255, 120)
    overlay = None
    if heatmap is not None:
        heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.BILINEAR))
        # Weak evidence stays transparent so the lesion underneath remains visible.
        alpha = (0.75 * np.sqrt(np.clip(heat, 0.0, 1.0)))[..., None]
        overlay = base * (1.0 - alpha) + heat_colors(heat) * alpha
        if edge is not None:
            overlay[edge] = (255, 255, 255)
    as_uint8 = [np.clip(np.rint(p), 0, 255).astype(np.uint8) if p is not None else None
                for p in (outlined, overlay)]
    return as_uint8[0], as_uint8[1]


def data_uri(picture: np.ndarray, quality: int = 85) -> str:
    """An RGB ``uint8`` array as a base64 JPEG ``data:`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_heatmap(data: bytes | None) -> np.ndarray | None:
    """A stored ``heatmap_png`` as floats in [0, 1]; None when absent or undecodable."""
    if data is None:
        return None
    try:
        gray = Image.open(io.BytesIO(bytes(data))).convert("L")
    except Exception:  # a damaged heatmap must not sink the page; the card shows without it
        return None
    return np.asarray(gray, dtype=np.float32) / 255.0


def load_picture(uri: str | None) -> np.ndarray | None:
    """The scored image as RGB ``uint8``; None when it is gone or no longer decodes."""
    if not uri:
        return None
    try:
        return np.asarray(load_rgb(uri))
    except (FileNotFoundError, OSError, ImageDecodeError):
        # The archive may have moved since scoring; the card then shows mask and heatmap only.
        return None


def roc_plot(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]],
             size: int = 340) -> SquarePlot:
    """ROC curves for the ``unit_square`` macro of ``templates/plots.html.j2``; ``curves``
    holds ``(name, fpr, tpr, auc)`` tuples. The malignant-versus-benign curve is drawn thicker:
    it is the one a referral decision rests on."""
    square = UnitSquare(size, legend_width=170)
    drawn = []
    for i, (name, fpr, tpr, auc) in enumerate(curves):
        width = 2.5 if name == "malignant" else 1.5
        drawn.append(Curve(square.polyline(fpr, tpr), PALETTE[i % len(PALETTE)], width,
                           f"{name}  AUC {auc:.3f}" if not math.isnan(auc) else name))
    return SquarePlot(square, "ROC curves", "false-positive rate", "sensitivity", tuple(drawn),
                      grid=True)
