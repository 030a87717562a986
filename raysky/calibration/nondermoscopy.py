"""Images that are not dermoscopy, for measuring the out-of-distribution gate offline.

An archive handed to ``raysky score`` holds, besides dermoscopy, whatever else was filed next
to it: photographs, scanned letters, screenshots of the viewer, charts, and clinical
(macroscopic) photos of skin taken without a dermatoscope. The gate
(:mod:`raysky.calibration.gate`) must flag those, so its benchmark and tests need them without
a download:

* :func:`bundled_photos`: the real photographs and scans that installed packages ship
  (scikit-image's data set, scikit-learn's two sample photos, matplotlib's portrait);
* :func:`synthetic_images`: seeded renders of four kinds (:data:`SYNTHETIC_KINDS`): text
  pages, application screenshots, charts, and clinical-looking skin photos (a patch of body
  skin with shading, pores, a few small moles and a room behind it, at arm's length rather
  than through a dermatoscope's lens).

Every image is an RGB uint8 array, named so a figure per source can be reported.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SYNTHETIC_KINDS: tuple[str, ...] = ("text", "screenshot", "chart", "clinical_skin")
_MIN_SIDE = 64


def bundled_photos() -> list[tuple[str, np.ndarray]]:
    """``(name, rgb)`` for every single-frame photo or scan bundled with installed packages.

    scikit-image (a test dependency) is required; scikit-learn's and matplotlib's sample
    photos are added where those packages are installed. Images smaller than 64 px are left
    out (icons say nothing about photos).
    """
    import skimage

    paths = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png"))
                   + glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.jpg")))
    for module, parts in (("sklearn", ("datasets", "images", "*.jpg")),
                          ("matplotlib", ("mpl-data", "sample_data", "*.jpg"))):
        try:
            package = __import__(module)
        except ImportError:
            continue
        paths += sorted(glob.glob(os.path.join(os.path.dirname(package.__file__), *parts)))
    photos = []
    for path in paths:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1 or min(image.size) < _MIN_SIDE:
                continue
            photos.append((f"photo:{os.path.basename(path)}", np.asarray(image.convert("RGB"))))
    return photos


def synthetic_images(per_kind: int = 10, seed: int = 0,
                     kinds: tuple[str, ...] = SYNTHETIC_KINDS) -> list[tuple[str, np.ndarray]]:
    """``per_kind`` seeded renders of each of ``kinds`` as ``(name, rgb)``; same seed, same images."""
    makers = {"text": _text_page, "screenshot": _screenshot, "chart": _chart,
              "clinical_skin": _clinical_skin}
    unknown = [k for k in kinds if k not in makers]
    if unknown:
        raise ValueError(f"unknown synthetic kind(s) {unknown}; the kinds are "
                         f"{', '.join(SYNTHETIC_KINDS)}")
    out = []
    for kind in kinds:
        for i in range(per_kind):
            rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), i])
            out.append((f"{kind}:{i}", np.asarray(makers[kind](rng).convert("RGB"))))
    return out


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return (int(rng.choice([320, 480, 640, 800])), int(rng.choice([240, 360, 480, 600])))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _words(rng: np.random.Generator, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(list(letters), int(rng.integers(2, 10)))) for _ in range(n))


def _text_page(rng: np.random.Generator) -> Image.Image:
    """A page of text (a letter, a report, a scan): dark glyphs on paper-coloured ground."""
    width, height = _size(rng)
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(11, 28))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    y = int(rng.integers(5, 30))
    while y < height - size:
        draw.text((int(rng.integers(5, 30)), y), _words(rng, 12), fill=ink, font=_font(size))
        y += int(size * rng.uniform(1.2, 1.8))
    if rng.random() < 0.5:  # a scan: a little blur and grain
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 1))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def _screenshot(rng: np.random.Generator) -> Image.Image:
    """An application window: title bar, side panel, buttons, text rows and an image well."""
    width, height = _size(rng)
    dark = rng.random() < 0.4
    ground = (40, 42, 48) if dark else (246, 246, 248)
    text = (220, 220, 220) if dark else (30, 30, 30)
    image = Image.new("RGB", (width, height), ground)
    draw = ImageDraw.Draw(image)
    accent = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.rectangle((0, 0, width, 28), fill=accent)
    draw.text((10, 7), _words(rng, 3), fill=(255, 255, 255), font=_font(14))
    panel = int(width * rng.uniform(0.18, 0.3))
    draw.rectangle((0, 28, panel, height), fill=(60, 63, 70) if dark else (228, 230, 235))
    for row in range(36, height - 20, 24):
        draw.text((8, row), _words(rng, 2), fill=text, font=_font(13))
    x0, y0 = panel + 12, 40
    well = (x0, y0, width - 12, y0 + int((height - y0) * 0.5))
    draw.rectangle(well, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), outline=text)
    for row in range(well[3] + 14, height - 30, 22):
        draw.text((x0, row), _words(rng, 6), fill=text, font=_font(13))
    for b in range(int(rng.integers(1, 4))):
        bx = width - 12 - (b + 1) * 90
        draw.rounded_rectangle((bx, height - 30, bx + 80, height - 8), 5, fill=accent)
    return image


def _chart(rng: np.random.Generator) -> Image.Image:
    """A bar or line chart with axes, grid and labels, as exported from a spreadsheet."""
    width, height = _size(rng)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, bottom = 50, height - 40
    for frac in np.linspace(0, 1, 6):
        y = int(bottom - frac * (bottom - 20))
        draw.line((left, y, width - 10, y), fill=(220, 220, 220))
        draw.text((5, y - 6), f"{frac * 100:.0f}", fill=(60, 60, 60), font=_font(11))
    draw.line((left, 20, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, width - 10, bottom), fill=(0, 0, 0), width=2)
    n = int(rng.integers(4, 14))
    values = rng.uniform(0.1, 1.0, n)
    step = (width - 10 - left) / n
    colour = tuple(int(v) for v in rng.integers(0, 200, 3))
    if rng.random() < 0.5:
        for i, v in enumerate(values):
            x = left + i * step
            draw.rectangle((x + step * 0.15, bottom - v * (bottom - 20), x + step * 0.85, bottom),
                           fill=colour)
    else:
        points = [(left + (i + 0.5) * step, bottom - v * (bottom - 20)) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
    draw.text((width // 3, 4), _words(rng, 3), fill=(0, 0, 0), font=_font(14))
    return image


def _clinical_skin(rng: np.random.Generator) -> Image.Image:
    """A macroscopic photo of body skin: a shaded limb or back against a room, a few small moles.

    What sets it apart from dermoscopy is the view, not the skin: the lesions are small in the
    frame, the skin curves away under room light, and background (wall, clothing, couch)
    fills part of the picture, with no dermatoscope aperture and no contact-plate glare.
    """
    width, height = _size(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Skin tone from very light to brown: CIELAB-ish sampled as RGB.
    lightness = rng.uniform(0.45, 1.0)
    skin = np.array([235, 190, 160], np.float32) * lightness + rng.normal(0, 8, 3)
    wall = rng.integers(30, 230, 3).astype(np.float32)
    image = np.broadcast_to(wall, (height, width, 3)).copy()
    image += (yy / height)[..., None] * rng.uniform(-40, 40)  # room light falls off
    # The body part: a wide ellipse or band crossing the frame, shaded towards its edges.
    cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
    ax, ay = width * rng.uniform(0.45, 0.9), height * rng.uniform(0.35, 0.7)
    angle = rng.uniform(0, math.pi)
    u = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / ax
    v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / ay
    r = np.sqrt(u ** 2 + v ** 2)
    body = r < 1.0
    shade = np.clip(1.0 - 0.45 * r ** 2, 0.4, 1.0)[..., None]
    pores = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    image[body] = (skin * shade + pores)[body]
    for _ in range(int(rng.integers(1, 6))):  # moles: small brown spots, a few pixels across
        inside = np.argwhere(body)
        if not len(inside):
            break
        my, mx = inside[int(rng.integers(len(inside)))]
        radius = rng.uniform(2, 0.03 * min(width, height) + 3)
        spot = np.exp(-(((xx - mx) ** 2 + (yy - my) ** 2) / (2 * radius ** 2)))[..., None]
        brown = np.array([90, 55, 40], np.float32) * rng.uniform(0.5, 1.2)
        image = image * (1 - 0.85 * spot) + brown * 0.85 * spot
    blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return blurred.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
