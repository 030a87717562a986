"""Datasets, labels, metadata and image decoding for raysky.

It needs no torch and loads no model code: metadata is encoded to numpy arrays, which
:func:`raysky.models.preprocess.metadata_to_tensors` turns into the classifier's input.
Public names load from their modules on first use (:mod:`raysky.exports`).
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "ImageDecodeError": "image_errors", "DEFAULT_MAX_PIXELS": "images", "decode_image": "images",
    "decode_mask": "images", "encode_png": "images", "load_mask": "images", "load_rgb": "images",
    "SEX_VOCAB": "metadata", "SITE_VOCAB": "metadata", "EncodedMetadata": "metadata",
    "MetadataVocab": "metadata", "normalize_age": "metadata", "normalize_sex": "metadata",
    "normalize_site": "metadata", "FORMATS": "records", "class_counts": "readers",
    "read_archive": "archive", "read_dataset": "readers", "read_ham10000": "layouts",
    "read_isic2018": "layouts", "read_isic2019": "layouts", "records_to_frame": "readers",
    "RECORD_FIELDS": "records", "DatasetError": "records", "LesionRecord": "records",
    "apply_split_file": "splits", "read_split_file": "splits", "split_by_lesion": "splits",
    "CANONICAL_CLASSES": "taxonomy", "CLASS_DESCRIPTIONS": "taxonomy",
    "MALIGNANT_CLASSES": "taxonomy", "canonical_label": "taxonomy",
    "malignant_indices": "taxonomy", "order_classes": "taxonomy",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
