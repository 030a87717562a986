"""Turning decoded images and encoded metadata into model inputs, and model outputs back into
full-size maps.

Training, scoring and serving all go through these functions, so a model always sees pixels
and metadata prepared the same way it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raysky.data.metadata import EncodedMetadata


def images_to_tensor(images: Sequence[np.ndarray], size: int, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """Stack RGB uint8 ``HxWx3`` arrays into a normalised ``[B, 3, size, size]`` float tensor.

    Images are squashed to a square rather than cropped: dermoscopy lesions are often
    off-centre, and a crop could cut the lesion the classifier must see.
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
    out = torch.cat(batch).div_(255.0)
    mean_t = torch.tensor(mean, dtype=out.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=out.dtype).view(1, 3, 1, 1)
    return (out - mean_t) / std_t


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
