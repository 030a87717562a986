"""Reading an unlabelled archive to screen, and joining a metadata CSV to its images by id.

See :func:`read_archive` for the rules and :mod:`raysky.data.ids` for the ids;
:mod:`raysky.data.readers` re-exports both readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from raysky import storage
from raysky.data.ids import KeptIds, archive_image_id, assign_ids, strip_image_suffix
from raysky.data.metadata import normalize_age
from raysky.data.records import DatasetError, LesionRecord
from raysky.data.tables import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    Table,
    check_unique,
    load_csv,
    root_prefix,
)
from raysky.data.taxonomy import canonical_label

__all__ = ["ARCHIVE_SUFFIXES", "ArchiveListing", "archive_files", "archive_image_id",
           "join_metadata", "list_archive", "read_archive"]


ARCHIVE_SUFFIXES: tuple[str, ...] = (*IMAGE_SUFFIXES, *DICOM_SUFFIXES)
"""What an archive listing takes (any case): images and DICOM objects."""


@dataclass
class ArchiveListing:
    """The inputs under one archive root, in sorted path order, with their ids (see
    :mod:`raysky.data.ids`): ``paths`` relative to the root, ``uris`` to read, and for each a
    ``problem`` (None, or why its name cannot be its id: it gets an error row)."""

    root: str
    paths: list[str]
    uris: list[str]
    image_ids: list[str]
    problems: list[str | None]

    def __len__(self) -> int:
        return len(self.paths)


def archive_files(root: str) -> tuple[list[str], list[str]]:
    """``(paths relative to root, URIs)`` of the files an archive listing takes under ``root``:
    :data:`ARCHIVE_SUFFIXES` (any case), without masks (``*_segmentation.png``) and without
    hidden files and folders (names starting with ``.``, such as macOS's ``._*`` copies)."""
    try:
        listing = storage.list_files(root, ARCHIVE_SUFFIXES)
    except NotADirectoryError:
        raise DatasetError(root, "not a directory: expected a dataset folder") from None
    prefix = root_prefix(root)
    paths, uris = [], []
    for uri in listing:
        if not uri.startswith(prefix):
            continue
        rel = uri[len(prefix):]
        if rel.lower().endswith(MASK_SUFFIX) or rel.startswith(".") or "/." in rel:
            continue
        paths.append(rel)
        uris.append(uri)
    return paths, uris


def list_archive(root: str, kept: KeptIds | None = None) -> ArchiveListing:
    """Every input file under ``root`` (see :func:`archive_files`) with its id.

    ``kept`` gives the ids an output already holds by source URI (see
    :func:`raysky.data.ids.assign_ids`). Contents are not checked: zero-byte or corrupt files
    are listed too, and the scorer reports them row by row.
    """
    paths, uris = archive_files(root)
    if not paths and not storage.exists(root):
        raise DatasetError(root, "no such folder or prefix")
    if not paths:
        raise DatasetError(root, f"no image files ({', '.join(ARCHIVE_SUFFIXES)}) found")
    assigned = assign_ids(paths, uris, kept)
    return ArchiveListing(root, paths, uris, [a.image_id for a in assigned],
                          [a.problem for a in assigned])


def read_archive(root: str, metadata_uri: str | None = None) -> list[LesionRecord]:
    """Read an unlabelled archive to screen: every image file under ``root``, recursively.

    Files are listed by :func:`archive_files` and their ids follow :mod:`raysky.data.ids`: the
    file name without a final ``.jpg``, else the whole name; files that share a name in
    several folders get their relative path as id (``clinic-a~IMG_0001``). A file whose name
    has characters unsafe in a file name (see :func:`raysky.storage.name_problem`) is a
    :class:`DatasetError` that names it (scoring gives it an error row instead).

    The optional ``metadata_uri`` CSV needs an id column (``image_id`` or ``image``). It may
    have ``age``/``age_approx``, ``sex``, ``localization``/``anatom_site_general``/``site``,
    ``lesion_id``, ``patient_id`` and ``dx``/``label``. A row's key is an image id, with or
    without the file extension, or a file's path below ``root``. Rows without an image are
    ignored, and images without a row keep None fields. A ``dx`` that is not a known
    diagnosis gives ``label=None`` rather than an error, because screening does not use labels.
    """
    listing = list_archive(root)
    for uri, problem in zip(listing.uris, listing.problems, strict=True):
        if problem:
            raise DatasetError(uri, problem)
    records = [LesionRecord(image_id=image_id, image_uri=uri)
               for image_id, uri in zip(listing.image_ids, listing.uris, strict=True)]
    if metadata_uri is not None:
        join_metadata(records, metadata_uri, listing.paths)
    return records


def join_metadata(records: list[LesionRecord], metadata_uri: str,
                  paths: Sequence[str] | None = None) -> list[LesionRecord]:
    """Fill age, sex, site, lesion_id, patient_id and label of ``records`` in place from a
    metadata CSV.

    The CSV follows the archive rules of :func:`read_archive` (id column ``image_id`` or
    ``image``, matched with or without the file extension, or, given each record's path below
    the root in ``paths``, by that path). Rows for other images are ignored; a duplicate id
    raises :class:`DatasetError` naming the row. Returns ``records``.
    """
    _join_archive_metadata(records, load_csv(metadata_uri), paths)
    return records


def _join_archive_metadata(records: list[LesionRecord], table: Table,
                           paths: Sequence[str] | None = None) -> None:
    """Fill ``records`` from ``table``. A row applies to the image whose id is its key, with or
    without an image suffix (``x.jpg`` -> ``x``), or whose path it is; a key without a suffix
    (``x``) also applies to images named ``x.<suffix>`` (``x.png``) that no row names exactly."""
    id_col = table.column("image_id", "image")
    columns = (table.column("age", "age_approx", required=False),
               table.column("sex", required=False),
               table.column("localization", "anatom_site_general", "site", required=False),
               table.column("lesion_id", required=False),
               table.column("dx", "label", required=False),
               table.column("patient_id", required=False))
    by_id = {record.image_id: record for record in records}
    for record, path in zip(records, paths or (), strict=False):
        # Files that share a name in several folders are told apart by their paths.
        by_id.setdefault(path, record)
        by_id.setdefault(strip_image_suffix(path), record)
    by_stem: dict[str, list[LesionRecord]] = {}
    for record in records:
        if strip_image_suffix(record.image_id) != record.image_id:
            by_stem.setdefault(strip_image_suffix(record.image_id), []).append(record)
    seen: dict[str, int] = {}
    named: set[str] = set()
    by_stem_rows = []
    for row, values in table.rows:
        key = check_unique(table, seen, values[id_col], row, id_col)
        record = by_id.get(key) or by_id.get(strip_image_suffix(key))
        if record is not None:
            _fill(columns, record, values)
            named.add(record.image_id)
        elif key in by_stem:
            by_stem_rows.append((key, values))
    for key, values in by_stem_rows:
        for record in by_stem[key]:
            if record.image_id not in named:
                _fill(columns, record, values)


def _fill(columns: tuple[str | None, ...], record: LesionRecord,
          values: dict[str, str | None]) -> None:
    age_col, sex_col, site_col, lesion_col, label_col, patient_col = columns
    record.age = normalize_age(_get(values, age_col))
    record.sex, record.site = _get(values, sex_col), _get(values, site_col)
    record.lesion_id = _get(values, lesion_col)
    record.patient_id = _get(values, patient_col)
    label = _get(values, label_col)
    record.label = canonical_label(label) if label and _known_label(label) else None


def _get(values: dict[str, str | None], column: str | None) -> str | None:
    return values[column] if column else None


def _known_label(value: str) -> bool:
    try:
        canonical_label(value)
    except ValueError:
        return False
    return True
