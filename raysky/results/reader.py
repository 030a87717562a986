"""Read scoring results back: exactly one row per input.

``raysky score`` writes plain Parquet files (``part-*.parquet``) under its output prefix. Output
written by older raysky versions can hold a second copy of a row (for example when a node died
after its file was written but before the driver heard of it). Every reader here therefore
deduplicates by ``image_id``, keeping an ``ok`` row over an ``error`` row and then the most
recent ``scored_at``, so callers always see one row per input. Two rows with one ``image_id``
but different ``source_uri`` are two inputs, not two copies: keeping one would lose the other,
so such results are refused, naming the ids. ``error_kind`` (``bad_input`` or ``transient`` on
error rows), ``refer``, ``ood_score``, ``ood``, ``ita_deg``, ``skin_tone`` and
``calibration_version`` are read as null from results written before those columns existed.

Files and folders whose names start with ``_`` or ``.`` are bookkeeping (run configuration,
files being written) and are never read as results, following the Hadoop/Spark convention.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raysky import storage
from raysky.results.columns import added_column_places

_DEDUP_COLUMNS = ("image_id", "source_uri", "status", "scored_at")

OPTIONAL_COLUMNS: dict[str, tuple[str, str]] = added_column_places()
"""Columns newer than some results on disk: ``name: (column it follows, pandas dtype)``.
Where a file lacks one it is read as null, in the place newer files have it."""

def is_hidden(uri: str, root: str) -> bool:
    """True when any path component of ``uri`` below ``root`` starts with ``_`` or ``.``."""
    _fs, base = storage.resolve(root)
    _fs, path = storage.resolve(uri)
    rel = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def result_files(uri: str) -> list[str]:
    """The Parquet result files under ``uri`` (a folder or prefix, or one ``.parquet`` file)."""
    if str(uri).endswith(".parquet") and not storage.is_dir(uri):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such file or object")
        return [str(uri)]
    return [f for f in storage.list_files(uri, (".parquet",)) if not is_hidden(f, uri)]


def read_table(files: list[str], columns: list[str] | None = None,
               row_filter: pc.Expression | None = None,
               file_schema: pa.Schema | None = None) -> pa.Table:
    """Read ``files`` (all on one filesystem) into one Arrow table, projecting ``columns`` and
    keeping the rows ``row_filter`` selects (pushed down to the Parquet reader). With
    ``file_schema`` (see :func:`unified_schema`) files that lack one of its columns read it
    as null; without it, the first file's columns are read.

    Raises ``ValueError`` naming the file when a file is not readable Parquet.
    """
    if not files:
        raise ValueError("no result files to read")
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    try:
        return pads.dataset(paths, filesystem=fs, format="parquet", schema=file_schema).to_table(
            columns=columns, filter=row_filter)
    except (pa.ArrowInvalid, OSError) as exc:
        # Name the broken file: re-read one by one only on this rare path.
        import pyarrow.parquet as pq

        for uri, path in zip(files, paths, strict=True):
            try:
                pq.read_metadata(path, filesystem=fs)
            except (pa.ArrowInvalid, OSError) as inner:
                raise ValueError(f"{uri}: not a readable Parquet file ({inner})") from None
        raise ValueError(f"cannot read results ({exc})") from exc


def schema(uri: str) -> pa.Schema:
    """The Arrow schema of the results under ``uri``, from the first file's footer only."""
    files = result_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no result files (part-*.parquet)")
    import pyarrow.parquet as pq

    fs, path = storage.resolve(files[0])
    try:
        return pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{files[0]}: not a readable Parquet file ({exc})") from None


def unified_schema(files: list[str]) -> pa.Schema:
    """The columns of all ``files`` together, from every file's footer (read in parallel): an
    output resumed by a newer raysky holds files with more columns than its first ones."""
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    try:
        return pads.FileSystemDatasetFactory(fs, paths, pads.ParquetFileFormat()).inspect()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read the schemas of the results ({exc})") from None


def duplicate_ids(ids: pa.Array | pa.ChunkedArray) -> list[str]:
    """The values that appear more than once in ``ids``, sorted."""
    counts = pc.value_counts(ids)
    return sorted(counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist())


def dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per ``image_id``: ``ok`` before ``error``, then the latest ``scored_at``.

    The result is sorted by ``image_id`` with a fresh index. Rows that share an ``image_id``
    but not a ``source_uri`` raise ``ValueError`` naming the ids (see the module docstring).
    """
    if frame.empty:
        return frame.reset_index(drop=True)
    if "source_uri" in frame.columns:
        repeated = frame[frame["image_id"].duplicated(keep=False)]
        sources = repeated.groupby("image_id", sort=True)["source_uri"].unique()
        clashing = sources[sources.map(len) > 1]
        if len(clashing):
            shown = "; ".join(f"{image_id!r}: {', '.join(sorted(map(str, uris)))}"
                              for image_id, uris in clashing.head(5).items())
            raise ValueError(f"{len(clashing)} image ids name several different inputs ({shown}); "
                             "one result per id would lose the others")
    order = frame.assign(_rank=(frame["status"] != "ok").astype("int8"))
    sort_by, ascending = ["image_id", "_rank"], [True, True]
    if "scored_at" in order.columns:
        sort_by.append("scored_at")
        ascending.append(False)
    order = order.sort_values(sort_by, ascending=ascending, kind="stable", na_position="last")
    return order.drop_duplicates("image_id", keep="first").drop(columns="_rank").reset_index(drop=True)


def read(uri: str, columns: list[str] | None = None,
         image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the results under ``uri`` into a DataFrame with exactly one row per scored input.

    ``columns`` limits what is read (the PNG columns are large); ``image_id``, ``status`` and
    ``scored_at`` are always read, to deduplicate, and dropped again when not asked for.
    ``image_ids`` keeps only those rows, filtered in the Parquet reader, so a few images'
    masks and heatmaps can be read without the rest. Raises ``FileNotFoundError`` when
    ``uri`` holds no result files.
    """
    files = result_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no result files (part-*.parquet)")
    wanted = None
    file_schema = unified_schema(files) if len(files) > 1 else None
    available = set((file_schema or schema(uri)).names)
    if columns is not None:
        wanted = list(dict.fromkeys([*columns, *_DEDUP_COLUMNS]))
        missing = [c for c in columns if c not in available and c not in OPTIONAL_COLUMNS]
        if missing:
            raise ValueError(f"{uri}: no column {', '.join(missing)} in the results")
        wanted = [c for c in wanted if c in available]
    row_filter = None if image_ids is None else pc.field("image_id").isin(list(image_ids))
    frame = read_table(files, wanted, row_filter, file_schema).to_pandas()
    for name, (after, dtype) in OPTIONAL_COLUMNS.items():
        if name not in available and (columns is None or name in columns):
            at = frame.columns.get_loc(after) + 1 if after in frame.columns else len(frame.columns)
            frame.insert(at, name, pd.Series([None] * len(frame), dtype=dtype, index=frame.index))
    frame = dedupe(frame)
    if columns is not None:
        frame = frame[list(columns)]
    return frame
