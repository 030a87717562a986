"""Read scoring results back: exactly one row per input, and the summary printed after a run.

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

import math
import posixpath
from collections import Counter
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raysky import storage
from raysky.score.schema import PROB_PREFIX, added_column_places

_DEDUP_COLUMNS = ("image_id", "source_uri", "status", "scored_at")

OPTIONAL_COLUMNS: dict[str, tuple[str, str]] = added_column_places()
"""Columns newer than some results on disk: ``name: (column it follows, pandas dtype)``.
Where a file lacks one it is read as null, in the place newer files have it."""

SUMMARY_COLUMNS = ("image_id", "source_uri", "status", "error", "error_kind", "predicted_class",
                   "malignant_prob", "refer", "ood", "skin_tone", "warning", "scored_at")


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


def class_columns(frame_or_schema) -> list[str]:
    """The ``prob_<class>`` columns, in file order."""
    names = frame_or_schema.columns if hasattr(frame_or_schema, "columns") else frame_or_schema.names
    return [name for name in names if name.startswith(PROB_PREFIX)]


def summarize(source: str | pd.DataFrame, top: int = 10) -> dict:
    """Counts of ok and error rows, error reasons, warnings, the class distribution and the top
    ``top``.

    ``refer`` and ``ood`` count the ok rows flagged, not flagged and null (no calibration);
    ``skin_tone`` counts the ok rows per ITA category, ``unknown`` where it is null.
    ``transient_errors`` counts the error rows a rerun would retry (``error_kind='transient'``).

    ``source`` is a results URI or a frame from :func:`read`. The top list holds the rows with
    the highest ``malignant_prob``: ``image_id``, ``source_uri``, ``predicted_class`` and
    ``malignant_prob``.
    """
    frame = read(source, list(SUMMARY_COLUMNS)) if isinstance(source, str) else source
    ok = frame[frame["status"] == "ok"]
    errors = frame[frame["status"] != "ok"]
    classes = Counter(ok["predicted_class"].astype(str))
    ranked = ok.sort_values(["malignant_prob", "image_id"], ascending=[False, True]).head(top)
    flags = {name: _flag_counts(ok[name]) for name in ("refer", "ood") if name in ok.columns}
    return {
        "rows": int(len(frame)),
        "ok": int(len(ok)),
        "error": int(len(errors)),
        "error_reasons": dict(Counter(_reason_kind(e) for e in errors["error"]).most_common()),
        **({"warnings": dict(Counter(frame["warning"].dropna().astype(str)).most_common())}
           if "warning" in frame.columns else {}),
        "transient_errors": int((errors["error_kind"] == "transient").sum())
        if "error_kind" in errors.columns else 0,
        "class_counts": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
        **flags,
        **({"skin_tone": dict(Counter(ok["skin_tone"].fillna("unknown").astype(str))
                              .most_common())} if "skin_tone" in ok.columns else {}),
        "top_malignant": [
            {"image_id": r.image_id, "source_uri": r.source_uri,
             "predicted_class": r.predicted_class, "malignant_prob": round(float(r.malignant_prob), 6)}
            for r in ranked.itertuples()
        ],
    }


def _flag_counts(values: pd.Series) -> dict[str, int]:
    """``true``, ``false`` and ``null`` counts of a boolean column with nulls."""
    known = values.dropna().astype(bool)
    return {"true": int(known.sum()), "false": int((~known).sum()),
            "null": int(len(values) - len(known))}


def _reason_kind(error: object) -> str:
    """The stable part of an error message (before any parenthesised detail)."""
    text = "" if error is None or (isinstance(error, float) and math.isnan(error)) else str(error)
    return text.split(" (", 1)[0].strip() or "unknown error"


def format_summary(summary: dict) -> str:
    """Render :func:`summarize` output as the lines printed at the end of a run."""
    lines = [f"rows: {summary['rows']}  ok: {summary['ok']}  error: {summary['error']}"]
    if summary["error_reasons"]:
        reasons = ", ".join(f"{reason} x{n}" for reason, n in summary["error_reasons"].items())
        lines.append(f"errors: {reasons}")
    if summary.get("warnings"):
        lines.append("warnings: " + ", ".join(f"{warning} x{n}"
                                              for warning, n in summary["warnings"].items()))
    if summary.get("transient_errors"):
        lines.append(f"transient errors: {summary['transient_errors']} (run the same command "
                     "again to retry them)")
    if summary["class_counts"]:
        total = max(1, summary["ok"])
        lines.append("predicted classes: " + ", ".join(
            f"{code} {n} ({100 * n / total:.1f}%)" for code, n in summary["class_counts"].items()))
    for name, what in (("refer", "referred"), ("ood", "out of distribution")):
        counts = summary.get(name)
        if counts:
            lines.append(f"{what} ({name}): {counts['true']}  not: {counts['false']}"
                         + (f"  null (no calibration): {counts['null']}" if counts["null"] else ""))
    if summary.get("skin_tone"):
        lines.append("skin tone (ITA): " + ", ".join(
            f"{tone} {n}" for tone, n in summary["skin_tone"].items()))
    if summary["top_malignant"]:
        lines.append(f"top {len(summary['top_malignant'])} by malignant_prob:")
        for rank, row in enumerate(summary["top_malignant"], 1):
            lines.append(f"  {rank:3d}. {row['malignant_prob']:.4f}  {row['predicted_class']:6s} "
                         f"{row['image_id']}  {row['source_uri']}")
    return "\n".join(lines)
