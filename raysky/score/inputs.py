"""What a scoring run scores: the inputs under a prefix or in packed shards, joined with their
metadata, minus what the output already holds; and, after a run, which of them still lack a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raysky import storage
from raysky.score import results, stages

PACK_MARKER = "_raysky_pack.json"
"""Written by ``raysky pack`` at the top of its output; marks a prefix of shards."""


@dataclass
class Inputs:
    """What to score: a table of rows to decode (raw prefix), or shard files (packed input)."""

    total: int
    todo: int
    table: pa.Table | None = None
    shards: list[str] | None = None
    shard_columns: list[str] | None = None
    skip_ids: pa.Array | None = None
    metadata: pa.Table | None = None


def is_packed(uri: str) -> bool:
    """True when ``uri`` holds shards from ``raysky pack`` (or is one ``.parquet`` file)."""
    return str(uri).endswith(".parquet") or storage.exists(storage.join(uri, PACK_MARKER))


def _records_metadata(records) -> dict[str, list]:
    return {"age": [r.age for r in records], "sex": [r.sex for r in records],
            "site": [r.site for r in records]}


def list_inputs(uri: str, metadata_uri: str | None = None, done: pa.Array | None = None) -> Inputs:
    """List the inputs under ``uri``, join ``metadata_uri`` by image id, and drop ``done`` ids.

    A raw prefix is listed with :func:`raysky.data.readers.read_archive`. For packed shards,
    only the ``image_id`` column is read here; the bytes stay in the shards for the workers.
    """
    from raysky.data.readers import read_archive

    done = done if done is not None else pa.array([], pa.string())
    if not is_packed(uri):
        records = read_archive(uri, metadata_uri)
        table = pa.table({
            "image_id": [r.image_id for r in records], "source_uri": [r.image_uri for r in records],
            **_records_metadata(records),
        }, schema=stages.INPUT_SCHEMA)
        todo = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=done)))
        return Inputs(total=table.num_rows, todo=todo.num_rows, table=todo)

    shards = results.result_files(uri)
    if not shards:
        raise FileNotFoundError(f"{uri}: no Parquet shards found")
    ids = results.read_table(shards, ["image_id"]).column("image_id").combine_chunks()
    repeated = results.duplicate_ids(ids)
    if repeated:
        raise ValueError(f"{uri}: {len(repeated)} image ids appear in several shard rows "
                         f"({', '.join(map(repr, repeated[:5]))}); pack each object once")
    unsafe = [i for i in ids.to_pylist() if storage.name_problem(i, nested=False)]
    if unsafe:
        raise ValueError(f"{uri}: {len(unsafe)} shard rows have unsafe image ids "
                         f"({', '.join(map(repr, unsafe[:5]))}): "
                         f"{storage.name_problem(unsafe[0], nested=False)}")
    available = set(results.read_table(shards[:1]).schema.names)
    if not {"image_id", "source_uri", "image"} <= available:
        raise ValueError(f"{shards[0]}: shards need columns image_id, source_uri and image "
                         f"(found {', '.join(sorted(available))})")
    columns = [c for c in (*stages.INPUT_SCHEMA.names, "image", "read_error") if c in available]
    metadata = None
    if metadata_uri is not None:
        metadata = _shard_metadata(ids.to_pylist(), metadata_uri)
    skipped = int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)
    return Inputs(total=len(ids), todo=len(ids) - skipped, shards=shards, shard_columns=columns,
                  skip_ids=done if len(done) else None, metadata=metadata)


def _shard_metadata(ids: list[str], metadata_uri: str) -> pa.Table:
    """Metadata for shard rows, joined by the archive reader's own rules."""
    # The archive reader's join (id column names, ids with or without extension) is reused so
    # packed and raw input resolve metadata identically.
    from raysky.data.readers import join_metadata
    from raysky.data.records import LesionRecord

    records = join_metadata([LesionRecord(image_id=i, image_uri="") for i in ids], metadata_uri)
    return pa.table({"image_id": ids, **_records_metadata(records)})


def lost_ids(inputs: Inputs, done: pa.Array) -> pa.Array:
    """The ids of this run's inputs that have no row in the output (``done``)."""
    if inputs.table is not None:
        ids = inputs.table["image_id"]
    else:
        ids = results.read_table(inputs.shards, ["image_id"]).column("image_id")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ids.filter(pc.invert(pc.is_in(ids, value_set=done)))


def input_rows(inputs: Inputs, ids: pa.Array) -> pa.Table:
    """The input rows (with the image bytes, for packed shards) of ``ids``."""
    if inputs.table is not None:
        return inputs.table.filter(pc.is_in(inputs.table["image_id"], value_set=ids))
    return results.read_table(inputs.shards, inputs.shard_columns,
                              row_filter=pc.field("image_id").isin(ids.to_pylist()))
