"""Paired image + mask augmentation for dermoscopy, and the deterministic eval resize.

Dermoscopy has no canonical orientation, the lesion sits anywhere in the field, and colour
varies with the dermoscope and the lighting, so training uses any-angle rotation, flips,
random-resized crops and colour jitter. Every geometric step is drawn once and applied to the
image and to its mask alike (bilinear for the image, nearest for the mask), so a segmenter
target always lines up with its input; colour jitter touches only the image.

Randomness comes from an explicit :class:`numpy.random.Generator`. Ray Data runs this code in
many worker processes, and torch's global generator starts from the same seed in each of them,
so relying on it would give every process the same "random" sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentations; ``AugmentConfig.none()`` turns them all off."""

    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (w / h)
    rotation: float = 180.0  # degrees either way
    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # fraction of the hue circle either way

    @classmethod
    def none(cls) -> AugmentConfig:
        """A config that leaves images unchanged apart from the final resize."""
        return cls(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0.0, hflip=0.0, vflip=0.0,
                   brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _crop_box(width: int, height: int, config: AugmentConfig,
              rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A random-resized-crop box (torchvision's recipe), falling back to the whole image."""
    area = width * height
    log_ratio = (math.log(config.ratio[0]), math.log(config.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*config.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    return (0.0, 0.0, float(width), float(height))


def _jitter_colour(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    # Random order, as torchvision does, so no single adjustment always dominates.
    for step in rng.permutation(4):
        if step == 0 and config.brightness:
            image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-1, 1) * config.brightness)
        elif step == 1 and config.contrast:
            image = ImageEnhance.Contrast(image).enhance(1 + rng.uniform(-1, 1) * config.contrast)
        elif step == 2 and config.saturation:
            image = ImageEnhance.Color(image).enhance(1 + rng.uniform(-1, 1) * config.saturation)
        elif step == 3 and config.hue:
            hsv = np.array(image.convert("HSV"))
            shift = int(round(rng.uniform(-1, 1) * config.hue * 255))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            image = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return image


def augment_pair(image: Image.Image, mask: np.ndarray | None, size: int, config: AugmentConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment an RGB image and its 0/1 mask with one shared geometry; return both at ``size``.

    Returns ``(image uint8 [size, size, 3], mask uint8 [size, size] of 0/1)``. A missing mask
    comes back as zeros (the classifier treats an empty mask as "no lesion found" and looks at
    the whole image).
    """
    mask_image = Image.fromarray((mask > 0).astype(np.uint8) * 255) if mask is not None else None
    if mask_image is not None and mask_image.size != image.size:
        mask_image = mask_image.resize(image.size, Image.NEAREST)
    if config.rotation:
        angle = float(rng.uniform(-config.rotation, config.rotation))
        image = image.rotate(angle, resample=Image.BILINEAR)
        if mask_image is not None:
            mask_image = mask_image.rotate(angle, resample=Image.NEAREST)
    box = _crop_box(image.width, image.height, config, rng)
    image = image.resize((size, size), Image.BILINEAR, box=box)
    if mask_image is not None:
        mask_image = mask_image.resize((size, size), Image.NEAREST, box=box)
    flips = [Image.FLIP_LEFT_RIGHT] if rng.random() < config.hflip else []
    flips += [Image.FLIP_TOP_BOTTOM] if rng.random() < config.vflip else []
    for flip in flips:
        image = image.transpose(flip)
        if mask_image is not None:
            mask_image = mask_image.transpose(flip)
    image = _jitter_colour(image, config, rng)
    out_mask = (np.asarray(mask_image) > 127).astype(np.uint8) if mask_image is not None else \
        np.zeros((size, size), dtype=np.uint8)
    return np.asarray(image, dtype=np.uint8), out_mask


def resize_pair(image: Image.Image, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation transform: squash to ``size`` x ``size`` (as inference does), no randomness."""
    return augment_pair(image, mask, size, AugmentConfig.none(), np.random.default_rng(0))
