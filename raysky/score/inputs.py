"""What a scoring run scores: the inputs under a prefix, in a manifest or in packed shards,
joined with their metadata, minus what the output already holds; and, after a run, which of them
still lack a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raysky import storage
from raysky.data.archive import join_metadata, list_archive
from raysky.data.manifest import SOURCE, is_manifest_uri, read_manifest
from raysky.data.records import LesionRecord
from raysky.results import reader
from raysky.results.columns import model_output_schema, output_schema
from raysky.score import stages

PACK_MARKER = "_raysky_pack.json"
"""Written by ``raysky pack`` at the top of its output; marks a prefix of shards."""


@dataclass
class Inputs:
    """What to score: a table of rows to decode (a raw prefix or a manifest), or shard files
    (packed input). ``extra`` holds a manifest's own columns, which the results carry too."""

    total: int
    todo: int
    table: pa.Table | None = None
    shards: list[str] | None = None
    shard_columns: list[str] | None = None
    skip_ids: pa.Array | None = None
    metadata: pa.Table | None = None
    extra: pa.Schema | None = None


def is_packed(uri: str) -> bool:
    """True when ``uri`` holds shards from ``raysky pack``: a prefix with its marker, or one
    ``.parquet`` file with the shards' ``image`` bytes column (any other is a manifest)."""
    uri = str(uri)
    if uri.lower().endswith(".parquet"):
        return "image" in reader.schema(uri).names
    return storage.exists(storage.join(uri, PACK_MARKER))


def kept_ids(existing: pa.Table | None, uris: pa.Array | list[str]) -> dict[str, str]:
    """``source URI -> image id`` for the ``uris`` that already have a row in ``existing``
    (an output's ``image_id`` and ``source_uri``), so their ids never change on a rerun."""
    if existing is None or not existing.num_rows or not len(uris):
        return {}
    uris = uris if isinstance(uris, pa.Array) else pa.array(uris, pa.string())
    known = existing.filter(pc.is_valid(existing["source_uri"]))
    where = pc.index_in(uris, value_set=known["source_uri"])
    matched = pc.is_valid(where)
    return dict(zip(uris.filter(matched).to_pylist(),
                    known["image_id"].take(where.filter(matched)).to_pylist(), strict=True))


def _metadata_columns(ids: list[str], metadata_uri: str, paths: list[str] | None = None,
                      source: str = "metadata") -> dict[str, list]:
    """Age, sex, site (with their source), lesion and patient of ``ids`` from a metadata
    CSV, joined by the archive reader's own rules."""
    records = join_metadata([LesionRecord(image_id=i, image_uri="") for i in ids], metadata_uri,
                            paths)
    columns = {name: [getattr(r, name) for r in records]
               for name in ("age", "sex", "site", "lesion_id", "patient_id")}
    for name in stages.METADATA_FIELDS:
        columns[f"{name}_source"] = [source if v is not None else None for v in columns[name]]
    return columns


def _archive_table(uri: str, metadata_uri: str | None, existing: pa.Table | None) -> pa.Table:
    """The inputs under a raw prefix, their metadata, and a ``read_error`` for unsafe names."""
    listing = list_archive(uri, kept=lambda uris: kept_ids(existing, uris))
    columns: dict[str, list] = {"image_id": listing.image_ids, "source_uri": listing.uris}
    if metadata_uri is not None:
        columns.update(_metadata_columns(listing.image_ids, metadata_uri, listing.paths))
    columns["read_error"] = listing.problems
    return pa.table({name: pa.array(columns.get(name, [None] * len(listing)), kind)
                     for name, kind in _RAW_SCHEMA.items()})


_RAW_SCHEMA: dict[str, pa.DataType] = {
    **dict(zip(stages.INPUT_SCHEMA.names, stages.INPUT_SCHEMA.types, strict=True)),
    **dict.fromkeys(stages.INPUT_EXTRAS, pa.string())}


def _manifest_table(uri: str, metadata_uri: str | None,
                    existing: pa.Table | None) -> tuple[pa.Table, pa.Schema]:
    """A manifest's rows as decode-stage input, its own columns last; ``metadata_uri`` fills
    what the manifest leaves empty."""
    table = read_manifest(uri, kept=lambda uris: kept_ids(existing, uris))
    manifest, extra = table.table, table.extra
    clashing = [name for name in extra.names if name in _RESERVED]
    if clashing:
        raise ValueError(f"{uri}: column(s) {', '.join(map(repr, clashing))} would pass through "
                         "to the results, which have columns of that name; rename them in "
                         "the manifest")
    columns = {name: manifest[name].to_pylist() for name in
               ("image_id", "source_uri", "age", "sex", "site", "lesion_id", "patient_id")}
    for name in stages.METADATA_FIELDS:
        columns[f"{name}_source"] = [SOURCE if v is not None else None for v in columns[name]]
    if metadata_uri is not None:
        joined = _metadata_columns(columns["image_id"], metadata_uri)
        for name in (*stages.METADATA_FIELDS, "lesion_id", "patient_id"):
            for i, value in enumerate(columns[name]):
                if value is None and joined[name][i] is not None:
                    columns[name][i] = joined[name][i]
                    if name in stages.METADATA_FIELDS:
                        columns[f"{name}_source"][i] = "metadata"
    columns["read_error"] = manifest["problem"].to_pylist()
    table = pa.table({name: pa.array(columns[name], kind) for name, kind in _RAW_SCHEMA.items()})
    for field in extra:
        table = table.append_column(field, manifest[field.name])
    return table, extra


def _reserved_names() -> frozenset[str]:

    return frozenset({*output_schema((), True).names, *model_output_schema((), True).names,
                      *stages.DECODED_SCHEMA.names, *stages.INPUT_EXTRAS, "image"})


_RESERVED = _reserved_names()


def list_inputs(uri: str, metadata_uri: str | None = None, done: pa.Array | None = None,
                existing: pa.Table | None = None) -> Inputs:
    """List the inputs of ``uri`` (a prefix, a manifest or packed shards), join
    ``metadata_uri`` by image id, and drop the ids in ``done``.

    A raw prefix is listed with :func:`raysky.data.archive.list_archive` and a manifest read
    with :func:`raysky.data.manifest.read_manifest`; ``existing`` (an output's ``image_id``
    and ``source_uri``) keeps the ids of inputs already there. For packed shards, only the
    ``image_id`` column is read here; the bytes stay in the shards for the workers.
    """
    done = done if done is not None else pa.array([], pa.string())
    if is_manifest_uri(uri) and not is_packed(uri):
        table, extra = _manifest_table(uri, metadata_uri, existing)
    elif not is_packed(uri):
        table, extra = _archive_table(uri, metadata_uri, existing), None
    else:
        return _shard_inputs(uri, metadata_uri, done)
    todo = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=done)))
    return Inputs(total=table.num_rows, todo=todo.num_rows, table=todo, extra=extra)


def _shard_inputs(uri: str, metadata_uri: str | None, done: pa.Array) -> Inputs:
    shards = reader.result_files(uri)
    if not shards:
        raise FileNotFoundError(f"{uri}: no Parquet shards found")
    ids = reader.read_table(shards, ["image_id"]).column("image_id").combine_chunks()
    repeated = reader.duplicate_ids(ids)
    if repeated:
        raise ValueError(f"{uri}: {len(repeated)} image ids appear in several shard rows "
                         f"({', '.join(map(repr, repeated[:5]))}); pack each object once")
    unsafe = [i for i in ids.to_pylist() if storage.name_problem(i, nested=False)]
    if unsafe:
        raise ValueError(f"{uri}: {len(unsafe)} shard rows have unsafe image ids "
                         f"({', '.join(map(repr, unsafe[:5]))}): "
                         f"{storage.name_problem(unsafe[0], nested=False)}")
    available = set(reader.read_table(shards[:1]).schema.names)
    if not {"image_id", "source_uri", "image"} <= available:
        raise ValueError(f"{shards[0]}: shards need columns image_id, source_uri and image "
                         f"(found {', '.join(sorted(available))})")
    columns = [c for c in (*stages.INPUT_SCHEMA.names, *stages.INPUT_EXTRAS, "image")
               if c in available]
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
    records = join_metadata([LesionRecord(image_id=i, image_uri="") for i in ids], metadata_uri)
    return pa.table({"image_id": ids, **{name: [getattr(r, name) for r in records]
                                         for name in stages.METADATA_FIELDS}})


def lost_ids(inputs: Inputs, done: pa.Array) -> pa.Array:
    """The ids of this run's inputs that have no row in the output (``done``)."""
    if inputs.table is not None:
        ids = inputs.table["image_id"]
    else:
        ids = reader.read_table(inputs.shards, ["image_id"]).column("image_id")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ids.filter(pc.invert(pc.is_in(ids, value_set=done)))


def input_rows(inputs: Inputs, ids: pa.Array) -> pa.Table:
    """The input rows (with the image bytes, for packed shards) of ``ids``."""
    if inputs.table is not None:
        return inputs.table.filter(pc.is_in(inputs.table["image_id"], value_set=ids))
    return reader.read_table(inputs.shards, inputs.shard_columns,
                              row_filter=pc.field("image_id").isin(ids.to_pylist()))
