"""The error every image and DICOM decoder raises, in a module of its own so that the two
decoders (:mod:`raysky.data.images`, :mod:`raysky.data.dicom`) can both raise it and
:func:`raysky.data.images.load_rgb` can read either."""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """Bytes that cannot be used as an image.

    ``reason`` is a short, stable phrase for result tables (``"empty file"``, ``"truncated
    image"``, ``"not an image"`` ...); ``detail`` holds Pillow's own message, when there is one.
    """

    def __init__(self, source: str, reason: str, detail: str | None = None):
        self.source = source
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))
