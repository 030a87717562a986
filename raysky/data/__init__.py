"""Datasets, labels, metadata and image decoding for raysky.

Importing this package loads the readers, splits and image helpers and the metadata
encoding. It needs no torch and loads no model code: metadata is encoded to numpy arrays, which
:func:`raysky.models.preprocess.metadata_to_tensors` turns into the classifier's input.
"""

from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    decode_mask,
    encode_png,
    load_mask,
    load_rgb,
)
from raysky.data.metadata import (
    SEX_VOCAB,
    SITE_VOCAB,
    EncodedMetadata,
    MetadataVocab,
    normalize_age,
    normalize_sex,
    normalize_site,
)
from raysky.data.readers import (
    FORMATS,
    class_counts,
    read_archive,
    read_dataset,
    read_ham10000,
    read_isic2018,
    read_isic2019,
    records_to_frame,
)
from raysky.data.records import RECORD_FIELDS, DatasetError, LesionRecord
from raysky.data.splits import apply_split_file, read_split_file, split_by_lesion
from raysky.data.taxonomy import (
    CANONICAL_CLASSES,
    CLASS_DESCRIPTIONS,
    MALIGNANT_CLASSES,
    canonical_label,
    malignant_indices,
    order_classes,
)

__all__ = [
    "CANONICAL_CLASSES",
    "CLASS_DESCRIPTIONS",
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "MALIGNANT_CLASSES",
    "RECORD_FIELDS",
    "SEX_VOCAB",
    "SITE_VOCAB",
    "DatasetError",
    "EncodedMetadata",
    "ImageDecodeError",
    "LesionRecord",
    "MetadataVocab",
    "apply_split_file",
    "canonical_label",
    "class_counts",
    "decode_image",
    "decode_mask",
    "encode_png",
    "load_mask",
    "load_rgb",
    "malignant_indices",
    "normalize_age",
    "normalize_sex",
    "normalize_site",
    "order_classes",
    "read_archive",
    "read_dataset",
    "read_ham10000",
    "read_isic2018",
    "read_isic2019",
    "read_split_file",
    "records_to_frame",
    "split_by_lesion",
]
