"""``raysky pack``: repack a prefix of small image objects into Parquet shards.

Reading millions of small S3 objects one by one is dominated by per-request latency; shards of
``rows_per_file`` images each are read in large sequential requests instead. A shard row holds
``image_id``, ``source_uri``, the object's bytes (``image``), the metadata joined by image id
(``age``, ``sex``, ``site``, ``lesion_id``, ``label``) and ``read_error``, set when the object
could not be read. Images are not decoded here: a corrupt image is packed as it is, so that
scoring the shards reports it exactly as scoring the raw prefix would.

Packing is resumable the same way scoring is: run it again into the same output and only the
objects not yet in a shard are read. Like scoring, a pack run holds the output's lock, publishes
shards only once the driver has heard of them, and writes ``_SUCCESS`` when it is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raysky.cluster import ensure_ray
from raysky.data.archive import join_metadata, list_archive
from raysky.data.records import LesionRecord
from raysky.progress import Progress
from raysky.score import lock as output_lock
from raysky.score import output as out
from raysky.score.inputs import PACK_MARKER, kept_ids
from raysky.score.pipeline import WRITE_CPUS, Written, collect_written, input_blocks
from raysky.score.stages import MAX_INPUT_BYTES, read_failure, read_limited, write_batch
from raysky.settings import ParameterError

PACK_FORMAT = "raysky-pack/2"
"""Version 2: image ids from each file's own name (see ``read_archive``)."""
RECORD_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_uri", pa.string()), ("age", pa.float64()),
    ("sex", pa.string()), ("site", pa.string()), ("lesion_id", pa.string()), ("label", pa.string()),
    ("patient_id", pa.string()),
])
SHARD_SCHEMA = pa.schema([*RECORD_SCHEMA, ("image", pa.large_binary()), ("read_error", pa.string())])


@dataclass
class PackSummary:
    """What one ``pack`` run did."""

    output: str
    inputs: int
    skipped: int
    packed: int
    read_errors: int
    files: int
    elapsed_s: float

    def format(self) -> str:
        """One line for the CLI."""
        return (f"packed {self.packed} of {self.inputs} objects into {self.files} shards under "
                f"{self.output} ({self.skipped} already packed, {self.read_errors} unreadable) "
                f"in {self.elapsed_s:.1f}s")


def read_objects(batch: pa.Table, max_bytes: int = MAX_INPUT_BYTES) -> pa.Table:
    """Add each row's object bytes (``image``) or the reason they could not be read (kept
    from the listing, for a name that cannot be an id)."""
    images, errors = [], []
    listed = (batch["read_error"].to_pylist() if "read_error" in batch.column_names
              else [None] * batch.num_rows)
    batch = batch.drop_columns([c for c in ("read_error",) if c in batch.column_names])
    for uri, problem in zip(batch["source_uri"].to_pylist(), listed, strict=True):
        if problem:
            images.append(None)
            errors.append(problem)
            continue
        try:
            images.append(read_limited(uri, max_bytes))
            errors.append(None)
        except Exception as exc:  # one unreadable object must not stop the job
            images.append(None)
            errors.append(read_failure(exc)[0])
    return (batch.append_column("image", pa.array(images, pa.large_binary()))
            .append_column("read_error", pa.array(errors, pa.string())))


def _listed_records(input_uri: str, metadata_uri: str | None, existing: pa.Table) -> pa.Table:
    """The objects to pack, in :data:`RECORD_SCHEMA` plus the listing's ``read_error``."""
    listing = list_archive(input_uri, kept=lambda uris: kept_ids(existing, uris))
    records = [LesionRecord(image_id=image_id, image_uri=uri)
               for image_id, uri in zip(listing.image_ids, listing.uris, strict=True)]
    if metadata_uri is not None:
        join_metadata(records, metadata_uri, listing.paths)
    table = pa.table({name: [getattr(r, "image_uri" if name == "source_uri" else name)
                             for r in records] for name in RECORD_SCHEMA.names},
                     schema=RECORD_SCHEMA)
    return table.append_column("read_error", pa.array(listing.problems, pa.string()))


def pack_archive(input_uri: str, output_uri: str, rows_per_file: int = 1000,
                 metadata_uri: str | None = None, ray_address: str | None = None,
                 progress: bool = True) -> PackSummary:
    """Pack every image and DICOM object under ``input_uri`` (see
    :func:`raysky.data.archive.list_archive`) into shards at ``output_uri``. Ids follow
    :mod:`raysky.data.ids`; an object whose name cannot be an id is packed with its
    ``read_error`` and no bytes, so scoring gives it an error row."""

    if rows_per_file < 1:
        raise ParameterError("rows_per_file", rows_per_file, "must be at least 1")
    start = time.monotonic()
    run_id = out.new_run_id()
    with output_lock.locked(output_uri, run_id, "pack") as held:
        out.check_run_config(output_uri, PACK_MARKER, {"format": PACK_FORMAT})
        out.clear_success(output_uri)
        out.remove_stale_temporaries(output_uri)
        table = _listed_records(input_uri, metadata_uri, out.done_rows(output_uri))
        done = out.done_ids(output_uri)
        todo = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=done)))
        written = Written()
        if todo.num_rows:
            import ray

            ensure_ray(ray_address)
            ds = ray.data.from_arrow(input_blocks(todo, 16))
            ds = ds.map_batches(read_objects, batch_size=16, batch_format="pyarrow")
            ds = ds.map_batches(write_batch, batch_size=rows_per_file, batch_format="pyarrow",
                                num_cpus=WRITE_CPUS, fn_kwargs={"output": output_uri,
                                                                "run_id": run_id,
                                                                "rows_per_file": rows_per_file})
            meter = Progress("pack", total=todo.num_rows) if progress else None
            written = collect_written(ds, output_uri, run_id, meter, held)
            done = out.done_ids(output_uri)
        held.check()
        if int(pc.sum(pc.is_in(table["image_id"], value_set=done)).as_py() or 0) == table.num_rows:
            out.write_success(output_uri, run_id, table.num_rows, len(done))
    return PackSummary(output=output_uri, inputs=table.num_rows,
                       skipped=table.num_rows - todo.num_rows, packed=written.rows,
                       read_errors=written.errors, files=len(written.files), elapsed_s=time.monotonic() - start)
