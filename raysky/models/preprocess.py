"""Turning decoded images and encoded metadata into model inputs, and model outputs back into
full-size maps.

Training, scoring and serving all go through these functions, so a model always sees pixels
and metadata prepared the same way it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raysky.data.metadata import EncodedMetadata

COLOR_CONSTANCY: tuple[str, ...] = ("shades_of_gray",)
"""Colour constancy methods a model config may name (``color_constancy``); None is none."""

SHADES_OF_GRAY_P = 6
"""Minkowski norm of Shades of Gray: the ISIC 2018/2019 winners' (and Barata et al.'s) p."""


def shades_of_gray(images: torch.Tensor, p: int = SHADES_OF_GRAY_P) -> torch.Tensor:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) of ``[B, 3, H, W]`` in [0, 1].

    The illuminant of each image is the Minkowski ``p``-norm mean of each channel; dividing
    by it (scaled so that a grey illuminant leaves the image unchanged) removes the colour
    cast a dermoscope or its lighting adds, the same way in training, scoring and serving.
    ``p=6`` leans on the bright skin rather than the dark lesion when estimating it.
    """
    x = images.float()
    illuminant = x.clamp_min(0).pow(p).mean(dim=(2, 3)).pow(1.0 / p).clamp_min(1e-6)
    white = illuminant / illuminant.norm(dim=1, keepdim=True)
    gain = 1.0 / (white * math.sqrt(3.0))
    return (x * gain[:, :, None, None]).clamp_(0.0, 1.0)


def check_color_constancy(method: str | None) -> str | None:
    """``method`` if it is a known colour constancy (or None), else a ``ValueError``."""
    if method is not None and method not in COLOR_CONSTANCY:
        raise ValueError(f"color_constancy={method!r} is unknown; use None or one of "
                         f"{', '.join(COLOR_CONSTANCY)}")
    return method


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              color_constancy: str | None = None) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] as a model's input: colour constancy, then the
    channel mean and standard deviation. Training and inference both end here."""
    if check_color_constancy(color_constancy) == "shades_of_gray":
        images = shades_of_gray(images)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def images_to_tensor(images: Sequence[np.ndarray], size: int, mean: Sequence[float],
                     std: Sequence[float], color_constancy: str | None = None) -> torch.Tensor:
    """Stack RGB uint8 ``HxWx3`` arrays into a normalised ``[B, 3, size, size]`` float tensor.

    Images are squashed to a square rather than cropped: dermoscopy lesions are often
    off-centre, and a crop could cut the lesion the classifier must see. ``color_constancy``
    is the model config's (see :func:`normalize`).
    """
    batch = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB HxWx3 array, got shape {image.shape}")
        # A copy: PIL arrays are read-only, and flipped views have negative strides.
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        batch.append(tensor)
    return normalize(torch.cat(batch).div_(255.0).clamp_(0.0, 1.0), mean, std, color_constancy)


def model_input(images: Sequence[np.ndarray], meta: dict) -> torch.Tensor:
    """:func:`images_to_tensor` with a checkpoint's input size and normalisation (``meta`` is
    its ``config.json``); checkpoints from before colour constancy have none."""
    norm = meta["normalization"]
    return images_to_tensor(images, meta["input_size"], norm["mean"], norm["std"],
                            norm.get("color_constancy"))


def metadata_to_tensors(encoded: EncodedMetadata,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The classifier's ``metadata`` input on ``device``, from :class:`EncodedMetadata`.

    Returns ``age`` (float32 ``[B, 2]``), ``sex`` and ``site`` (long ``[B]``). This is the one
    place metadata becomes tensors, so training, scoring, serving and calibration feed the
    metadata transformer identically.
    """
    # torch.tensor copies: a batch's arrays may be read-only, and torch cannot share those.
    return {"age": torch.tensor(encoded.age, dtype=torch.float32, device=device),
            "sex": torch.tensor(encoded.sex, dtype=torch.long, device=device),
            "site": torch.tensor(encoded.site, dtype=torch.long, device=device)}


def masks_to_tensor(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Stack 0/1 ``HxW`` masks into a ``[B, 1, size, size]`` float tensor (nearest resampling)."""
    batch = [torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None] for m in masks]
    return torch.cat([F.interpolate(m, size=(size, size), mode="nearest") for m in batch])


def resize_map(values: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinearly resize one ``[h, w]`` map to ``height x width`` and return it as float32 numpy."""
    resized = F.interpolate(values.float()[None, None], size=(height, width), mode="bilinear",
                            align_corners=False)
    return resized[0, 0].cpu().numpy()
