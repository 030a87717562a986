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
"""

from __future__ import annotations

import fnmatch
import io
import math
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from raysky import storage
from raysky.data.metadata import normalize_age
from raysky.data.records import RECORD_FIELDS, DatasetError, LesionRecord
from raysky.data.taxonomy import CANONICAL_CLASSES, ISIC_COLUMN_NAMES, canonical_label

FORMATS: tuple[str, ...] = ("ham10000", "isic2018", "isic2019", "archive")
"""Dataset layouts understood by :func:`read_dataset`."""

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_segmentation.png"
ISIC2018_SPLITS: tuple[str, ...] = ("Training", "Validation", "Test")

HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
HAM10000_MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")

ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_IMAGE_DIR = "ISIC_2019_Training_Input"

# Spellings that mean "no value" in the public CSVs. "unknown" is deliberately absent:
# it is a real HAM10000 value, kept raw for MetadataVocab to fold.
_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a"})


# --------------------------------------------------------------------------------------------
# CSV loading and directory listing shared by every reader
# --------------------------------------------------------------------------------------------


def _cell(value: object) -> str | None:
    """One CSV cell as a stripped string, or None when it is empty or a NaN spelling."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in _MISSING else text


@dataclass
class _Table:
    """A CSV read as strings: its URI, stripped header names and ``(row_number, row)`` pairs."""

    file: str
    columns: list[str]
    rows: list[tuple[int, dict[str, str | None]]]

    def column(self, *names: str, required: bool = True) -> str | None:
        """The header name matching one of ``names`` (case-insensitive), in preference order."""
        by_lower = {name.lower(): name for name in self.columns}
        for name in names:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
        if required:
            wanted = " or ".join(repr(name) for name in names)
            raise DatasetError(
                self.file, f"missing required column {wanted} (columns: {', '.join(self.columns)})"
            )
        return None

    def error(self, row: int, problem: str) -> DatasetError:
        return DatasetError(self.file, problem, row)


def _load_csv(uri: str) -> _Table:
    """Read a CSV through :mod:`raysky.storage`; every failure becomes a :class:`DatasetError`."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise DatasetError(uri, "file not found") from None
    try:
        # Everything is read as text: pandas must not turn ids such as "0001" into numbers.
        # Blank lines are kept (and skipped below) so that row numbers match the file's lines.
        frame = pd.read_csv(
            io.BytesIO(data), dtype=str, keep_default_na=False, skip_blank_lines=False,
            index_col=False, encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise DatasetError(uri, "empty file, expected a CSV header row") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(uri, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(uri, f"cannot parse CSV ({_parser_problem(exc)})",
                           _parser_line(exc)) from None
    columns = [str(name).strip() for name in frame.columns]
    frame.columns = columns
    rows = []
    for index, raw in enumerate(frame.to_dict("records")):
        row = {name: _cell(value) for name, value in raw.items()}
        if any(value is not None for value in row.values()):
            rows.append((index + 2, row))
    return _Table(uri, columns, rows)


def _parser_line(exc: Exception) -> int | None:
    # pandas reports "... in line N, saw M" with N counted from 1 including the header.
    words = str(exc).replace(",", " ").split()
    for before, after in zip(words, words[1:], strict=False):
        if before == "line" and after.isdigit():
            return int(after)
    return None


def _parser_problem(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1].replace("Error tokenizing data. C error: ", "")


class _Tree:
    """One recursive listing of a dataset root, keyed by root-relative POSIX path."""

    def __init__(self, root: str):
        self.root = str(root)
        _fs, base = storage.resolve(self.root)
        prefix = ("s3://" if storage.is_s3(self.root) else "") + base.rstrip("/") + "/"
        try:
            listing = storage.list_files(self.root)  # sorted, so every lookup is deterministic
        except NotADirectoryError:
            raise DatasetError(self.root, "not a directory: expected a dataset folder") from None
        self.files: dict[str, str] = {}
        for uri in listing:
            if uri.startswith(prefix):
                self.files[uri[len(prefix):]] = uri
        self._by_lower = {rel.lower(): uri for rel, uri in reversed(self.files.items())}

    def file(self, rel: str) -> str | None:
        """The URI of ``rel`` (case-insensitive), or None."""
        return self._by_lower.get(rel.lower())

    def index(self, dirs: Iterable[str], suffixes: tuple[str, ...]) -> dict[str, str]:
        """Map id -> URI for files ``<dir>/<id><suffix>`` directly inside any of ``dirs``.

        Earlier directories win when an id appears twice (Kaggle's HAM10000 copy ships every
        image twice, in differently cased folders).
        """
        found: dict[str, str] = {}
        for wanted in dirs:
            for rel, uri in self.files.items():
                parent, _, name = rel.rpartition("/")
                if parent.lower() != wanted.lower():
                    continue
                suffix = next((s for s in suffixes if name.lower().endswith(s)), None)
                if suffix is not None and len(name) > len(suffix):
                    found.setdefault(name[: -len(suffix)], uri)
        return found

    def glob(self, pattern: str) -> list[str]:
        """URIs of files anywhere under the root whose name matches ``pattern`` (no case)."""
        pattern = pattern.lower()
        return [uri for rel, uri in self.files.items()
                if fnmatch.fnmatchcase(posixpath.basename(rel).lower(), pattern)]


def _label(table: _Table, row: int, value: str | None, column: str) -> str:
    if value is None:
        raise table.error(row, f"empty {column!r}: every image needs a diagnosis")
    try:
        return canonical_label(value)
    except ValueError as exc:
        raise table.error(row, str(exc)) from None


def _one_hot_label(table: _Table, row: int, values: dict[str, str | None],
                   columns: list[str], reject: str | None = None) -> str:
    """Decode ISIC's one-hot diagnosis columns; exactly one must be 1, and ``reject`` none."""
    hot = []
    for column in [*columns, *([reject] if reject else [])]:
        raw = values[column]
        try:
            number = float(raw) if raw is not None else math.nan
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            raise table.error(row, f"column {column!r} must be 0 or 1, got {raw!r}")
        if number == 1.0:
            hot.append(column)
    if reject and reject in hot:
        raise table.error(row, f"image is labelled {reject}, which is not a trainable class")
    if len(hot) != 1:
        raise table.error(
            row, f"expected exactly one 1 among {', '.join(columns)}, found {len(hot)}"
        )
    return canonical_label(hot[0])


def _check_unique(table: _Table, seen: dict[str, int], image_id: str | None, row: int,
                  column: str) -> str:
    if image_id is None:
        raise table.error(row, f"empty {column!r}")
    problem = storage.name_problem(image_id)
    if problem:
        raise table.error(row, f"unsafe image id {image_id!r} in {column!r}: it {problem}")
    if image_id in seen:
        raise table.error(row, f"duplicate image id {image_id!r} (first in row {seen[image_id]})")
    seen[image_id] = row
    return image_id


def _missing_image(table: _Table, row: int, image_id: str, tree: _Tree,
                   dirs: Iterable[str]) -> DatasetError:
    places = ", ".join(f"{d}/{image_id}.jpg" for d in dirs)
    return table.error(row, f"image {image_id!r} has no file under {tree.root} (looked for {places})")


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_ham10000(root: str) -> list[LesionRecord]:
    """Read the HAM10000 layout (the official release, Kaggle's copy, or raysky's sample).

    Looks for ``<root>/HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, age, sex,
    localization``; ``dx_type`` and any other column are ignored). Images are read from
    ``<root>/<dir>/<image_id>.jpg`` with ``<dir>`` one of ``images``,
    ``HAM10000_images_part_1`` or ``HAM10000_images_part_2``. Masks are optional, read from
    ``<root>/<dir>/<image_id>_segmentation.png`` with ``<dir>`` one of ``masks`` or
    ``HAM10000_segmentations_lesion_tschandl``. Records follow the CSV's row order.
    """
    tree = _Tree(root)
    table = _load_csv(tree.file(HAM10000_METADATA) or storage.join(root, HAM10000_METADATA))
    id_col, lesion_col, dx_col, age_col, sex_col, site_col = (
        table.column(name)
        for name in ("image_id", "lesion_id", "dx", "age", "sex", "localization")
    )
    images = tree.index(HAM10000_IMAGE_DIRS, (".jpg", ".jpeg"))
    masks = tree.index(HAM10000_MASK_DIRS, (MASK_SUFFIX,))
    seen: dict[str, int] = {}
    records = []
    for row, values in table.rows:
        image_id = _check_unique(table, seen, values[id_col], row, id_col)
        label = _label(table, row, values[dx_col], dx_col)
        if image_id not in images:
            raise _missing_image(table, row, image_id, tree, HAM10000_IMAGE_DIRS)
        records.append(LesionRecord(
            image_id=image_id, image_uri=images[image_id], mask_uri=masks.get(image_id),
            label=label, lesion_id=values[lesion_col], age=normalize_age(values[age_col]),
            sex=values[sex_col], site=values[site_col],
        ))
    return records


def _isic2018_split(split: str) -> str:
    for name in ISIC2018_SPLITS:
        if split.lower() == name.lower():
            return name
    raise ValueError(f"unknown ISIC 2018 split {split!r}; expected one of {', '.join(ISIC2018_SPLITS)}")


def read_isic2018(root: str, split: str = "Training") -> list[LesionRecord]:
    """Read ISIC 2018 Task 1 (segmentation), Task 3 (classification), or both, for one split.

    ``split`` is ``Training``, ``Validation`` or ``Test``. Under ``root`` the reader looks for:

    * Task 1 images ``ISIC2018_Task1-2_{split}_Input/<id>.jpg`` and masks
      ``ISIC2018_Task1_{split}_GroundTruth/<id>_segmentation.png``. A mask whose image is
      missing is an error. An image without a mask gets ``mask_uri=None``.
    * Task 3 images ``ISIC2018_Task3_{split}_Input/<id>.jpg`` and labels from the one-hot CSV
      (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). The CSV is the one file anywhere under
      ``root`` named ``ISIC2018_Task3_{split}_GroundTruth*.csv``; failing that, the one
      ``*.csv`` inside the Task 3 image folder.
    * Optionally ``ISIC2018_Task3_{split}_LesionGroupings.csv`` anywhere under ``root``
      (``image,lesion_id``), which fills ``lesion_id``.

    Both tasks are joined by image id. Every labelled row becomes a record, and so does every
    Task 1 image without a label (its ``label`` is None). A labelled image is looked up in the
    Task 3 folder first, then in the Task 1 folder.
    """
    split = _isic2018_split(split)
    tree = _Tree(root)
    task1_dir = f"ISIC2018_Task1-2_{split}_Input"
    task3_dir = f"ISIC2018_Task3_{split}_Input"
    mask_dir = f"ISIC2018_Task1_{split}_GroundTruth"
    task1_images = tree.index([task1_dir], (".jpg", ".jpeg"))
    task3_images = tree.index([task3_dir], (".jpg", ".jpeg"))
    masks = tree.index([mask_dir], (MASK_SUFFIX,))
    for image_id, mask_uri in masks.items():
        if image_id not in task1_images and image_id not in task3_images:
            raise DatasetError(mask_uri, f"mask has no image {task1_dir}/{image_id}.jpg")

    label_csvs = tree.glob(f"ISIC2018_Task3_{split}_GroundTruth*.csv") or [
        uri for rel, uri in tree.files.items()
        if posixpath.dirname(rel).lower() == task3_dir.lower() and rel.lower().endswith(".csv")
    ]
    if len(label_csvs) > 1:
        raise DatasetError(root, f"several ISIC 2018 {split} label CSVs: {', '.join(label_csvs)}")
    if not label_csvs and not task1_images:
        raise DatasetError(
            root, f"no ISIC 2018 {split} data: expected {task1_dir}/ with {mask_dir}/, or "
            f"{task3_dir}/ with ISIC2018_Task3_{split}_GroundTruth.csv"
        )

    lesions: dict[str, str | None] = {}
    for uri in tree.glob(f"ISIC2018_Task3_{split}_LesionGroupings.csv")[:1]:
        groups = _load_csv(uri)
        image_col, lesion_col = groups.column("image"), groups.column("lesion_id")
        seen: dict[str, int] = {}
        for row, values in groups.rows:
            lesions[_check_unique(groups, seen, values[image_col], row, image_col)] = (
                values[lesion_col])

    records: list[LesionRecord] = []
    labelled: set[str] = set()
    if label_csvs:
        table = _load_csv(label_csvs[0])
        image_col = table.column("image")
        columns = [table.column(name) for name in ISIC_COLUMN_NAMES["isic2018"].values()]
        seen = {}
        for row, values in table.rows:
            image_id = _check_unique(table, seen, values[image_col], row, image_col)
            label = _one_hot_label(table, row, values, columns)
            image_uri = task3_images.get(image_id) or task1_images.get(image_id)
            if image_uri is None:
                raise _missing_image(table, row, image_id, tree, [task3_dir, task1_dir])
            labelled.add(image_id)
            records.append(LesionRecord(image_id=image_id, image_uri=image_uri,
                                        mask_uri=masks.get(image_id), label=label,
                                        lesion_id=lesions.get(image_id)))
    for image_id, image_uri in sorted(task1_images.items()):
        if image_id not in labelled:
            records.append(LesionRecord(image_id=image_id, image_uri=image_uri,
                                        mask_uri=masks.get(image_id),
                                        lesion_id=lesions.get(image_id)))
    return records


def read_isic2019(root: str) -> list[LesionRecord]:
    """Read the ISIC 2019 training set.

    Looks for ``<root>/ISIC_2019_Training_GroundTruth.csv`` (``image`` plus one-hot
    ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC``, and optionally ``UNK``). Exactly one of them must be 1,
    and a row with ``UNK=1`` is an error. Images come from
    ``<root>/ISIC_2019_Training_Input/<image>.jpg``. If
    ``<root>/ISIC_2019_Training_Metadata.csv`` is there (``image, age_approx,
    anatom_site_general, sex``, and optionally ``lesion_id``), its rows are joined by image
    id. Ground-truth images without a metadata row keep None fields.
    """
    tree = _Tree(root)
    table = _load_csv(tree.file(ISIC2019_GROUND_TRUTH) or storage.join(root, ISIC2019_GROUND_TRUTH))
    image_col = table.column("image")
    columns = [table.column(name) for name in ISIC_COLUMN_NAMES["isic2019"].values()]
    unknown_col = table.column("UNK", required=False)
    images = tree.index([ISIC2019_IMAGE_DIR], (".jpg", ".jpeg"))

    metadata: dict[str, dict[str, str | None]] = {}
    metadata_uri = tree.file(ISIC2019_METADATA)
    if metadata_uri is not None:
        meta = _load_csv(metadata_uri)
        meta_id, age_col, site_col, sex_col = (
            meta.column(name) for name in ("image", "age_approx", "anatom_site_general", "sex"))
        lesion_col = meta.column("lesion_id", required=False)
        seen: dict[str, int] = {}
        for row, values in meta.rows:
            metadata[_check_unique(meta, seen, values[meta_id], row, meta_id)] = {
                "age": values[age_col], "site": values[site_col], "sex": values[sex_col],
                "lesion_id": values[lesion_col] if lesion_col else None,
            }

    seen = {}
    records = []
    for row, values in table.rows:
        image_id = _check_unique(table, seen, values[image_col], row, image_col)
        label = _one_hot_label(table, row, values, columns, reject=unknown_col)
        if image_id not in images:
            raise _missing_image(table, row, image_id, tree, [ISIC2019_IMAGE_DIR])
        extra = metadata.get(image_id, {})
        records.append(LesionRecord(
            image_id=image_id, image_uri=images[image_id], label=label,
            lesion_id=extra.get("lesion_id"), age=normalize_age(extra.get("age")),
            sex=extra.get("sex"), site=extra.get("site"),
        ))
    return records


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
    tree = _Tree(root)
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
    _join_archive_metadata(records, _load_csv(metadata_uri))
    return records


def _join_archive_metadata(records: list[LesionRecord], table: _Table) -> None:
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
        key = _check_unique(table, seen, values[id_col], row, id_col)
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
    table = _load_csv(path)
    id_column = table.column("image_id", "image")
    frame = pd.DataFrame([row for _number, row in table.rows], columns=table.columns)
    frame = frame.rename(columns={id_column: "image_id"})
    frame.attrs["source"] = path
    return frame
