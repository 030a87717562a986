"""Parquet output that survives crashes: atomic files, run ids, resume and orphan clean-up.

Exactly-once rests on three rules:

* A result file appears whole or not at all. A local file is written under a hidden temporary
  name and renamed into place. An S3 object is uploaded from memory in one request, because
  pyarrow's S3 stream completes a multipart upload on close even after a failed write, which
  could publish half a file.
* Each run names its files ``part-<run id>-<unique>.parquet``. The driver records every file
  the pipeline reports. When the run succeeds, the run's files that nobody reported are
  deleted: they come from tasks that Ray retried after the first attempt had already written
  its file (a lost node, a killed worker), so their rows are also in the retry's file.
* A new run reads the ``image_id`` column of every file already there and skips those inputs.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysky import storage
from raysky.results import read_table, result_files

FILE_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
MAX_FILE_BYTES = 512 * 1024 * 1024
"""Binary payload per file at most; far below Arrow's 2 GiB limit for one ``binary`` array."""

ROW_GROUP_ROWS = 64
"""Small row groups let readers stream files whose rows each hold images or PNGs."""


def new_run_id() -> str:
    """A sortable, unique id for one run: UTC time plus random hex."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def split_table(table: pa.Table, max_rows: int, max_bytes: int = MAX_FILE_BYTES) -> list[pa.Table]:
    """Cut ``table`` into pieces of at most ``max_rows`` rows and about ``max_bytes`` of binary data.

    A single row larger than ``max_bytes`` still gets a piece of its own.
    """
    sizes = None
    for field in table.schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            lengths = pc.fill_null(pc.binary_length(table[field.name]), 0).to_numpy()
            sizes = lengths if sizes is None else sizes + lengths
    pieces, start, used = [], 0, 0
    for row in range(table.num_rows):
        size = int(sizes[row]) if sizes is not None else 0
        if row > start and (row - start >= max_rows or used + size > max_bytes):
            pieces.append(table.slice(start, row - start))
            start, used = row, 0
        used += size
    if table.num_rows > start:
        pieces.append(table.slice(start, table.num_rows - start))
    return pieces


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    """Write ``table`` to ``uri`` so that readers see the whole file or nothing."""
    fs, path = storage.resolve(uri)
    kwargs = {"row_group_size": ROW_GROUP_ROWS, "compression": "zstd"}
    if isinstance(fs, pafs.LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")
        try:
            pq.write_table(table, tmp, **kwargs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    storage.write_bytes(uri, sink.getvalue())  # a pyarrow Buffer: no copy into bytes


def write_pieces(table: pa.Table, output: str, run_id: str,
                 max_rows: int) -> list[tuple[str, pa.Table]]:
    """Write ``table`` as one or more ``part-<run_id>-*.parquet`` files.

    ``large_binary`` columns are written as ``binary``. Returns ``(uri, rows written there)`` pairs.
    """
    written = []
    # Pieces are cut to at most MAX_FILE_BYTES of binary data, so 64-bit offsets are never needed
    # in a file, and plain ``binary`` is what every Parquet reader handles.
    schema = pa.schema([
        pa.field(f.name, pa.binary()) if pa.types.is_large_binary(f.type) else f for f in table.schema
    ])
    for piece in split_table(table, max_rows):
        piece = piece.cast(schema)
        uri = storage.join(output, f"{FILE_PREFIX}{run_id}-{uuid.uuid4().hex[:12]}.parquet")
        write_parquet_atomic(piece, uri)
        written.append((uri, piece))
    return written


def done_ids(output: str) -> pa.Array:
    """Every ``image_id`` already written under ``output`` (empty when there is nothing yet)."""
    files = result_files(output)
    if not files:
        return pa.array([], pa.string())
    return pc.unique(read_table(files, ["image_id"]).column("image_id").combine_chunks())


def remove_stale_temporaries(output: str) -> int:
    """Delete temporary files that a crashed writer left under a local ``output``."""
    fs, path = storage.resolve(output)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(path):
        return 0
    removed = 0
    for name in os.listdir(path):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(path, name))
            removed += 1
    return removed


def remove_orphans(output: str, run_id: str, reported: set[str]) -> list[str]:
    """Delete this run's files that the pipeline never reported (duplicates from retried tasks)."""
    prefix = f"{FILE_PREFIX}{run_id}-"
    orphans = [f for f in result_files(output)
               if posixpath.basename(f.replace(os.sep, "/")).startswith(prefix) and f not in reported]
    for uri in orphans:
        storage.delete(uri)
    return orphans


def check_run_config(output: str, name: str, expected: dict) -> None:
    """Write ``expected`` as ``<output>/<name>``, or check it against the one already there.

    A resumed run must produce rows comparable with the earlier ones, so the fields that shape
    the rows (model versions, classes, columns) must match; a mismatch is a ``ValueError``.
    """
    uri = storage.join(output, name)
    if storage.exists(uri):
        try:
            existing = json.loads(storage.read_bytes(uri))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: invalid JSON ({exc})") from None
        changed = [key for key, value in expected.items() if existing.get(key) != value]
        if changed:
            details = "; ".join(f"{key}: {existing.get(key)!r} there, {expected[key]!r} now"
                                for key in changed)
            raise ValueError(
                f"{output} already holds results made differently ({details}); "
                "write to a new output, or delete the old one to start over")
        return
    if result_files(output):
        raise ValueError(f"{output} holds Parquet files that raysky did not write (no {name}); "
                         "choose an empty output")
    storage.makedirs(output)
    storage.write_bytes(uri, json.dumps(expected, indent=2).encode())
