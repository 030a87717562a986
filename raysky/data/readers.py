"""Readers that turn a dataset folder or S3 prefix into a list of :class:`LesionRecord`.

Every reader lists its root once through :mod:`raysky.storage` and reads CSVs with
:func:`raysky.storage.read_bytes`, so local folders and ``s3://`` prefixes behave the same.
Structural problems (a missing file or column, an unknown label, a duplicate or unsafe image id,
a listed image without a file) raise :class:`DatasetError` naming the file and the 1-based CSV
row (the header is row 1). Image ids become file names downstream (masks, exports), so every id
must pass :func:`raysky.storage.name_problem`: no ``..``, no absolute paths, safe characters. Metadata values are never validated here: empty cells become ``None``,
ages are parsed with :func:`raysky.data.metadata.normalize_age`, and sex and site are kept as
raw strings for :class:`raysky.data.metadata.MetadataVocab` to fold.

Directory and file names are matched case-insensitively. Image directories must sit directly
under the root; ground-truth CSVs are searched for where noted.

The readers live in :mod:`raysky.data.layouts` (HAM10000, ISIC 2018, ISIC 2019) and
:mod:`raysky.data.archive` (unlabelled archives and their metadata CSV), on the CSV and listing
helpers of :mod:`raysky.data.tables`; this module dispatches by format
(:data:`raysky.data.records.FORMATS`) and reads a dataset's whole metadata CSV.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pandas as pd

from raysky import storage
from raysky.data.archive import read_archive
from raysky.data.layouts import (
    HAM10000_METADATA,
    ISIC2019_METADATA,
    read_ham10000,
    read_isic2018,
    read_isic2019,
)
from raysky.data.records import FORMATS, RECORD_FIELDS, LesionRecord
from raysky.data.tables import load_csv
from raysky.data.taxonomy import CANONICAL_CLASSES

__all__ = ["class_counts", "metadata_frame", "read_dataset", "records_to_frame"]

_READERS = {
    "ham10000": read_ham10000,
    "isic2018": read_isic2018,
    "isic2019": read_isic2019,
}


def read_dataset(uri: str, format: str, metadata_uri: str | None = None) -> list[LesionRecord]:
    """Read ``uri`` (a local folder or an ``s3://`` prefix) in one of :data:`FORMATS`.

    ``metadata_uri`` is a separate metadata CSV and applies only to the ``archive`` format; the
    other layouts carry their metadata in their own files. ISIC 2018 is read for its
    ``Training`` split (call :func:`read_isic2018` for another split).
    """
    key = str(format).strip().lower()
    if key not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    if key == "archive":
        return read_archive(uri, metadata_uri)
    if metadata_uri is not None:
        raise ValueError(f"metadata_uri applies only to format 'archive', not {key!r}")
    return _READERS[key](uri)


def records_to_frame(records: Iterable[LesionRecord]) -> pd.DataFrame:
    """Records as a DataFrame with one column per :class:`LesionRecord` field, in order."""
    return pd.DataFrame([record.to_dict() for record in records], columns=list(RECORD_FIELDS))


def class_counts(records: Iterable[LesionRecord]) -> dict[str, int]:
    """Images per label, in canonical class order; unlabelled records are not counted."""
    counts = Counter(record.label for record in records if record.label is not None)
    order = {code: i for i, code in enumerate(CANONICAL_CLASSES)}
    return {code: counts[code] for code in sorted(counts, key=lambda c: (order.get(c, 99), c))}


_METADATA_FILES: dict[str, str] = {"ham10000": HAM10000_METADATA, "isic2019": ISIC2019_METADATA}


def metadata_frame(uri: str, format: str, metadata_uri: str | None = None) -> pd.DataFrame | None:
    """Every column of a dataset's metadata CSV as text, with the image id as ``image_id``.

    The records keep only the fields the model uses (age, sex, site, lesion); audits group by
    any other column a team records (``dx_type``, a clinic, a device), so they read the file
    itself: ``HAM10000_metadata.csv`` or ``ISIC_2019_Training_Metadata.csv`` at the root, or
    the archive's ``metadata_uri``. None when the layout has no metadata file (ISIC 2018) or
    it is absent. Empty cells are None; ``frame.attrs["source"]`` names the file.
    """
    key = str(format).strip().lower()
    path = metadata_uri if key == "archive" else (
        storage.join(uri, _METADATA_FILES[key]) if key in _METADATA_FILES else None)
    if path is None or not storage.exists(path):
        return None
    table = load_csv(path)
    id_column = table.column("image_id", "image")
    frame = pd.DataFrame([row for _number, row in table.rows], columns=table.columns)
    frame = frame.rename(columns={id_column: "image_id"})
    frame.attrs["source"] = path
    return frame
