"""DICOM dermoscopy in: decode one colour image, and read the header facts scoring records.

Hospital archives (PACS/VNA) hold dermoscopy as DICOM: VL Photographic or Dermoscopic
Photography objects (PS3.3), mostly JPEG baseline, some uncompressed. A file is DICOM when it
carries the ``DICM`` marker after its 128-byte preamble, whatever its name.

What is decoded, and how:

* **JPEG baseline** (and 8-bit JPEG extended): the frame's JPEG bytes go to Pillow, as a
  ``.jpg`` file's would, so the same JPEG as a file and inside a DICOM gives the same pixels
  (and the same prediction). A frame that DICOM calls ``RGB`` but whose JPEG stream has no
  Adobe marker was written without a colour transform; its components are taken as they are.
* **Uncompressed** (any byte order or planar configuration) and **RLE** ``RGB``, ``YBR_FULL``
  and ``YBR_FULL_422``: pydicom's own decoder and colour conversion.
* Everything else is refused with :class:`~raysky.data.image_errors.ImageDecodeError` saying why:
  several frames, monochrome, palette, other than 8 bits, another codec (JPEG 2000, JPEG-LS,
  lossless JPEG), no pixel data. Deflated objects are refused before they are inflated,
  since their size cannot be checked first.

The header also gives the classifier's metadata where nothing else did: PatientAge (``055Y``,
``030M``, ``002W``, ``010D``), PatientSex and the anatomic region (Anatomic Region Sequence,
else Body Part Examined); and the device facts an audit groups by: Light Source Polarization
and Contact Method (the Dermoscopic Image Module), Manufacturer and Manufacturer's Model Name.
A malformed PatientAge leaves the age unknown with a ``warning``; it never fails the image.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from raysky.data.image_errors import ImageDecodeError
from raysky.data.metadata import normalize_age

DICM_OFFSET = 128
"""Bytes of preamble before the ``DICM`` marker (PS3.10 7.1)."""

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
          "1.2.840.10008.1.2.5")
"""Implicit VR little endian, explicit VR little endian, explicit VR big endian, and RLE
lossless: what pydicom decodes by itself."""
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422")

_AGE = re.compile(r"(\d{3})([DWMY])")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_SEXES = {"M": "male", "F": "female", "O": "other"}

# DICOM Body Part Examined defined terms and Anatomic Region code meanings, in the words the
# metadata vocabulary (HAM10000 localization) folds; others are kept as they are (unknown).
_SITES = {
    "head": "head/neck", "face": "face", "scalp": "scalp", "ear": "ear", "neck": "neck",
    "arm": "upper extremity", "upper arm": "upper extremity", "forearm": "upper extremity",
    "upper limb": "upper extremity", "upper extremity": "upper extremity",
    "shoulder": "upper extremity", "elbow": "upper extremity", "wrist": "upper extremity",
    "hand": "hand", "finger": "hand", "leg": "lower extremity", "lower leg": "lower extremity",
    "thigh": "lower extremity", "knee": "lower extremity", "ankle": "lower extremity",
    "lower limb": "lower extremity", "lower extremity": "lower extremity", "foot": "foot",
    "toe": "foot", "chest": "chest", "breast": "chest", "thorax": "chest", "abdomen": "abdomen",
    "back": "back", "upper back": "back", "lower back": "back", "trunk": "trunk",
    "palm": "acral", "sole": "acral", "genital": "genital",
}
_SITE_PREFIX = re.compile(r"^(skin of (the )?|structure of (the )?|entire )")


@dataclass(frozen=True)
class DicomFacts:
    """What scoring keeps from a DICOM header. Every field is None where the header lacks it."""

    age: float | None = None
    sex: str | None = None
    site: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    polarization: str | None = None
    contact_method: str | None = None
    warning: str | None = None
    """Why a header value was not used (a malformed PatientAge), for the row's ``warning``."""


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts with a DICOM preamble and the ``DICM`` marker."""
    return len(data) >= DICM_OFFSET + 4 and data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def parse_patient_age(value: object) -> tuple[float | None, str | None]:
    """``(years, warning)`` for a PatientAge value (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``).

    An empty value is simply unknown; anything else that is not that form (``55``, ``Y055``),
    or an implausible age, is unknown with a warning naming it.
    """
    text = "" if value is None else str(value).strip()
    if not text:
        return None, None
    match = _AGE.fullmatch(text)
    age = normalize_age(int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]) if match else None
    if age is None:
        return None, f"malformed PatientAge {text!r} (expected nnnD, nnnW, nnnM or nnnY)"
    return age, None


def dicom_site(value: object) -> str | None:
    """An anatomic region or body part in the metadata vocabulary's words, where it has them."""
    text = "" if value is None else str(value).strip().lower().replace("_", " ")
    if not text:
        return None
    text = _SITE_PREFIX.sub("", text)
    return _SITES.get(text, text)


def _text(dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def header_facts(dataset) -> DicomFacts:
    """The :class:`DicomFacts` of a pydicom dataset."""
    age, warning = parse_patient_age(dataset.get("PatientAge"))
    sex = _text(dataset, "PatientSex")
    region = None
    sequence = dataset.get("AnatomicRegionSequence")
    if sequence:
        region = _text(sequence[0], "CodeMeaning")
    return DicomFacts(
        age=age, sex=_SEXES.get(sex.upper(), sex.lower()) if sex else None,
        site=dicom_site(region or _text(dataset, "BodyPartExamined")),
        manufacturer=_text(dataset, "Manufacturer"),
        manufacturer_model=_text(dataset, "ManufacturerModelName"),
        polarization=_text(dataset, "LightSourcePolarization"),
        contact_method=_text(dataset, "ContactMethod"), warning=warning)


def _meta_transfer_syntax(data: bytes) -> bytes:
    """The raw File Meta Information group, found from its group length (always explicit VR
    little endian), to check the transfer syntax before pydicom reads the rest."""
    start = DICM_OFFSET + 4
    if data[start:start + 6] == b"\x02\x00\x00\x00UL":
        (length,) = struct.unpack_from("<I", data, start + 8)
        return data[start:start + 12 + length]
    return data[start:start + 1024]


def _dataset(data: bytes, source: str):
    import pydicom

    if DEFLATED.encode() in _meta_transfer_syntax(data):
        raise ImageDecodeError(source, "unsupported DICOM: deflated transfer syntax")
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types on malformed files
        raise ImageDecodeError(source, "corrupt DICOM", str(exc)) from None


def _check_image(dataset, source: str, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of a single-frame 8-bit colour image, or the reason it is not one."""
    if "PixelData" not in dataset:
        if "Rows" in dataset or not len(dataset):
            # pydicom stops quietly at the end of a cut-off file, keeping what it read.
            raise ImageDecodeError(source, "truncated or damaged DICOM: no pixel data could "
                                   "be read")
        raise ImageDecodeError(source, "DICOM without pixel data (not an image object)")
    frames = dataset.get("NumberOfFrames") or 1
    try:
        frames = int(frames)
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:
        raise ImageDecodeError(source, f"unsupported DICOM: {frames or 'unreadable'} frames, "
                               "one image per object is supported")
    interpretation = str(dataset.get("PhotometricInterpretation", "")).strip()
    if interpretation not in COLOUR_INTERPRETATIONS or dataset.get("SamplesPerPixel") != 3:
        kind = ("monochrome" if interpretation.startswith("MONOCHROME")
                else f"photometric interpretation {interpretation or 'missing'}")
        raise ImageDecodeError(source, f"unsupported DICOM: {kind}; dermoscopy needs "
                               f"colour ({', '.join(COLOUR_INTERPRETATIONS)})")
    bits = dataset.get("BitsAllocated")
    if bits != 8 or dataset.get("BitsStored", 8) != 8:
        raise ImageDecodeError(source, f"unsupported DICOM: {bits}-bit samples, 8-bit colour "
                               "is supported")
    width, height = int(dataset.get("Columns") or 0), int(dataset.get("Rows") or 0)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(source, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(source, f"image too large ({width * height} pixels > limit "
                               f"{max_pixels})")
    return width, height


def _decode_jpeg_frame(dataset, source: str, size: tuple[int, int]) -> Image.Image:
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
        image = Image.open(io.BytesIO(frame), formats=("JPEG",))
        if image.size != size or image.mode != "RGB":
            raise ImageDecodeError(source, "DICOM pixel data do not match its header",
                                   f"JPEG {image.mode} {image.size}, header RGB {size}")
        raw_components = (str(dataset.PhotometricInterpretation).strip() == "RGB"
                          and "adobe_transform" not in image.info)
        if raw_components:
            # Stored without a colour transform: ask libjpeg for the components as they are.
            image.draft("YCbCr", image.size)
        image.load()
    except ImageDecodeError:
        raise
    except Exception as exc:
        reason = "truncated image" if "truncated" in str(exc).lower() else "corrupt image data"
        raise ImageDecodeError(source, reason, str(exc)) from None
    if raw_components:
        return Image.frombytes("RGB", image.size, image.tobytes())
    return image.convert("RGB")


def _decode_native(dataset, source: str, size: tuple[int, int]) -> Image.Image:
    from pydicom.pixels import pixel_array

    try:
        array = pixel_array(dataset, as_rgb=True)
    except Exception as exc:
        raise ImageDecodeError(source, "corrupt DICOM pixel data", str(exc)) from None
    if array.shape != (size[1], size[0], 3):
        raise ImageDecodeError(source, "DICOM pixel data do not match its header",
                               f"{array.shape}")
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")


def decode_dicom(data: bytes, source: str = "<bytes>",
                 max_pixels: int = 64_000_000) -> tuple[Image.Image, DicomFacts]:
    """Decode a DICOM object into an 8-bit RGB image and its :class:`DicomFacts`, or raise
    :class:`~raysky.data.image_errors.ImageDecodeError` saying why it cannot be screened.

    The header's size is checked against ``max_pixels`` before any pixel is decoded.
    """
    dataset = _dataset(data, source)
    size = _check_image(dataset, source, max_pixels)
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")).strip() if meta is not None else ""
    if syntax in (JPEG_BASELINE, JPEG_EXTENDED):
        image = _decode_jpeg_frame(dataset, source, size)
    elif syntax in NATIVE:
        image = _decode_native(dataset, source, size)
    else:
        from pydicom.uid import UID

        name = UID(syntax).name if syntax else "missing"
        raise ImageDecodeError(source, f"unsupported DICOM: transfer syntax {name}; JPEG "
                               "baseline, RLE and uncompressed are supported")
    return image, header_facts(dataset)
