"""A manifest: the table of images a team exports from its own database, one row per image.

``raysky score --input manifest.csv`` (or ``.parquet``, local or ``s3://``) scores the images
its rows name instead of listing a prefix. :func:`read_manifest` reads it:

* **URI column** (required): the first of :data:`URI_COLUMNS` present (any case). A URI is
  ``s3://bucket/key``, an absolute local path (or ``file://``), or a path relative to the
  manifest's own folder.
* **Optional columns**: ``image_id``; ``age`` (or ``age_approx``, in years); ``sex``;
  ``site`` (or ``localization``, ``anatom_site_general``); ``lesion_id``; ``patient_id``.
* **Every other column** passes through to the results unchanged, so results join back to
  the database (text, numbers, booleans, dates and times; a Parquet column of another type,
  a list or a struct, is an error before any work).

Rows are never fatal: a row with no URI, a URI outside the allowed storage (a local path or
``file://`` in a manifest on S3, a relative path whose ``..`` leaves the manifest's folder,
another scheme), an unsafe or repeated ``image_id`` or a repeated URI gets a ``problem``,
which scoring turns into that row's error row. Rows without an ``image_id`` get one from
their file name by the rules of :mod:`raysky.data.ids`.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from raysky import storage
from raysky.data.ids import PATH_SEPARATOR, KeptIds, assign_ids, stand_in_id
from raysky.data.metadata import normalize_age
from raysky.data.records import DatasetError

URI_COLUMNS: tuple[str, ...] = ("uri", "image_uri", "source_uri", "image_path", "path", "url",
                                "file")
"""Names the image URI column may have, in order of preference (any case)."""
KNOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "image_id": ("image_id", "image"),
    "age": ("age", "age_approx"),
    "sex": ("sex",),
    "site": ("site", "localization", "anatom_site_general"),
    "lesion_id": ("lesion_id",),
    "patient_id": ("patient_id",),
}
"""Each optional manifest field and the column names it may come from (any case)."""
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")
SOURCE = "manifest"
"""The value of ``age_source``, ``sex_source`` and ``site_source`` for manifest values."""


def _passes_through(kind: pa.DataType) -> bool:
    return (pa.types.is_null(kind) or pa.types.is_boolean(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_temporal(kind))


@dataclass
class Manifest:
    """A manifest read by :func:`read_manifest`.

    ``table`` has one row per manifest row, in order: ``image_id``, ``source_uri``, ``age``,
    ``sex``, ``site``, ``lesion_id``, ``patient_id``, ``problem`` (None, or why the row gets
    an error row) and then the :attr:`extra` columns as the manifest has them.
    """

    uri: str
    table: pa.Table
    extra: pa.Schema = field(default_factory=lambda: pa.schema([]))
    columns: dict[str, str] = field(default_factory=dict)
    """Which manifest column each known field came from (``uri``, ``age`` ...)."""


def is_manifest_uri(uri: str) -> bool:
    """True when ``uri`` names a manifest file by its suffix (``.csv`` or ``.parquet``)."""
    return str(uri).lower().endswith(MANIFEST_SUFFIXES)


def _read_table(uri: str) -> tuple[pa.Table, int]:
    """The manifest as Arrow, and the file row number of its first data row."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise DatasetError(uri, "file not found") from None
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)), 1
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(uri, f"not a readable Parquet file ({exc})") from None
    return _read_csv(uri, data), 2


def _read_csv(uri: str, data: bytes) -> pa.Table:
    """Every column as text (ids such as ``0001`` stay text), empty cells as null."""
    import csv

    import pyarrow.csv as pacsv

    text = data.decode("utf-8-sig", errors="replace")
    header = next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])
    names = [name.strip() for name in header]
    if not any(names):
        raise DatasetError(uri, "empty file, expected a CSV header row")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(uri, f"repeated column names {', '.join(map(repr, repeated))}", 1)
    try:
        return pacsv.read_csv(
            io.BytesIO(data), read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True,
                null_values=["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None"]),
            parse_options=pacsv.ParseOptions(newlines_in_values=True))
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise DatasetError(uri, f"cannot parse CSV ({exc})") from None


def _find(table: pa.Table, names: tuple[str, ...]) -> str | None:
    by_lower = {name.lower(): name for name in table.column_names}
    return next((by_lower[name] for name in names if name in by_lower), None)


_EXPECTED = {"uri": "text (image URIs)", "age": "numbers of years",
             "image_id": "text or whole numbers", "lesion_id": "text or whole numbers",
             "patient_id": "text or whole numbers"}


def _text_column(table: pa.Table, name: str, uri: str, key: str) -> list[str | None]:
    """A column as stripped text per row, or an error naming it and what was expected for
    the field ``key``: ids may be whole numbers, an age any number, the rest only text."""
    column = table[name]
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    numbers = (pa.types.is_integer(kind) and key in ("image_id", "lesion_id", "patient_id", "age")
               or key == "age" and (pa.types.is_floating(kind) or pa.types.is_decimal(kind)))
    what = _EXPECTED.get(key, "text")
    if numbers:
        column = pc.cast(column, pa.string())
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise DatasetError(uri, f"column {name!r} holds {kind}: expected {what}")
    return [None if v is None or not str(v).strip() else str(v).strip()
            for v in column.to_pylist()]


def _resolve(value: str | None, base: str, on_s3: bool) -> tuple[str | None, str, str | None]:
    """``(uri to read, path for ids, problem)`` of one URI cell. ``base`` is the manifest's
    folder; a manifest on S3 (``on_s3``) may only name S3 objects."""
    if value is None:
        return None, "", "no image URI in this row"
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    scheme = scheme.lower()
    if scheme not in ("", "s3", "file"):
        return None, value, f"unsupported URI scheme {scheme}://: expected s3://, a path or file://"
    parts = rest.split("/")
    if ".." in parts or "." in parts:
        if scheme or rest.startswith("/"):
            return None, value, f"'..' or '.' in the image URI {value!r}"
        rel = posixpath.normpath(rest)
        if rel == ".." or rel.startswith("../"):
            return None, value, f"{value!r} leads outside the manifest's folder"
        rest = rel
    if scheme == "s3":
        if not rest or rest.startswith("/") or "/" not in rest.strip("/"):
            return None, value, f"not an s3://bucket/key URI: {value!r}"
        return f"s3://{rest}", rest, None
    if scheme == "file" and not rest.startswith("/"):
        return None, value, f"not a file:///absolute/path URI: {value!r}"
    if scheme == "file" or rest.startswith("/"):
        if on_s3:
            return None, value, (f"local file {value!r} in a manifest on S3: its rows may name "
                                 "s3:// objects or paths relative to the manifest")
        return rest, rest.lstrip("/"), None
    return storage.join(base, rest), rest, None


def _resolve_all(uris: list[str | None], manifest_uri: str) -> tuple[list, list, list]:
    on_s3 = storage.is_s3(manifest_uri)
    base = ("s3://" + posixpath.dirname(manifest_uri[len("s3://"):]) if on_s3
            else os.path.dirname(storage.resolve(manifest_uri)[1]))
    resolved = [_resolve(value, base, on_s3) for value in uris]
    return ([r[0] for r in resolved], [r[1] for r in resolved], [r[2] for r in resolved])


def _row_id(text: str, row: int) -> str:
    """A safe id for a row that cannot have its own: from ``text``, unique by the row."""
    return f"{stand_in_id(text)[:180]}{PATH_SEPARATOR}row{row}"


def _explicit_ids(values: list[str | None], rows: list[int], problems: list[str | None],
                  column: str | None) -> list[str | None]:
    """The manifest's own ids, checked: an unsafe or repeated one is that row's problem."""
    ids: list[str | None] = list(values)
    first: dict[str, int] = {}
    for i, image_id in enumerate(values):
        if image_id is None:
            continue
        problem = storage.name_problem(image_id, nested=False)
        if problem:
            problems[i] = problems[i] or f"unsafe image id {image_id!r} in {column!r}: it {problem}"
            ids[i] = _row_id(image_id, rows[i])
        elif image_id in first:
            problems[i] = problems[i] or f"image id {image_id!r} repeats row {first[image_id]}"
            ids[i] = _row_id(image_id, rows[i])
        else:
            first[image_id] = rows[i]
    return ids


def _derived_ids(ids: list[str | None], sources: list[str | None], rels: list[str],
                 rows: list[int], problems: list[str | None],
                 kept: KeptIds | None) -> list[str]:
    """Ids for rows without one: by file name (see :mod:`raysky.data.ids`), a stand-in for
    rows with a problem, and an error for the second row naming one object."""
    first: dict[str, int] = {}
    todo = []
    for i, source in enumerate(sources):
        if ids[i] is not None or source is None:
            continue
        if source in first:
            problems[i] = problems[i] or f"the same image as row {first[source]}"
        else:
            first[source] = rows[i]
            todo.append(i)
    reserved = {image_id for image_id in ids if image_id is not None}
    assigned = assign_ids([rels[i] for i in todo], [sources[i] for i in todo], kept, reserved)
    out = list(ids)
    for i, given in zip(todo, assigned, strict=True):
        out[i] = given.image_id
        problems[i] = problems[i] or given.problem
    for i, image_id in enumerate(out):
        if image_id is None:  # rows that name no readable object, or repeat one
            out[i] = _row_id(rels[i] or "row", rows[i])
    return out  # type: ignore[return-value]


def read_manifest(uri: str, kept: KeptIds | None = None) -> Manifest:
    """Read the manifest at ``uri`` (``.csv`` or ``.parquet``; local or ``s3://``).

    ``kept`` gives the ids an output already holds, by source URI, for rows without their own
    ``image_id`` (see :func:`raysky.data.ids.assign_ids`). A manifest without a URI column,
    with no rows, or with a column of a type that cannot be used raises
    :class:`DatasetError` naming the column and what was expected; problems of single rows
    do not (see the module docstring).
    """
    table, first_row = _read_table(uri)
    uri_column = _find(table, URI_COLUMNS)
    if uri_column is None:
        raise DatasetError(uri, "no image URI column: expected one of "
                           f"{', '.join(map(repr, URI_COLUMNS))} (columns: "
                           f"{', '.join(table.column_names) or 'none'})")
    if table.num_rows == 0:
        raise DatasetError(uri, "no rows: a manifest names one image per row")
    columns = {"uri": uri_column, **{key: found for key, names in KNOWN_COLUMNS.items()
                                     if (found := _find(table, names)) is not None}}
    values = {key: _text_column(table, name, uri, key) for key, name in columns.items()}
    extra = pa.schema([f for f in table.schema if f.name not in columns.values()])
    for column in extra:
        if not _passes_through(column.type) and not pa.types.is_dictionary(column.type):
            raise DatasetError(uri, f"column {column.name!r} holds {column.type}: expected text, "
                               "numbers, booleans, dates or times to pass through to the results")
    rows = list(range(first_row, first_row + table.num_rows))
    sources, rels, problems = _resolve_all(values["uri"], uri)
    ids = _explicit_ids(values.get("image_id", [None] * table.num_rows), rows, problems,
                        columns.get("image_id"))
    ids = _derived_ids(ids, sources, rels, rows, problems, kept)
    ages = [normalize_age(v) for v in values.get("age", [None] * table.num_rows)]
    out = {"image_id": pa.array(ids, pa.string()),
           "source_uri": pa.array([s if s is not None else v
                                   for s, v in zip(sources, values["uri"], strict=True)],
                                  pa.string()),
           "age": pa.array(ages, pa.float64()),
           **{key: pa.array(values.get(key, [None] * table.num_rows), pa.string())
              for key in ("sex", "site", "lesion_id", "patient_id")},
           "problem": pa.array(problems, pa.string())}
    for column in extra:
        data = table[column.name]
        out[column.name] = (data.cast(column.type.value_type)
                            if pa.types.is_dictionary(column.type) else data)
    result = pa.table(out)
    return Manifest(uri=uri, table=result, extra=pa.schema(
        [result.schema.field(c.name) for c in extra]), columns=columns)
