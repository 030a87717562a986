"""Batched training augmentation on uint8 tensors, in the training worker.

Images are decoded once into a uint8 cache (:mod:`raysky.train.datasets`), so no epoch decodes
a JPEG; every epoch augments the cached pixels here, a whole batch at a time, with torch ops:

* geometry: one affine map per image (any-angle rotation, a random-resized crop or, with
  ``AugmentConfig.lesion_zoom``, a crop round the lesion's box, flips and the transpose),
  sampled with ``grid_sample`` for the image and, nearest, for its mask, so a segmenter target
  always lines up with its input;
* artefacts: with probability ``AugmentConfig.artefacts`` one layer from a bank drawn by
  :mod:`raysky.audit.artefacts` (rulers, ink, bubbles, hairs, dark corners), composited over
  the image outside the dilated lesion mask, before the geometry, as a camera would record it;
* colour: brightness, contrast, saturation and hue jitter on the image only;
* twins (:func:`augment_pairs`): where the recipe asks for artefact consistency, an artefacted
  image's clean twin under the same geometry and colour, for the classifier's consistency loss.

Randomness comes from an explicit :class:`torch.Generator`, seeded per run, worker and epoch,
so a rerun with the same seed draws the same stream of augmentations. Which image meets which
draw follows the order the images arrive in, which the same seed also fixes
(:func:`raysky.train.datasets.build_dataset`) as long as one worker trains: several workers
take blocks as they ask for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raysky.models.config import AugmentConfig

ARTEFACT_BANK_SIZE = 24
"""Layers drawn per artefact kind; each use also flips and transposes its layer at random."""


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _chance(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _crop_boxes(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random-resized crops as ``[n, 4]`` (centre x, centre y, half width, half height) in the
    [-1, 1] coordinates of ``grid_sample``; area and aspect as torchvision draws them."""
    area = _uniform(*config.scale, n, generator)
    log_ratio = _uniform(math.log(config.ratio[0]), math.log(config.ratio[1]), n, generator)
    aspect = torch.exp(log_ratio)
    half_w = torch.sqrt(area * aspect).clamp(max=1.0)
    half_h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - half_w) * _uniform(-1, 1, n, generator)
    cy = (1 - half_h) * _uniform(-1, 1, n, generator)
    return torch.stack([cx, cy, half_w, half_h], dim=1)


def _lesion_boxes(masks: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Square boxes round each mask's lesion with a random margin, as :func:`_crop_boxes`;
    and which images have a lesion to zoom on."""
    n, height, width = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    has = rows.any(dim=1)
    ys = torch.arange(height, dtype=torch.float64)
    xs = torch.arange(width, dtype=torch.float64)
    big = float(max(height, width))
    y0 = torch.where(rows, ys, big).amin(1)
    y1 = torch.where(rows, ys, -1.0).amax(1) + 1
    x0 = torch.where(cols, xs, big).amin(1)
    x1 = torch.where(cols, xs, -1.0).amax(1) + 1
    side = torch.maximum((x1 - x0) / width, (y1 - y0) / height)
    # [-1, 1] spans the image twice over, so a box's half side is its share of the image.
    half = (side * (1 + 2 * _uniform(*config.zoom_margin, n, generator))).clamp(0.1, 1.0)
    cx = (x0 + x1) / width - 1
    cy = (y0 + y1) / height - 1
    return torch.stack([cx, cy, half, half], dim=1), has


def _affine(n: int, boxes: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator) -> torch.Tensor:
    """``[n, 2, 3]`` maps from output to input coordinates: crop, rotation, flips, transpose."""
    angle = _uniform(-config.rotation, config.rotation, n, generator) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    hflip = torch.where(_chance(config.hflip, n, generator), -1.0, 1.0).double()
    vflip = torch.where(_chance(config.vflip, n, generator), -1.0, 1.0).double()
    transpose = _chance(config.transpose, n, generator)
    # Output point p -> (flip, transpose) -> scale to the box -> rotate -> shift to its centre.
    base = torch.zeros(n, 2, 2, dtype=torch.float64)
    base[:, 0, 0], base[:, 1, 1] = hflip, vflip
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    base = torch.where(transpose[:, None, None], swap @ base, base)
    scale = torch.diag_embed(boxes[:, 2:])
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    linear = rotation @ scale @ base
    return torch.cat([linear, boxes[:, :2, None]], dim=2).float()


_GREY = torch.tensor([0.299, 0.587, 0.114])
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_matrices(n: int, config: AugmentConfig, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast, saturation and hue jitter as one affine colour map per image.

    Each of the four is linear in RGB: brightness scales, contrast pulls towards the image's
    mean grey, saturation towards each pixel's grey, and a hue turn rotates the YIQ chroma
    plane (close to an HSV hue shift at the small angles jitter uses). Composed, they are
    ``x -> M x + c * mean_grey`` with ``M`` ``[n, 3, 3]`` and ``c`` ``[n]``, applied to a batch
    in one matrix product instead of four passes over the pixels.
    """

    def factor(amount: float) -> torch.Tensor:
        return (1 + _uniform(-amount, amount, n, generator)).float()

    brightness, contrast = factor(config.brightness), factor(config.contrast)
    saturation = factor(config.saturation)
    turns = _uniform(-config.hue, config.hue, n, generator).float() * 2 * math.pi
    eye = torch.eye(3).expand(n, 3, 3)
    to_grey = torch.ones(3, 1) @ _GREY[None]  # every channel becomes the pixel's grey
    saturate = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * to_grey
    rotation = eye.clone()
    rotation[:, 1, 1], rotation[:, 1, 2] = torch.cos(turns), -torch.sin(turns)
    rotation[:, 2, 1], rotation[:, 2, 2] = torch.sin(turns), torch.cos(turns)
    hue = torch.linalg.inv(_TO_YIQ) @ rotation @ _TO_YIQ
    matrix = hue @ saturate * (contrast * brightness)[:, None, None]
    # The contrast's pull is towards a grey, which saturation and hue leave unchanged.
    return matrix, (1 - contrast) * brightness


def _jitter(images: torch.Tensor, matrix: torch.Tensor, pull: torch.Tensor,
            mean_grey: torch.Tensor) -> torch.Tensor:
    """Colour jitter of ``[B, 3, H, W]`` in [0, 1] by maps :func:`colour_matrices` drew, each
    image's contrast pulling towards its ``mean_grey``."""
    n = images.shape[0]
    flat = torch.baddbmm((pull * mean_grey)[:, None, None].expand(n, 3, 1), matrix,
                         images.flatten(2))
    return flat.view_as(images).clamp_(0.0, 1.0)


@dataclass
class ArtefactBank:
    """Artefact layers (colour ``[K, 3, S, S]`` in [0, 1], alpha ``[K, 1, S, S]``) drawn once
    by :func:`raysky.audit.artefacts.artefact_layer` on a lesion-free canvas, and their kinds:
    the training kinds only, so robustness can also be measured on kinds never trained on
    (:data:`raysky.audit.artefacts.HELD_OUT_KINDS`)."""

    colour: torch.Tensor
    alpha: torch.Tensor
    kinds: tuple[str, ...]

    @classmethod
    def draw(cls, size: int, seed: int, per_kind: int = ARTEFACT_BANK_SIZE) -> ArtefactBank:
        """``per_kind`` layers of every artefact kind at ``size`` x ``size``."""
        from raysky.audit.artefacts import TRAINING_KINDS, artefact_layer

        rng = np.random.default_rng([seed, 0xA47E])
        colours, alphas, kinds = [], [], []
        for kind in TRAINING_KINDS:
            for _ in range(per_kind):
                colour, alpha = artefact_layer(kind, (size, size), rng)
                colours.append(torch.from_numpy(np.ascontiguousarray(colour, np.float32) / 255.0))
                alphas.append(torch.from_numpy(np.ascontiguousarray(alpha, np.float32)))
                kinds.append(kind)
        return cls(torch.stack(colours).permute(0, 3, 1, 2).contiguous(),
                   torch.stack(alphas)[:, None].contiguous(), tuple(kinds))

    def paste(self, images: torch.Tensor, masks: torch.Tensor, chance: float,
              generator: torch.Generator, margin: int = 2) -> torch.Tensor:
        """Composite a random layer over each image with probability ``chance``, outside its
        lesion mask dilated by ``margin`` pixels (at the images' size)."""
        return self.paste_indexed(images, masks, chance, generator, margin)[0]

    def paste_indexed(self, images: torch.Tensor, masks: torch.Tensor, chance: float,
                      generator: torch.Generator, margin: int = 2
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`paste`, and the indices of the images that got a layer."""
        n, _, height, width = images.shape
        chosen = torch.nonzero(_chance(chance, n, generator)).flatten()
        if not len(chosen):
            return images, chosen
        pick = torch.randint(len(self.kinds), (len(chosen),), generator=generator)
        colour, alpha = self.colour[pick], self.alpha[pick]
        if colour.shape[-2:] != (height, width):
            colour = F.interpolate(colour, size=(height, width), mode="bilinear", align_corners=False)
            alpha = F.interpolate(alpha, size=(height, width), mode="bilinear", align_corners=False)
        # Flips and the transpose of a layer make the bank eight times larger.
        for dims in ((-1,), (-2,), None):
            if dims is None and height != width:
                break
            subset = torch.nonzero(_chance(0.5, len(chosen), generator)).flatten()
            if len(subset):
                flip = (lambda t: t.transpose(-1, -2)) if dims is None else \
                    (lambda t, d=dims: t.flip(d))
                colour[subset], alpha[subset] = flip(colour[subset]), flip(alpha[subset])
        lesion = masks[chosen].float()[:, None]
        protected = F.max_pool2d(lesion, 2 * margin + 1, stride=1, padding=margin) > 0
        alpha = alpha.masked_fill(protected, 0.0)
        out = images.clone()
        out[chosen] = images[chosen] * (1 - alpha) + colour * alpha
        return out, chosen


def augment_batch(images: torch.Tensor, masks: torch.Tensor, size: int, config: AugmentConfig,
                  generator: torch.Generator, artefacts: ArtefactBank | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment uint8 ``[B, H, W, 3]`` images and their 0/1 ``[B, H, W]`` masks together.

    Returns float images ``[B, 3, size, size]`` in [0, 1] (not yet normalised: see
    :func:`raysky.models.preprocess.normalize`) and float 0/1 masks ``[B, 1, size, size]``.
    An image without a lesion in its mask gets a random crop where ``lesion_zoom`` draws a
    zoom, and ``artefacts`` (a bank) is needed for ``config.artefacts > 0``.
    """
    out, out_mask, _ = augment_pairs(images, masks, size, config, generator, artefacts)
    return out, out_mask


def augment_pairs(images: torch.Tensor, masks: torch.Tensor, size: int, config: AugmentConfig,
                  generator: torch.Generator, artefacts: ArtefactBank | None = None,
                  pairs: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`augment_batch`, plus a clean twin of up to ``pairs`` images that got an artefact.

    A twin is its image before the artefact was pasted, under the same crop, rotation, flips
    and colour jitter, so the pair differs by the artefact alone: what a consistency loss
    needs to teach that an artefact outside the lesion must not change the prediction.
    Returns the ``B`` augmented images followed by the twins, their masks likewise, and
    ``twin_of``: for each twin, the index of its artefacted image.
    """
    n = images.shape[0]
    pixels = images.permute(0, 3, 1, 2).float().div_(255.0)
    lesion = masks.bool()
    twin_of = torch.zeros(0, dtype=torch.long)
    if config.artefacts > 0:
        if artefacts is None:
            raise ValueError("config.artefacts > 0 needs an ArtefactBank (artefacts=)")
        clean = pixels
        pixels, chosen = artefacts.paste_indexed(pixels, lesion, config.artefacts, generator)
        twin_of = chosen[:pairs]
        if len(twin_of):  # no copy of the batch when nothing is twinned
            pixels = torch.cat([pixels, clean[twin_of]])
    rows = torch.cat([torch.arange(n), twin_of])
    boxes = _crop_boxes(n, config, generator)
    if config.lesion_zoom > 0:
        zoom_boxes, has_lesion = _lesion_boxes(lesion, config, generator)
        zoom = _chance(config.lesion_zoom, n, generator) & has_lesion
        boxes = torch.where(zoom[:, None], zoom_boxes, boxes)
    theta = _affine(n, boxes, config, generator)[rows]
    grid = F.affine_grid(theta, [len(rows), 3, size, size], align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    out_mask = F.grid_sample(lesion[rows].float()[:, None], grid, mode="nearest",
                             padding_mode="reflection", align_corners=False)
    matrix, pull = colour_matrices(n, config, generator)
    # A twin's contrast pulls towards its artefacted image's grey, as that image's does.
    mean_grey = (out[:n].mean(dim=(2, 3)) @ _GREY)[rows]
    return _jitter(out, matrix[rows], pull[rows], mean_grey), out_mask, twin_of


def resize_batch(images: torch.Tensor, masks: torch.Tensor, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation transform: uint8 ``[B, H, W, 3]`` and ``[B, H, W]`` squashed to ``size``
    (antialiased, as :func:`raysky.models.preprocess.images_to_tensor` does at inference)."""
    pixels = images.permute(0, 3, 1, 2).float().div_(255.0)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(0.0, 1.0)
    out_mask = F.interpolate(masks.float()[:, None], size=(size, size), mode="nearest")
    return pixels, out_mask


def epoch_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The augmentation generator of one worker's epoch: a rerun with the same seed draws the
    same stream, and every epoch and worker draws a new one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_007 + epoch)


class Augmenter:
    """One worker's augmentation: the recipe's :class:`AugmentConfig`, an artefact bank drawn at
    the cache's size when the recipe pastes artefacts, and the generator of the current epoch.

    ``train`` batches are augmented to the model's input size; validation batches are only
    resized (:func:`resize_batch`), as inference resizes.
    """

    def __init__(self, config: AugmentConfig, size: int, cache_size: int, seed: int, rank: int):
        self.config, self.size, self.seed, self.rank = config, size, seed, rank
        self.bank = ArtefactBank.draw(cache_size, seed) if config.artefacts > 0 else None
        self.generator = epoch_generator(seed, rank, 0)

    def start_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations from their own seeded stream (resumable)."""
        self.generator = epoch_generator(self.seed, self.rank, epoch)

    def __call__(self, images: np.ndarray, masks: np.ndarray, train: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images ``[B, 3, size, size]`` in [0, 1] and 0/1 masks ``[B, 1, size, size]``
        from a batch of the uint8 cache."""
        images_t = torch.from_numpy(np.ascontiguousarray(images))
        masks_t = torch.from_numpy(np.ascontiguousarray(masks))
        if not train:
            return resize_batch(images_t, masks_t, self.size)
        return augment_batch(images_t, masks_t, self.size, self.config, self.generator, self.bank)

    def paired(self, images: np.ndarray, masks: np.ndarray, pairs: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training batch with clean twins of up to ``pairs`` artefacted images appended
        (:func:`augment_pairs`)."""
        return augment_pairs(torch.from_numpy(np.ascontiguousarray(images)),
                             torch.from_numpy(np.ascontiguousarray(masks)), self.size,
                             self.config, self.generator, self.bank, pairs)
