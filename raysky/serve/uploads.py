"""Validation of ``/v1/predict`` uploads: the form's metadata fields and image id, and the
image itself (header first, then a bounded decode), each mistake a clear 4xx."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import ImageHeader, decode_image, read_image_header
from raysky.data.metadata import (
    MAX_AGE_YEARS,
    SEX_SPELLINGS,
    UNKNOWN,
    normalize_age,
    normalize_sex,
    normalize_site,
)
from raysky.serve.errors import ApiError

METADATA_FIELDS = ("age", "sex", "site")
FORM_FIELDS = ("image", "image_id", *METADATA_FIELDS)
MAX_IMAGE_ID_LENGTH = 128
UPLOAD_MODES = frozenset({"RGB", "RGBX", "YCbCr", "CMYK", "L", "RGBA", "LA", "P", "PA"})
"""Pillow modes accepted from uploads: 8-bit colour or grey, with or without alpha or a palette.
Bilevel, 16/32-bit and float images are never dermoscopy photographs, and cost up to 4x the
memory to decode."""
_IMAGE_ID = re.compile(r"^[\w.:/+-]+$")


def _form_text(form, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(422, "invalid_field", f"field {name!r} was given {len(values)} times",
                       name)
    if not isinstance(values[0], str):
        raise ApiError(422, "invalid_field", f"field {name!r} must be text, not a file", name)
    text = values[0].strip()
    return text or None


def parse_metadata(form) -> tuple[dict[str, Any], str | None]:
    """Validate the optional ``age``/``sex``/``site``/``image_id`` form fields.

    Returns the metadata dict the pipeline takes and the image id. Unknown fields, a
    non-numeric or implausible age, and a sex or site outside the vocabulary are rejected with
    422 rather than silently read as unknown, so a client's typo cannot quietly change a
    prediction. Missing or empty fields (and ``unknown``) are allowed.
    """
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(422, "unknown_field",
                       f"unknown form field(s) {unknown}; accepted: {list(FORM_FIELDS)}",
                       unknown[0])
    metadata: dict[str, Any] = {}
    age = _form_text(form, "age")
    if age is not None:
        # The readers' own rules (raysky.data.metadata), made strict: what they would read as
        # unknown is a client's mistake here, not a missing value.
        years = normalize_age(age)
        if years is None:
            raise ApiError(422, "invalid_metadata",
                           f"age must be a number of years in 0..{MAX_AGE_YEARS:g}, got {age!r}",
                           "age")
        metadata["age"] = years
    sex = _form_text(form, "sex")
    if sex is not None:
        if normalize_sex(sex) == UNKNOWN and sex.lower() != UNKNOWN:
            raise ApiError(422, "invalid_metadata",
                           f"sex must be one of {list(SEX_SPELLINGS)}, got {sex!r}", "sex")
        metadata["sex"] = sex
    site = _form_text(form, "site")
    if site is not None:
        if site.lower() != UNKNOWN and normalize_site(site) == UNKNOWN:
            raise ApiError(422, "invalid_metadata",
                           f"site {site!r} is not a known anatomical site (HAM10000 "
                           "localization or ISIC anatom_site_general, e.g. 'back', "
                           "'upper extremity', 'head/neck')", "site")
        metadata["site"] = site
    image_id = _form_text(form, "image_id")
    if image_id is not None and (len(image_id) > MAX_IMAGE_ID_LENGTH
                                 or not _IMAGE_ID.match(image_id)):
        raise ApiError(422, "invalid_field",
                       f"image_id must be at most {MAX_IMAGE_ID_LENGTH} letters, digits or "
                       "._:/+- characters", "image_id")
    return metadata, image_id


def upload_error(exc: ImageDecodeError) -> ApiError:
    """The answer to an upload that cannot be decoded. Not an image: 415. More pixels than
    allowed (a decompression bomb, or just too big): 413. Empty, truncated or corrupt: 400."""
    if exc.reason == "not an image":
        return ApiError(415, "unsupported_image", "the uploaded file is not an image in a "
                        "supported format (JPEG, PNG, TIFF, BMP, WebP, GIF)", "image")
    if exc.reason.startswith("image too large"):
        return ApiError(413, "image_too_large", f"image: {exc.reason}", "image")
    return ApiError(400, "invalid_image", f"image: {exc.reason}", "image")


def upload_header(data: bytes, max_pixels: int) -> ImageHeader:
    """An upload's header, checked before decoding: failures map as in decoding, and modes
    outside :data:`UPLOAD_MODES` or several frames get 415."""
    try:
        header = read_image_header(data, "image", max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise upload_error(exc) from None
    if header.mode not in UPLOAD_MODES:
        raise ApiError(415, "unsupported_image", f"image: {header.format} in Pillow mode "
                       f"{header.mode!r} is not accepted; send an 8-bit colour or greyscale "
                       "photograph (JPEG, PNG, TIFF, BMP, WebP, GIF)", "image")
    if header.multi_frame:
        raise ApiError(415, "unsupported_image", f"image: {header.format} with several frames "
                       "or pages is not accepted; send a single image", "image")
    return header


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode uploaded bytes to an RGB uint8 array, mapping each failure to its status."""
    try:
        return np.asarray(decode_image(data, "image", max_pixels=max_pixels))
    except ImageDecodeError as exc:
        raise upload_error(exc) from None
