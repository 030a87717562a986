"""The CSV tables and directory listings every dataset reader shares, and their errors.

A :class:`Table` is a CSV read as text with 1-based row numbers (the header is row 1), and a
:class:`Tree` is one listing of a dataset root; the helpers below turn what is wrong in either
into a :class:`~raysky.data.records.DatasetError` naming the file and row. See
:mod:`raysky.data.readers` for the rules the readers follow.
"""

from __future__ import annotations

import fnmatch
import io
import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from raysky import storage
from raysky.data.records import DatasetError
from raysky.data.taxonomy import canonical_label

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
MASK_SUFFIX = "_segmentation.png"

# Spellings that mean "no value" in the public CSVs. "unknown" is deliberately absent:
# it is a real HAM10000 value, kept raw for MetadataVocab to fold.
_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a"})


def _cell(value: object) -> str | None:
    """One CSV cell as a stripped string, or None when it is empty or a NaN spelling."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in _MISSING else text


@dataclass
class Table:
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
        """A :class:`DatasetError` naming this file and 1-based ``row``."""
        return DatasetError(self.file, problem, row)


def load_csv(uri: str) -> Table:
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
    return Table(uri, columns, rows)


def _parser_line(exc: Exception) -> int | None:
    # pandas reports "... in line N, saw M" with N counted from 1 including the header.
    words = str(exc).replace(",", " ").split()
    for before, after in zip(words, words[1:], strict=False):
        if before == "line" and after.isdigit():
            return int(after)
    return None


def _parser_problem(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1].replace("Error tokenizing data. C error: ", "")


def root_prefix(root: str) -> str:
    """What every URI :func:`raysky.storage.list_files` lists under ``root`` starts with."""
    _fs, base = storage.resolve(str(root))
    return ("s3://" if storage.is_s3(str(root)) else "") + base.rstrip("/") + "/"


class Tree:
    """One recursive listing of a dataset root, keyed by root-relative POSIX path."""

    def __init__(self, root: str):
        self.root = str(root)
        prefix = root_prefix(self.root)
        try:
            listing = storage.list_files(self.root)  # sorted, so every lookup is deterministic
        except NotADirectoryError:
            raise DatasetError(self.root, "not a directory: expected a dataset folder") from None
        if not listing and not storage.exists(self.root):
            # A mistyped path lists nothing; saying so here names the path the user gave,
            # where "HAM10000_metadata.csv: file not found" would send them looking for a file.
            raise DatasetError(self.root, "no such folder or prefix")
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


def parse_label(table: Table, row: int, value: str | None, column: str) -> str:
    """The canonical class of a diagnosis cell; an empty or unknown one is an error."""
    if value is None:
        raise table.error(row, f"empty {column!r}: every image needs a diagnosis")
    try:
        return canonical_label(value)
    except ValueError as exc:
        raise table.error(row, str(exc)) from None


def one_hot_label(table: Table, row: int, values: dict[str, str | None],
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


def check_unique(table: Table, seen: dict[str, int], image_id: str | None, row: int,
                 column: str) -> str:
    """``image_id`` once it is known non-empty, safe as a file name and not yet in ``seen``.

    Records the id's row in ``seen``, so a later duplicate names the row it repeats.
    """
    if image_id is None:
        raise table.error(row, f"empty {column!r}")
    problem = storage.name_problem(image_id)
    if problem:
        raise table.error(row, f"unsafe image id {image_id!r} in {column!r}: it {problem}")
    if image_id in seen:
        raise table.error(row, f"duplicate image id {image_id!r} (first in row {seen[image_id]})")
    seen[image_id] = row
    return image_id


def missing_image(table: Table, row: int, image_id: str, tree: Tree,
                  dirs: Iterable[str]) -> DatasetError:
    """The error for a listed image with no file, naming every place it was looked for."""
    places = ", ".join(f"{d}/{image_id}.jpg" for d in dirs)
    return table.error(row, f"image {image_id!r} has no file under {tree.root} (looked for {places})")

