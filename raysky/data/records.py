"""The record every dataset reader returns, the error every reader raises, and the reference
that names a dataset (where it is, its layout, its metadata CSV and one split of it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LesionRecord:
    """One dermoscopic image and what is known about it.

    Only ``image_id`` and ``image_uri`` are always set. ``label`` is a canonical class code
    (see :mod:`raysky.data.taxonomy`); ``age`` is in years; ``sex`` and ``site`` are the raw
    values from the source, which :class:`raysky.data.metadata.MetadataVocab` folds and encodes.
    """

    image_id: str
    image_uri: str
    mask_uri: str | None = None
    label: str | None = None
    lesion_id: str | None = None
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    patient_id: str | None = None

    def to_dict(self) -> dict:
        """Plain-dict form, used as a Ray Data row."""
        return asdict(self)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LesionRecord))

FORMATS: tuple[str, ...] = ("ham10000", "isic2018", "isic2019", "archive")
"""Dataset layouts understood by :func:`raysky.data.readers.read_dataset`."""


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as every command names it: ``uri`` (a local folder or ``s3://`` prefix), its
    ``format`` (one of :data:`FORMATS`), the ``metadata`` CSV an
    ``archive`` takes its labels and metadata from, and optionally one ``split`` of it (see
    :func:`raysky.data.splits.read_split`)."""

    uri: str
    format: str
    metadata: str | None = None
    split: str | None = None

    def describe(self) -> dict:
        """What results record about the data they were measured on (``split`` only if set)."""
        return {"data": str(self.uri), "format": self.format,
                **({"split": self.split} if self.split else {})}


class DatasetError(ValueError):
    """A malformed dataset: names the file, the row (1-based, header is row 1) and the problem."""

    def __init__(self, file: str, problem: str, row: int | None = None):
        self.file = file
        self.row = row
        self.problem = problem
        where = f"{file}, row {row}" if row is not None else file
        super().__init__(f"{where}: {problem}")
