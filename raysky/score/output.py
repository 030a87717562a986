"""Parquet output that survives crashes: atomic files, run ids, resume and orphan clean-up.

Exactly-once rests on these rules:

* One run at a time writes an output: it holds ``<output>/_raysky.lock``
  (:mod:`raysky.score.lock`).
* A result file appears whole or not at all. A local file is written under a hidden temporary
  name and renamed into place. An S3 object is uploaded from memory in one request, because
  pyarrow's S3 stream completes a multipart upload on close even after a failed write, which
  could publish half a file.
* Workers write their files under ``<output>/_pending/<run id>/``, which no reader looks at
  (pandas and pyarrow through :mod:`raysky.results`, DuckDB's ``*.parquet``, and Spark skip
  ``_`` folders). The driver publishes each file it hears about to
  ``<output>/part-<run id>-<unique>.parquet``. Files nobody reported come from tasks that Ray
  retried after the first attempt had already written (a lost node, a killed worker); they
  stay pending and are deleted, with everything else an earlier run left pending, when a run
  ends or the next one starts. A run that dies therefore never leaves a visible duplicate.
* ``<output>/_SUCCESS`` (JSON: run id, time, row and file counts, the files) is removed when a
  run starts and written when a run has left a row for every input.
* A new run reads the ``image_id`` column of every file already there and skips those inputs,
  except rows that failed for a transient reason (``error_kind='transient'``): those are first
  removed from their files (:func:`forget_transient_errors`), then scored again.
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
from raysky.results.reader import read_table, result_files

FILE_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
PENDING_DIR = "_pending"
SUCCESS_NAME = "_SUCCESS"
SUCCESS_FORMAT = "raysky-success/1"
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


def pending_dir(output: str, run_id: str) -> str:
    """Where the files of run ``run_id`` wait until the driver publishes them."""
    return storage.join(output, PENDING_DIR, run_id)


def write_pieces(table: pa.Table, output: str, run_id: str,
                 max_rows: int) -> list[tuple[str, pa.Table]]:
    """Write ``table`` as one or more pending ``part-<run_id>-*.parquet`` files.

    ``large_binary`` columns are written as ``binary``. Returns ``(pending uri, rows written
    there)`` pairs; :func:`publish` makes a file visible.
    """
    written = []
    # Pieces are cut to at most MAX_FILE_BYTES of binary data, so 64-bit offsets are never needed
    # in a file, and plain ``binary`` is what every Parquet reader handles.
    schema = pa.schema([
        pa.field(f.name, pa.binary()) if pa.types.is_large_binary(f.type) else f for f in table.schema
    ])
    for piece in split_table(table, max_rows):
        piece = piece.cast(schema)
        uri = storage.join(pending_dir(output, run_id),
                           f"{FILE_PREFIX}{run_id}-{uuid.uuid4().hex[:12]}.parquet")
        write_parquet_atomic(piece, uri)
        written.append((uri, piece))
    return written


def done_rows(output: str) -> pa.Table:
    """``image_id`` and ``source_uri`` of every row already written under ``output``: which
    inputs are done, and under which ids (kept on a rerun, see :mod:`raysky.data.ids`)."""
    files = result_files(output)
    if not files:
        return pa.table({"image_id": pa.array([], pa.string()),
                         "source_uri": pa.array([], pa.string())})
    return read_table(files, ["image_id", "source_uri"]).combine_chunks()


def done_ids(output: str) -> pa.Array:
    """Every ``image_id`` already written under ``output`` (empty when there is nothing yet)."""
    files = result_files(output)
    if not files:
        return pa.array([], pa.string())
    return pc.unique(read_table(files, ["image_id"]).column("image_id").combine_chunks())


def publish(output: str, pending_uri: str) -> str:
    """Move a pending file into ``output`` under its own name; return its visible URI.

    A local rename is atomic; on S3 the copy appears whole (one ``CopyObject``) before the
    pending object is deleted.
    """
    name = posixpath.basename(str(pending_uri).replace(os.sep, "/"))
    target = storage.join(output, name)
    fs, source = storage.resolve(pending_uri)
    fs.move(source, storage.resolve(target)[1])
    return target


def remove_stale_temporaries(output: str) -> int:
    """Delete what earlier runs left unpublished: ``_pending/`` and local temporary files.

    Call it only while holding the output's lock: another live run's pending files would go too.
    """
    pending = storage.list_files(storage.join(output, PENDING_DIR))
    storage.delete(storage.join(output, PENDING_DIR))
    removed = len(pending)
    fs, path = storage.resolve(output)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.isdir(path):
        # Writers before _pending/ existed put their temporaries at the top.
        for name in os.listdir(path):
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(path, name))
                removed += 1
    return removed


def remove_orphans(output: str, run_id: str) -> list[str]:
    """Delete this run's files still pending once every reported file has been published:
    duplicates from retried tasks. Returns the deleted URIs. The whole ``_pending/`` folder
    goes: the run holds the output's lock, so no other run has files there."""
    orphans = storage.list_files(pending_dir(output, run_id))
    storage.delete(storage.join(output, PENDING_DIR))
    return orphans


def forget_transient_errors(output: str, run_id: str) -> int:
    """Remove rows with ``status='error'`` and ``error_kind='transient'`` from the result files,
    so that this run scores those inputs again; return how many rows were removed.

    Each affected file is rewritten without those rows: the remainder is written pending, the
    old file deleted, then the remainder published. A crash in between loses no result for
    good: the rows missing then are simply scored again by the next run.
    """
    files = result_files(output)
    if not files or "error_kind" not in _schema(files[0]).names:
        return 0
    removed = 0
    for uri in _files_with_transient_rows(files):
        table = read_table([uri])
        transient = _transient(table)
        keep = table.filter(pa.array(~transient))
        written = write_pieces(keep, output, run_id, max(1, keep.num_rows)) if keep.num_rows else []
        storage.delete(uri)
        for pending, _piece in written:
            publish(output, pending)
        removed += int(transient.sum())
    return removed


def _schema(uri: str) -> pa.Schema:
    fs, path = storage.resolve(uri)
    return pq.read_schema(path, filesystem=fs)


def _files_with_transient_rows(files: list[str]) -> list[str]:
    """The result files holding a transient error row, found in one scan of two small columns
    over every file (parallel reads), so a rerun's start-up does not grow with a request per
    file."""
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(files[0])
    by_path = {storage.resolve(uri)[1]: uri for uri in files}
    scanner = pads.dataset(list(by_path), filesystem=fs, format="parquet").scanner(
        columns=["status"], filter=(pc.field("status") == "error")
        & (pc.field("error_kind") == "transient"))
    found = {batch.fragment.path for batch in scanner.scan_batches() if batch.record_batch.num_rows}
    return [by_path[path] for path in by_path if path in found]


def _transient(table: pa.Table):
    """Boolean numpy mask of the rows that failed for a transient reason."""
    failed = pc.and_kleene(pc.equal(table["status"], "error"),
                           pc.equal(table["error_kind"], "transient"))
    return pc.fill_null(failed, False).to_numpy(zero_copy_only=False)


def clear_success(output: str) -> None:
    """Remove the success manifest: the output is about to change."""
    storage.delete(storage.join(output, SUCCESS_NAME))


def write_success(output: str, run_id: str, inputs: int, rows: int) -> dict:
    """Write ``<output>/_SUCCESS`` for a run after which every input has a row; return it.

    ``rows`` is the number of image ids the output holds; ``files`` lists the result files that
    make it up, for readers that want exactly the committed set.
    """
    files = result_files(output)
    manifest = {"format": SUCCESS_FORMAT, "run_id": run_id,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": inputs, "rows": rows,
                "files": [posixpath.basename(f.replace(os.sep, "/")) for f in files]}
    storage.write_bytes(storage.join(output, SUCCESS_NAME), json.dumps(manifest, indent=2).encode())
    return manifest



def check_run_config(output: str, name: str, expected: dict, absent: dict | None = None) -> None:
    """Write ``expected`` as ``<output>/<name>``, or check it against the one already there.

    A resumed run must produce rows comparable with the earlier ones, so the fields that shape
    the rows (model versions, classes, columns) must match; a mismatch is a ``ValueError``.
    ``absent`` gives, for keys newer than some configs, what a config without the key implies
    for the results already written; a config without results yet simply gains the key.
    """
    uri = storage.join(output, name)
    if storage.exists(uri):
        try:
            existing = json.loads(storage.read_bytes(uri))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: invalid JSON ({exc})") from None
        absent = absent or {}
        new_keys = [key for key in expected if key not in existing and key in absent]
        fresh = bool(new_keys) and not result_files(output)
        if fresh:
            existing.update({key: expected[key] for key in new_keys})
        changed = [key for key, value in expected.items()
                   if existing.get(key, absent.get(key)) != value]
        if changed:
            details = "; ".join(f"{key}: {existing.get(key, absent.get(key))!r} there, "
                                f"{expected[key]!r} now" for key in changed)
            raise ValueError(
                f"{output} already holds results made differently ({details}); "
                "write to a new output, or delete the old one to start over")
        if fresh:
            storage.write_bytes(uri, json.dumps(existing, indent=2).encode())
        return
    if result_files(output):
        raise ValueError(f"{output} holds Parquet files that raysky did not write (no {name}); "
                         "choose an empty output")
    storage.makedirs(output)
    storage.write_bytes(uri, json.dumps(expected, indent=2).encode())
