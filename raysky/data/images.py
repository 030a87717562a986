"""Defensive image and mask decoding for training, batch scoring and the HTTP server.

Everything raysky decodes may come from an untrusted upload or a half-copied archive, so every
failure (empty, truncated, not an image, too many pixels, odd mode) surfaces as one exception
type, :class:`ImageDecodeError`, whose ``reason`` is short enough to go into a results table.

Decisions worth knowing:

* Only raster formats that dermoscopy images actually come in are opened (JPEG, PNG, TIFF,
  BMP, WebP, GIF). Restricting Pillow's plugin list keeps formats such as EPS, which shell out
  to Ghostscript, away from untrusted bytes.
* The pixel count is checked from the header, before any pixel data is decoded. Pillow's own
  decompression-bomb error is caught and reported the same way. Pillow's global
  ``MAX_IMAGE_PIXELS`` and the process-wide warning filters are never modified: the server
  decodes in threads, and ``warnings.catch_warnings`` is not thread-safe. This is still safe,
  because Pillow only warns above its own limit (about 89 MP), which is larger than
  ``DEFAULT_MAX_PIXELS``. Such an image is therefore rejected here right after the warning.
* Transparency is composited onto white, which is how viewers show it, so the model sees what
  the person who exported the image saw.
* High-bit-depth images are scaled to 8 bits by their full range, not clipped. Pillow's own
  ``convert("L")`` clips 16-bit values at 255, which would turn a 16-bit image white.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raysky import storage
from raysky.data.dicom import decode_dicom, is_dicom
from raysky.data.image_errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image (width x height) decoded by default: 8000 x 8000, far above any dermoscope."""

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
"""Pillow format plugins tried when opening untrusted bytes."""

# Modes Pillow converts to RGB correctly by itself (no alpha, 8 bits per channel).
_DIRECT_TO_RGB = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

DECODE_BYTES_PER_PIXEL: dict[str, int] = {
    **dict.fromkeys(("RGB", "RGBX", "YCbCr", "LAB", "HSV", "CMYK", "L", "1"), 10),
    **dict.fromkeys(("RGBA", "RGBa", "LA", "La", "PA", "P"), 20),
}
"""Peak memory of :func:`decode_image` per pixel, by the mode the header declares (measured at
16 MP, Pillow 13): Pillow's own buffer plus the RGB array for 8-bit modes; twice that when alpha
is composited (palettes go through RGBA). High-bit-depth and float modes, scaled in float64,
take :data:`MAX_DECODE_BYTES_PER_PIXEL`."""
MAX_DECODE_BYTES_PER_PIXEL = 37
"""Peak per pixel for 16/32-bit and float images (a float32 TIFF measured 36.5 B/px)."""
LARGE_DERMOSCOPY_PIXELS = 24_000_000
"""A full-frame dermoscopy capture (6000 x 4000): what a batch of real images is sized by."""


def decode_batch_memory(batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Bytes to reserve for a task that decodes ``batch_size`` images and returns their RGB
    pixels: the worst single decode allowed by ``max_pixels``, plus each image's RGB pixels
    held twice (the decoded list and the Arrow column built from it) at the size of a large
    dermoscopy image. Sized for every image at ``max_pixels``, a default batch would reserve
    gigabytes that real archives never use and starve the node of parallel decodes."""
    held = 2 * 3 * batch_size * min(max_pixels, LARGE_DERMOSCOPY_PIXELS)
    return max_pixels * MAX_DECODE_BYTES_PER_PIXEL + held


def _open_header(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Open and size-check an image from its header, without decoding the pixels."""
    if not data:
        raise ImageDecodeError(source, "empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow's hard limit (twice MAX_IMAGE_PIXELS) fired before our own check could run.
        pixels = re.search(r"\d+", str(exc))
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        count = pixels.group(0) if pixels else "too many"
        raise ImageDecodeError(source, f"image too large ({count} pixels > limit {limit})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not an image") from None
    except Exception as exc:  # Pillow plugins raise many types on malformed headers.
        raise ImageDecodeError(source, "corrupt image header", str(exc)) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(source, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            source, f"image too large ({width * height} pixels > limit {max_pixels})"
        )
    return image


def _open(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Open, size-check, fully decode and orient an image, in any mode."""
    image = _open_header(data, source, max_pixels)
    try:
        # Decode every pixel now, so truncated or corrupt data fails here and not later.
        image.load()
    except Exception as exc:
        reason = "truncated image" if "truncated" in str(exc).lower() else "corrupt image data"
        raise ImageDecodeError(source, reason, str(exc)) from None
    # A malformed EXIF block must not reject a readable image: it is then kept as stored.
    # In place keeps ``image.format``, which tells 16-bit PNG data apart below.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _scaled_gray(image: Image.Image) -> np.ndarray:
    """A single-channel high-bit-depth image (I;16*, I, F) as uint8, scaled by its full range."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        full_scale = 65535.0
    else:
        # 32-bit integer or float data has no fixed range: floats in [0, 1] are normalised
        # intensities, anything else is stretched from its own minimum and maximum.
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low >= 0.0 and high <= 1.0 and image.mode == "F":
            full_scale = 1.0
        elif low >= 0.0 and high <= 255.0:
            full_scale = 255.0
        elif low >= 0.0 and high <= 65535.0:
            full_scale = 65535.0
        else:
            values = values - low
            full_scale = max(high - low, 1e-12)
    scaled = np.nan_to_num(values / full_scale * 255.0, nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    mode = image.mode
    if mode == "P":
        # Palette images may carry transparency in the palette or in info["transparency"].
        image = image.convert("RGBA")
        mode = image.mode
    if mode in _WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_TO_RGB:
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageDecodeError(source, f"unsupported mode {mode}", str(exc)) from None
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scaled_gray(image)).convert("RGB")
    raise ImageDecodeError(source, f"unsupported mode {mode}")


def decode_image(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode image bytes into an 8-bit RGB :class:`PIL.Image.Image`, or raise.

    Grayscale, palette, CMYK and 16/32-bit images are converted to RGB. Alpha is composited onto
    white, and EXIF orientation is applied. Images with more than ``max_pixels`` pixels are
    rejected from their header alone, before decoding. Any problem raises
    :class:`ImageDecodeError` with ``source`` (a URI or upload name) in its message.
    """
    return _to_rgb(_open(data, source, max_pixels), source)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: size, Pillow mode, format and whether it has several
    frames (animated GIF/PNG/WebP, multi-page TIFF)."""

    width: int
    height: int
    mode: str
    format: str
    multi_frame: bool

    @property
    def decode_bytes(self) -> int:
        """Peak memory :func:`decode_image` will need for this image (see
        :data:`DECODE_BYTES_PER_PIXEL`)."""
        per_pixel = DECODE_BYTES_PER_PIXEL.get(self.mode, MAX_DECODE_BYTES_PER_PIXEL)
        return self.width * self.height * per_pixel


def read_image_header(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageHeader:
    """The :class:`ImageHeader` of ``data``, with :func:`decode_image`'s checks and errors.

    Cheap even for a huge file: it tells a caller what decoding will cost before paying it.
    """
    image = _open_header(data, source, max_pixels)
    try:
        multi_frame = bool(getattr(image, "is_animated", False))
    except Exception as exc:  # walking frame headers can meet the same malformed data
        raise ImageDecodeError(source, "corrupt image header", str(exc)) from None
    return ImageHeader(image.width, image.height, image.mode, image.format or "", multi_frame)


def read_image_size(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """``(width, height)`` from the header alone, with :func:`decode_image`'s checks and errors."""
    return _open_header(data, source, max_pixels).size


def decode_mask(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a lesion mask into a ``uint8`` array of shape ``(H, W)`` holding 0 and 1.

    Masks whose values are all 0 or 1 are used as they are. Otherwise a pixel is lesion when it
    is above half the full scale (``> 127`` for 8-bit masks). Colour masks take the maximum over
    their colour channels, and alpha is ignored. Palette masks use their palette indices, as
    segmentation tools write them. Bad bytes raise :class:`ImageDecodeError`.
    """
    image = _open(data, source, max_pixels)
    if image.mode.startswith("I") or image.mode == "F":
        raw = np.asarray(image)
        if raw.size and np.nanmin(raw) >= 0 and np.nanmax(raw) <= 1:
            return np.nan_to_num(raw).astype(np.uint8)
        values = _scaled_gray(image)
    elif image.mode in ("P", "L", "1"):
        values = np.asarray(image.convert("L") if image.mode == "1" else image)
    else:
        try:
            values = np.asarray(image.convert("RGB")).max(axis=2)
        except (ValueError, OSError) as exc:
            raise ImageDecodeError(source, f"unsupported mode {image.mode}", str(exc)) from None
    if values.size and values.max() <= 1:
        return values.astype(np.uint8)
    return (values > 127).astype(np.uint8)


def encode_png(image: Image.Image | np.ndarray, compress_level: int = 6, *,
               mask: bool = False) -> bytes:
    """Encode a PIL image or a ``uint8``/``bool`` array (``HxW``, ``HxWx3``, ``HxWx4``) as PNG.

    With ``mask`` the array is a binary mask (bool, or 0/1, or 0/255: nonzero is lesion) and is
    written as single-channel 0/255, so that it can be viewed and read back by
    :func:`decode_mask`; without it the values are written as they are, so a faint 8-bit
    heatmap that happens to hold only 0 and 1 stays itself. ``compress_level`` is zlib's 0-9:
    the default suits stored results; 1 encodes a heatmap about 3x faster for about 40% more
    bytes, the better trade for a live answer.
    """
    if isinstance(image, np.ndarray):
        array = image
        if mask:
            if array.ndim != 2:
                raise ValueError(f"encode_png(mask=True) needs an HxW array, got {array.shape}")
            array = (array != 0).astype(np.uint8) * 255
        elif array.dtype == bool:
            raise ValueError("encode_png got a bool array: pass mask=True to write it as a mask")
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] not in (3, 4)
        ):
            raise ValueError(
                f"encode_png needs a uint8 or bool array of shape HxW, HxWx3 or HxWx4, got "
                f"{array.dtype} {array.shape}"
            )
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def load_rgb(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read ``uri`` (local path or ``s3://``) and decode it with :func:`decode_image`, or, for
    a DICOM object, with :func:`raysky.data.dicom.decode_dicom` (archives may hold both)."""
    data = storage.read_bytes(uri)
    if is_dicom(data):
        return decode_dicom(data, source=str(uri), max_pixels=max_pixels)[0]
    return decode_image(data, source=str(uri), max_pixels=max_pixels)


def load_mask(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``uri`` (local path or ``s3://``) and decode it with :func:`decode_mask`."""
    return decode_mask(storage.read_bytes(uri), source=str(uri), max_pixels=max_pixels)
