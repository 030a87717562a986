"""Skin tone from the image itself: the Individual Typology Angle (ITA) of the skin around a lesion.

ITA is ``atan2(L* - 50, b*)`` in degrees over CIELAB (D65) pixels. Only skin counts, so the
lesion (its mask, dilated by a margin for the blurry border) is excluded, and so is what is not
skin in dermoscopy: the black corners of the dermatoscope's aperture and other very dark pixels
(``L* < DARK_L``), glare and bubble highlights (``L* > BRIGHT_L``), and hairs, found as thin
dark structures by a black top-hat (grey closing minus the image) on L*. The angle is taken of
the median L* and median b* of what remains (medians resist the leftovers better than a mean,
and the angle of medians is stable where per-pixel angles wrap near b* = 0). When too little
skin is left (fewer than ``MIN_PIXELS`` or under ``MIN_FRACTION`` of the image) the answer is
None, never a number from a handful of pixels.

Dermoscopes are rarely colour-calibrated, and a bluish white balance pushes the skin's b* to
zero or below, where ``atan2`` swings towards +-90 degrees and beyond, angles no skin has (skin
under a neutral white has b* of about 6 or more, so |ITA| stays under ``PLAUSIBLE_ITA``; on the
bundled HAM10000 sample 23 of 35 images fall outside). :func:`skin_tone_category` gives
such an angle no category: a colour cast is reported as unknown, not as "very light" or "dark".
"""

from __future__ import annotations

import math

import numpy as np

DARK_L = 15.0
"""Pixels darker than this (L*) are aperture corners, shadows or hair, not skin."""
BRIGHT_L = 97.0
"""Pixels brighter than this (L*) are glare or bubble highlights."""
HAIR_TOPHAT_L = 12.0
"""A pixel this much (L*) darker than its grey closing lies on a thin dark structure (hair)."""
MIN_PIXELS = 500
MIN_FRACTION = 0.05
PLAUSIBLE_ITA = 80.0
"""Beyond +-80 degrees the skin's b* is under about 6 at any usable L*: a colour cast."""
MAX_SIDE = 256
"""Images are subsampled to about this long side first: a median needs no more pixels."""

# sRGB primaries to XYZ under D65, and the D65 white: the values scikit-image uses, so the two
# conversions agree to rounding.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])

_LEVELS = np.arange(256) / 255.0
_SRGB_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92)

SKIN_TONES: tuple[tuple[str, float], ...] = (
    ("very light", 55.0), ("light", 41.0), ("intermediate", 28.0), ("tan", 10.0),
)
"""Categories above each lower bound (exclusive), from the lightest; below them brown
(-30 to 10 degrees, both ends included) and dark (under -30), after Chardon et al. 1991."""


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65, 2 degree observer) of sRGB pixels ``[..., 3]`` (uint8, or floats in [0, 1]).

    The standard conversion: undo the sRGB transfer curve, map to XYZ, scale by the D65 white
    and apply the CIE L*a*b* function. Returns float64 ``[..., 3]`` (L* in [0, 100]).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        # 256 possible values: a table of the transfer curve is exact and far cheaper than
        # the power function per pixel, which scoring pays on every image.
        linear = _SRGB_LINEAR[rgb]
    else:
        c = rgb.astype(np.float64)
        linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.T / _D65_WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def _subsample(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    step = max(1, math.ceil(max(rgb.shape[:2]) / MAX_SIDE))
    return rgb[::step, ::step], mask[::step, ::step], step


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A lesion mask (nonzero on the lesion; colour masks by their maximum) as booleans at
    ``shape``, nearest-neighbour resized where the sizes differ, as for ground-truth masks
    distributed at another resolution than their images."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != shape:
        from PIL import Image

        mask = np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize(
            (shape[1], shape[0]), Image.NEAREST))
    return mask > 0


def skin_pixels(rgb: np.ndarray, lesion_mask: np.ndarray) -> np.ndarray:
    """CIELAB values ``[N, 3]`` of the usable skin pixels (see the module docstring)."""
    from scipy import ndimage

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    lesion = fit_mask(lesion_mask, rgb.shape[:2])
    rgb, lesion, _step = _subsample(rgb[..., :3], lesion)
    lab = srgb_to_lab(rgb)
    light = lab[..., 0]
    margin = max(1, round(0.02 * min(light.shape)))
    near_lesion = (ndimage.distance_transform_edt(~lesion) <= margin) if lesion.any() else lesion
    # Hairs are a few pixels wide: a closing with a window a little wider fills them in.
    size = max(3, 2 * round(0.01 * max(light.shape)) + 3)
    hair = ndimage.grey_closing(light, size=(size, size)) - light > HAIR_TOPHAT_L
    usable = ~near_lesion & ~hair & (light >= DARK_L) & (light <= BRIGHT_L)
    return lab[usable]


def ita_degrees(rgb: np.ndarray, lesion_mask: np.ndarray) -> float | None:
    """The ITA in degrees of the skin outside ``lesion_mask``, or None when too little is usable.

    ``rgb`` is ``[H, W, 3]`` sRGB (uint8, or floats in [0, 1]); ``lesion_mask`` is ``[H, W]``
    (nonzero on the lesion; resized when its size differs). The skin pixels and the robust
    statistic are described in the module docstring; the minimum is ``MIN_PIXELS`` usable
    pixels and ``MIN_FRACTION`` of the image, counted at the image's own resolution.
    """
    rgb = np.asarray(rgb)
    lab = skin_pixels(rgb, lesion_mask)
    step = max(1, math.ceil(max(rgb.shape[:2]) / MAX_SIDE))
    usable = len(lab) * step * step
    total = rgb.shape[0] * rgb.shape[1]
    if usable < MIN_PIXELS or usable < MIN_FRACTION * total:
        return None
    light, b = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    return math.degrees(math.atan2(light - 50.0, b))


def skin_tone_category(ita: float | None) -> str | None:
    """The ITA category: very light > 55, light 41-55, intermediate 28-41, tan 10-28, brown
    -30-10, dark < -30 (degrees). A value on a bound goes to the darker side of it, except -30,
    which is brown, as "dark < -30" says. None, NaN and angles beyond +-``PLAUSIBLE_ITA`` (a
    colour cast: see the module docstring) give None."""
    if ita is None or math.isnan(ita) or abs(ita) > PLAUSIBLE_ITA:
        return None
    for name, lower in SKIN_TONES:
        if ita > lower:
            return name
    return "brown" if ita >= -30.0 else "dark"
