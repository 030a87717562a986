"""Reading an unlabelled archive to screen, and joining a metadata CSV to its images by id.

See :func:`read_archive` for the rules; :mod:`raysky.data.readers` re-exports both readers.
"""

from __future__ import annotations

import posixpath

from raysky import storage
from raysky.data.metadata import normalize_age
from raysky.data.records import DatasetError, LesionRecord
from raysky.data.tables import IMAGE_SUFFIXES, MASK_SUFFIX, Table, Tree, check_unique, load_csv
from raysky.data.taxonomy import canonical_label


def _strip_image_suffix(name: str) -> str:
    """``name`` without one trailing image suffix (any case), or ``name`` when it has none."""
    stem, ext = posixpath.splitext(name)
    return stem if ext.lower() in IMAGE_SUFFIXES and stem else name


def archive_image_id(name: str) -> str:
    """The image id of an archive file called ``name`` (its base name, no directory).

    The id is the name without a final lowercase ``.jpg`` (the dermoscopy archives' own
    extension: ``ISIC_0024306.jpg`` is ``ISIC_0024306``), and the whole name otherwise
    (``x.png``, ``x.JPG``, ``x.jpeg``, ``x.jpg.png``, ``x.png.jpg``). The rule looks at this one
    file only, so an image keeps its id whatever is added beside it later, and no two names in
    one folder share an id: ids that end in an image suffix are whole names, and the others are
    ``.jpg`` names whose stem has no image suffix.
    """
    name = posixpath.basename(name)
    if name.endswith(".jpg") and _strip_image_suffix(name[:-4]) == name[:-4]:
        return name[:-4]
    return name


def read_archive(root: str, metadata_uri: str | None = None) -> list[LesionRecord]:
    """Read an unlabelled archive to screen: every image file under ``root``, recursively.

    Files ending in ``.jpg``, ``.jpeg`` or ``.png`` (any case) are listed, except masks
    (``*_segmentation.png``) and hidden files and folders (names starting with ``.``, such as
    macOS's ``._*`` copies). Their content is not checked: zero-byte or corrupt files are
    listed too, and the scorer reports them row by row. ``image_id`` follows
    :func:`archive_image_id`: the file name without a final ``.jpg``, else the whole name. Two
    files with the same id (the same name in two folders) and names with characters unsafe in
    a file name (see :func:`raysky.storage.name_problem`) are a :class:`DatasetError` that
    names them: ids are never made up from what else the archive holds.

    The optional ``metadata_uri`` CSV needs an id column (``image_id`` or ``image``). It may
    have ``age``/``age_approx``, ``sex``, ``localization``/``anatom_site_general``/``site``,
    ``lesion_id`` and ``dx``/``label``. Ids match with or without the file extension. Rows
    without an image are ignored, and images without a row keep None fields. A ``dx`` that is
    not a known diagnosis gives ``label=None`` rather than an error, because screening does not
    use labels.
    """
    tree = Tree(root)
    paths = [rel for rel in tree.files
             if rel.lower().endswith(IMAGE_SUFFIXES) and not rel.lower().endswith(MASK_SUFFIX)
             and not any(part.startswith(".") for part in rel.split("/"))]
    if not paths:
        raise DatasetError(root, f"no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    records, files = [], {}
    for rel in sorted(paths):
        image_id = archive_image_id(rel)
        problem = storage.name_problem(image_id, nested=False)
        if problem:
            raise DatasetError(tree.files[rel], f"unsafe file name for an image id: it {problem}")
        files.setdefault(image_id, []).append(rel)
        records.append(LesionRecord(image_id=image_id, image_uri=tree.files[rel]))
    repeated = {image_id: rels for image_id, rels in files.items() if len(rels) > 1}
    if repeated:
        shown = "; ".join(f"{image_id!r}: {', '.join(rels)}"
                          for image_id, rels in list(repeated.items())[:5])
        raise DatasetError(root, f"{len(repeated)} duplicate image ids, from files with the same "
                           f"name in several folders ({shown}); rename them, or score each "
                           "folder on its own")
    if metadata_uri is not None:
        join_metadata(records, metadata_uri)
    return records


def join_metadata(records: list[LesionRecord], metadata_uri: str) -> list[LesionRecord]:
    """Fill age, sex, site, lesion_id and label of ``records`` in place from a metadata CSV.

    The CSV follows the archive rules of :func:`read_archive` (id column ``image_id`` or
    ``image``, matched with or without the file extension). Rows for other images are ignored;
    a duplicate id raises :class:`DatasetError` naming the row. Returns ``records``.
    """
    _join_archive_metadata(records, load_csv(metadata_uri))
    return records


def _join_archive_metadata(records: list[LesionRecord], table: Table) -> None:
    """Fill ``records`` from ``table``. A row applies to the image whose id is its key, with or
    without an image suffix (``x.jpg`` -> ``x``); a key without a suffix (``x``) also applies to
    images named ``x.<suffix>`` (``x.png``) that no row names exactly."""
    id_col = table.column("image_id", "image")
    columns = (table.column("age", "age_approx", required=False),
               table.column("sex", required=False),
               table.column("localization", "anatom_site_general", "site", required=False),
               table.column("lesion_id", required=False),
               table.column("dx", "label", required=False))
    by_id = {record.image_id: record for record in records}
    by_stem: dict[str, list[LesionRecord]] = {}
    for record in records:
        if _strip_image_suffix(record.image_id) != record.image_id:
            by_stem.setdefault(_strip_image_suffix(record.image_id), []).append(record)
    seen: dict[str, int] = {}
    named: set[str] = set()
    by_stem_rows = []
    for row, values in table.rows:
        key = check_unique(table, seen, values[id_col], row, id_col)
        record = by_id.get(key) or by_id.get(_strip_image_suffix(key))
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
    age_col, sex_col, site_col, lesion_col, label_col = columns
    record.age = normalize_age(_get(values, age_col))
    record.sex, record.site = _get(values, sex_col), _get(values, site_col)
    record.lesion_id = _get(values, lesion_col)
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
