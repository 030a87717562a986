"""Seeded, procedurally drawn dermoscopic artefacts, pasted only outside the lesion.

Rulers, surgical-marker ink, air bubbles, hairs and the dark corners of a dermatoscope's
aperture are the artefacts that models learn as shortcuts (Katsch, Rinner & Tschandl, Dermatol
Pract Concept 2022). Each kind is drawn as a colour layer with an alpha (PIL ImageDraw at twice
the resolution, averaged down with premultiplied alpha, so strokes are anti-aliased) and
composited over the image. The lesion mask, dilated by ``margin_px`` (2% of the shorter side,
at least 2 pixels) for its soft border, is then cleared from the alpha, so no lesion pixel can
change; placement also prefers skin far from the lesion, so rulers, dots and bubbles sit
whole on the skin rather than cut at the lesion. The returned artefact mask is exactly the
pixels whose value changed, and the same generator state gives the same image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from raysky.data.skin_tone import fit_mask

TRAINING_KINDS: tuple[str, ...] = ("ruler", "ink", "bubbles", "hair", "vignette")
"""The kinds training pastes as augmentation (:mod:`raysky.train.augment`)."""
HELD_OUT_KINDS: tuple[str, ...] = ("patch", "arrow", "streak")
"""Kinds training never sees, in colours, shapes and places its own kinds do not have: a
colour-calibration chart (the patches Nauta et al. 2022 found models leaning on), green or black
marker arrows pointing at the lesion, and glare streaks of gel. A model that learnt to ignore
only the drawn kinds it trained on still flips on these."""
ARTEFACT_KINDS: tuple[str, ...] = TRAINING_KINDS + HELD_OUT_KINDS
_MAX_SUPERSAMPLED_SIDE = 2048


def parse_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """Artefact kinds from ``"ruler,ink"`` or a sequence, deduplicated in order; an unknown
    kind is a ``ValueError`` listing the kinds there are."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    items = [k.strip().lower() for k in items if k.strip()]
    unknown = [k for k in items if k not in ARTEFACT_KINDS]
    if unknown or not items:
        raise ValueError(f"unknown artefact type {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"the types are {', '.join(ARTEFACT_KINDS)}")
    return tuple(dict.fromkeys(items))


def margin_px(shape: tuple[int, ...]) -> int:
    """How far around the lesion mask artefacts keep off (its border is soft)."""
    return max(2, round(0.02 * min(shape[:2])))


def protected_region(lesion_mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The lesion mask (nonzero pixels) dilated by :func:`margin_px`, as booleans at ``shape``."""
    from scipy import ndimage

    lesion = fit_mask(lesion_mask, tuple(shape[:2]))
    if not lesion.any():
        return lesion
    return ndimage.distance_transform_edt(~lesion) <= margin_px(shape)


class _Canvas:
    """A transparent RGBA layer drawn at ``scale`` times the image size, read back at 1x."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.scale = 2 if max(height, width) <= _MAX_SUPERSAMPLED_SIDE else 1
        self.image = Image.new("RGBA", (width * self.scale, height * self.scale), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def xy(self, points) -> list[tuple[float, float]]:
        return [(float(x) * self.scale, float(y) * self.scale) for x, y in points]

    def box(self, cx: float, cy: float, rx: float, ry: float | None = None) -> list[float]:
        ry = rx if ry is None else ry
        s = self.scale
        return [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s]

    def width_px(self, width: float) -> int:
        return max(1, round(width * self.scale))

    def layer(self) -> tuple[np.ndarray, np.ndarray]:
        """Colour ``[H, W, 3]`` (0-255 floats) and alpha ``[H, W]`` (0-1) at the image's size."""
        data = np.asarray(self.image, dtype=np.float64)
        s, h, w = self.scale, self.height, self.width
        alpha = data[..., 3] / 255.0
        premultiplied = data[..., :3] * alpha[..., None]
        alpha = alpha.reshape(h, s, w, s).mean(axis=(1, 3))
        premultiplied = premultiplied.reshape(h, s, w, s, 3).mean(axis=(1, 3))
        colour = premultiplied / np.maximum(alpha, 1e-12)[..., None]
        return colour, alpha


def _rgba(colour, alpha: float) -> tuple[int, int, int, int]:
    return (*(int(np.clip(round(c), 0, 255)) for c in colour), int(round(255 * alpha)))


def _free_point(distance: np.ndarray, clearance: float, rng: np.random.Generator
                ) -> tuple[float, float] | None:
    """A random (x, y) at least ``clearance`` from the lesion, or the farthest point there is
    when none is that far (the clearing of the alpha still keeps the lesion untouched)."""
    candidates = np.argwhere(distance >= clearance)
    if not len(candidates):
        candidates = np.argwhere(distance >= distance.max())
    y, x = candidates[rng.integers(len(candidates))]
    return float(x) + rng.uniform(-0.5, 0.5), float(y) + rng.uniform(-0.5, 0.5)


def _ruler(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator) -> None:
    h, w = canvas.height, canvas.width
    side = min(h, w)
    band = max(2, round(0.12 * side))
    # The ruler lies along the edge whose band of skin is farthest from the lesion.
    edges = {"top": distance[:band].mean(), "bottom": distance[-band:].mean(),
             "left": distance[:, :band].mean(), "right": distance[:, -band:].mean()}
    edge = max(edges, key=lambda k: (edges[k], k))
    width = side * rng.uniform(0.07, 0.11)
    inset = width / 2 + side * rng.uniform(-0.02, 0.03)
    tilt = math.radians(rng.uniform(-6, 6))
    horizontal = edge in ("top", "bottom")
    length = (w if horizontal else h) * 1.3
    centre = {"top": (w / 2, inset), "bottom": (w / 2, h - inset),
              "left": (inset, h / 2), "right": (w - inset, h / 2)}[edge]
    d = np.array([math.cos(tilt), math.sin(tilt)]) if horizontal else \
        np.array([math.sin(tilt), math.cos(tilt)])
    n = np.array([-d[1], d[0]])
    if np.dot(n, np.array([w / 2, h / 2]) - np.array(centre)) < 0:
        n = -n  # the normal points into the image; ticks start at the outer edge
    c = np.array(centre)
    a, b = c - d * length / 2, c + d * length / 2
    outer, inner = -n * width / 2, n * width / 2
    opaque = rng.random() < 0.7
    body = (rng.uniform(225, 245), rng.uniform(225, 245), rng.uniform(210, 235))
    canvas.draw.polygon(canvas.xy([a + outer, b + outer, b + inner, a + inner]),
                        fill=_rgba(body, rng.uniform(0.75, 0.92) if opaque else 0.35))
    ink = _rgba((rng.uniform(10, 40),) * 3, 1.0)
    spacing = side * rng.uniform(0.025, 0.04)
    stroke = canvas.width_px(max(0.6, side * 0.004))
    start = rng.uniform(0, spacing)
    for i in range(int(length / spacing) + 1):
        t = start + i * spacing
        tick = width * (0.65 if i % 10 == 0 else 0.45 if i % 5 == 0 else 0.28)
        base = a + d * t + outer + n * width * 0.08
        canvas.draw.line(canvas.xy([base, base + n * tick]), fill=ink, width=stroke)


def _ink(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator,
         lesion: np.ndarray) -> None:
    side = min(canvas.height, canvas.width)
    hue = ((95, 45, 140), (35, 65, 170))[int(rng.integers(2))]  # marker purple or blue
    colour = _rgba(np.array(hue) + rng.uniform(-15, 15, 3), rng.uniform(0.55, 0.85))
    stroke = canvas.width_px(max(1.0, side * rng.uniform(0.008, 0.015)))
    ys, xs = np.nonzero(lesion)
    if len(xs) and rng.random() < 0.7:
        # Surgeons circle the lesion: a hand-drawn ring just clear of its farthest point.
        cx, cy = xs.mean(), ys.mean()
        radius = math.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).max()) + margin_px(lesion.shape) \
            + side * rng.uniform(0.03, 0.08)
        phase, wobble = rng.uniform(0, 2 * math.pi), rng.uniform(0.02, 0.06)
        theta = np.linspace(0, 2 * math.pi, 97)
        r = radius * (1 + wobble * np.sin(2 * theta + phase))
        canvas.draw.line(canvas.xy(np.c_[cx + r * np.cos(theta), cy + r * np.sin(theta)]),
                         fill=colour, width=stroke, joint="curve")
    for _ in range(int(rng.integers(2, 7))):
        radius = side * rng.uniform(0.008, 0.025)
        x, y = _free_point(distance, radius + 2, rng)
        canvas.draw.ellipse(canvas.box(x, y, radius, radius * rng.uniform(0.7, 1.0)), fill=colour)
    if rng.random() < 0.4:
        radius = side * rng.uniform(0.03, 0.06)
        x, y = _free_point(distance, radius + 2, rng)
        canvas.draw.ellipse(canvas.box(x, y, radius), outline=colour, width=stroke)


def _bubbles(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator) -> None:
    side = min(canvas.height, canvas.width)
    for _ in range(int(rng.integers(2, 9))):
        radius = side * rng.uniform(0.02, 0.08)
        x, y = _free_point(distance, radius + 2, rng)
        rim = max(0.8, radius * rng.uniform(0.08, 0.15))
        canvas.draw.ellipse(canvas.box(x, y, radius + rim), fill=_rgba((70, 70, 70), 0.35))
        canvas.draw.ellipse(canvas.box(x, y, radius), fill=_rgba((250, 250, 250), rng.uniform(0.06, 0.14)),
                            outline=_rgba((252, 252, 252), rng.uniform(0.7, 0.9)),
                            width=canvas.width_px(rim))
        glint = radius * rng.uniform(0.1, 0.2)
        canvas.draw.ellipse(canvas.box(x - 0.45 * radius, y - 0.45 * radius, glint),
                            fill=_rgba((255, 255, 255), 0.9))


def _hair(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator) -> None:
    h, w = canvas.height, canvas.width
    side = min(h, w)
    t = np.linspace(0, 1, 48)[:, None]
    for _ in range(int(rng.integers(5, 16))):
        # Hairs grow from the skin: each starts on it, and where one crosses the lesion the
        # clearing of the alpha cuts it there.
        start = np.array(_free_point(distance, 1.0, rng))
        angle, length = rng.uniform(0, 2 * math.pi), side * rng.uniform(0.3, 1.0)
        direction = np.array([math.cos(angle), math.sin(angle)])
        end = start + direction * length
        bend = np.array([-direction[1], direction[0]]) * length * rng.uniform(-0.3, 0.3)
        control = (start + end) / 2 + bend
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end
        colour = (rng.uniform(10, 45), rng.uniform(5, 30), rng.uniform(0, 25))
        canvas.draw.line(canvas.xy(curve), fill=_rgba(colour, rng.uniform(0.8, 1.0)),
                         width=canvas.width_px(rng.uniform(0.6, max(1.0, side * 0.01))),
                         joint="curve")


def _patch(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator) -> None:
    side = min(canvas.height, canvas.width)
    cell = side * rng.uniform(0.05, 0.08)
    cols, rows = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    border = cell * 0.15
    radius = math.hypot(cols, rows) * cell / 2 + border
    x, y = _free_point(distance, radius + 2, rng)
    x0, y0 = x - cols * cell / 2, y - rows * cell / 2
    canvas.draw.rectangle(canvas.box(x, y, cols * cell / 2 + border, rows * cell / 2 + border),
                          fill=_rgba((245, 245, 240), 1.0))
    palette = ((200, 30, 40), (30, 150, 60), (30, 60, 190), (235, 200, 30), (120, 120, 120),
               (20, 20, 20))
    for i in range(cols):
        for j in range(rows):
            colour = palette[int(rng.integers(len(palette)))]
            canvas.draw.rectangle(canvas.box(x0 + (i + 0.5) * cell, y0 + (j + 0.5) * cell,
                                             cell * 0.45), fill=_rgba(colour, 1.0))


def _arrow(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator,
           lesion: np.ndarray) -> None:
    side = min(canvas.height, canvas.width)
    colour = _rgba(((20, 140, 60), (15, 15, 15))[int(rng.integers(2))], rng.uniform(0.8, 1.0))
    stroke = canvas.width_px(max(1.0, side * rng.uniform(0.01, 0.018)))
    ys, xs = np.nonzero(lesion)
    target = (np.array([xs.mean(), ys.mean()]) if len(xs)
              else np.array([canvas.width / 2, canvas.height / 2]))
    for _ in range(int(rng.integers(1, 3))):
        length = side * rng.uniform(0.15, 0.3)
        start = np.array(_free_point(distance, length * 0.6, rng))
        direction = target - start
        direction = direction / max(np.linalg.norm(direction), 1e-6)
        tip = start + direction * length
        normal = np.array([-direction[1], direction[0]])
        head = side * 0.05
        canvas.draw.line(canvas.xy([start, tip]), fill=colour, width=stroke)
        for sign in (-1, 1):
            canvas.draw.line(canvas.xy([tip, tip - direction * head + sign * normal * head * 0.6]),
                             fill=colour, width=stroke)


def _streak(canvas: _Canvas, distance: np.ndarray, rng: np.random.Generator) -> None:
    side = min(canvas.height, canvas.width)
    for _ in range(int(rng.integers(1, 4))):
        length, thick = side * rng.uniform(0.2, 0.45), side * rng.uniform(0.015, 0.04)
        x, y = _free_point(distance, thick + 2, rng)
        angle = rng.uniform(0, math.pi)
        d = np.array([math.cos(angle), math.sin(angle)]) * length / 2
        canvas.draw.line(canvas.xy([(x - d[0], y - d[1]), (x + d[0], y + d[1])]),
                         fill=_rgba((255, 255, 250), rng.uniform(0.5, 0.8)),
                         width=canvas.width_px(thick))


def _vignette(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The aperture's dark corners: black beyond a circle, with a soft edge."""
    half_diagonal = math.hypot(height, width) / 2
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    radius = half_diagonal * rng.uniform(0.78, 0.93)
    soft = half_diagonal * rng.uniform(0.03, 0.08)
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.clip((np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) - radius) / soft, 0.0, 1.0)
    alpha = x * x * (3 - 2 * x)
    colour = np.broadcast_to(np.full(3, rng.uniform(0, 12)), (height, width, 3))
    return colour, alpha


def _layer(kind: str, shape: tuple[int, int], protected: np.ndarray, lesion: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    if kind == "vignette":
        return _vignette(*shape, rng)
    distance = (ndimage.distance_transform_edt(~protected) if protected.any()
                else np.full(shape, float(max(shape))))
    canvas = _Canvas(*shape)
    draw: dict[str, Callable] = {"ruler": _ruler, "bubbles": _bubbles, "hair": _hair,
                                 "ink": lambda c, d, r: _ink(c, d, r, lesion),
                                 "patch": _patch, "streak": _streak,
                                 "arrow": lambda c, d, r: _arrow(c, d, r, lesion)}
    draw[kind](canvas, distance, rng)
    return canvas.layer()


def artefact_layer(kind: str, shape: tuple[int, int], rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One artefact of ``kind`` drawn on a lesion-free canvas of ``shape``: its colour
    ``[H, W, 3]`` (0-255 floats) and alpha ``[H, W]`` (0-1).

    Training pastes these over images outside each lesion (:mod:`raysky.train.augment`), so a
    bank drawn once serves every image; :func:`add_artefact` draws one for a given lesion.
    """
    (kind,) = parse_kinds([kind])
    clear = np.zeros(shape, dtype=bool)
    return _layer(kind, shape, clear, clear, rng)


def add_artefact(rgb: np.ndarray, lesion_mask: np.ndarray, kind: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste one artefact of ``kind`` onto ``rgb`` (uint8 ``[H, W, 3]``) outside the lesion.

    ``lesion_mask`` is ``[H, W]``, nonzero on the lesion (resized when its size differs).
    Returns the altered uint8 image and the boolean artefact mask: exactly the pixels that
    changed, none of them within :func:`margin_px` of the lesion. An unknown kind is a
    ``ValueError`` listing the kinds.
    """
    (kind,) = parse_kinds([kind])
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {rgb.shape}")
    shape = rgb.shape[:2]
    lesion = fit_mask(lesion_mask, shape)
    protected = protected_region(lesion, shape)
    colour, alpha = _layer(kind, shape, protected, lesion, rng)
    alpha = np.where(protected, 0.0, alpha)[..., None]
    altered = np.rint(rgb * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    changed = (altered != rgb).any(axis=2)
    return altered, changed
