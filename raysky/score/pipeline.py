"""Score an archive with Ray Data: list, decode, segment + classify + explain, write Parquet.

The pipeline streams: decode tasks feed an actor pool that holds the models, PNG encoding and
Parquet writing run as tasks after it, and only a small manifest (one row per written file)
comes back to the driver. Ray Data's backpressure bounds the data in flight, so memory depends
on the batch sizes and the rows per file, not on the size of the archive.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from raysky import storage
from raysky.cluster import TASK_RETRIES, ensure_ray
from raysky.data.images import decode_batch_memory
from raysky.progress import Progress, format_duration
from raysky.results import reader, summary
from raysky.results.columns import output_schema
from raysky.score import lock as output_lock
from raysky.score import output as out
from raysky.score import stages
from raysky.score.inputs import Inputs, input_rows, list_inputs, lost_ids
from raysky.score.settings import ScoreSettings

if TYPE_CHECKING:
    import ray.data

RUN_CONFIG = "_raysky_score.json"
RESULTS_FORMAT = "raysky-results/2"
"""Version 2: archive ids from each file's own name, and the ``error_kind`` column."""
WRITE_CPUS = 0.25

ISOLATE_AT_MOST = 256
"""Inputs left without a row are scored again one per task, to find the one at fault, when
there are at most this many (or 2% of the run); more means something systematic, and the run
stops instead."""

CRASHED_AT_MOST = 3
"""Inputs that still kill their worker when scored alone get an error row; more than this (or
1% of the run) looks like a broken worker rather than bad files, and the run stops instead."""

CRASH_REASON = (f"the worker scoring this image died {TASK_RETRIES + 1} times, also with the "
                "image alone (out of memory, or a crash in the image decoder or the model)")


@dataclass
class ScoreSummary:
    """What a run did (``scored`` rows this run, ``skipped`` already there, ``warnings`` rows
    scored with a warning) and what the whole output now holds (``totals``, from
    :func:`raysky.results.summarize`). ``listing_s`` is the time spent before the pipeline
    started (listing, reading what the output holds, planning) and ``first_result_s`` the time
    until the first written file came back."""

    output: str
    run_id: str
    inputs: int
    skipped: int
    scored: int
    scored_ok: int
    scored_error: int
    files: int
    elapsed_s: float
    totals: dict = field(default_factory=dict)
    retried_transient: int = 0
    warnings: int = 0
    listing_s: float = 0.0
    first_result_s: float | None = None

    @property
    def images_per_s(self) -> float:
        """Throughput of this run, over its whole wall time (listing and start-up included)."""
        return self.scored / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form."""
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3)}

    def format(self) -> str:
        """The summary printed at the end of ``raysky score``."""
        head = (f"scored {self.scored} of {self.inputs} inputs ({self.scored_ok} ok, "
                f"{self.scored_error} error; {self.skipped} already done) into {self.files} "
                f"files in {format_duration(self.elapsed_s)}: {self.images_per_s:.1f} img/s")
        if self.retried_transient:
            head += f"\nretried {self.retried_transient} inputs that had failed transiently"
        if self.warnings:
            head += (f"\n{self.warnings} inputs scored with a warning (see the results' "
                     "warning column)")
        body = summary.format_summary(self.totals) if self.totals else ""
        return f"{head}\n{self.output}\n{body}".rstrip()


def _pool(settings: ScoreSettings):
    """The model stage's actor pool: fixed when ``workers`` is set, else 1 to what fits."""
    import ray
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources()
    if settings.workers:
        held = settings.workers * settings.cpus_per_worker
        if resources.get("CPU", 0) - held < 1 and len([n for n in ray.nodes() if n["Alive"]]) <= 1:
            # The pool would hold every CPU and the decode/encode tasks feeding it could never run.
            raise ValueError(
                f"{settings.workers} model worker(s) x {settings.cpus_per_worker} CPU leave none of "
                f"the cluster's {resources.get('CPU', 0):g} CPUs for decoding; lower workers or "
                "cpus_per_worker, or leave workers unset to size the pool automatically")
        return ActorPoolStrategy(size=settings.workers)
    if settings.gpus_per_worker > 0:
        fit = resources.get("GPU", 0) / settings.gpus_per_worker
    else:
        # Leave a CPU per worker for the decode and write tasks that feed it.
        fit = resources.get("CPU", 1) / (settings.cpus_per_worker + 1)
    return ActorPoolStrategy(min_size=1, max_size=max(1, int(fit)))


@dataclass
class Written:
    """What a run's ``write_batch`` stage reported: the files it wrote and their row counts."""

    files: set[str] = field(default_factory=set)
    rows: int = 0
    errors: int = 0
    warnings: int = 0
    first_at: float | None = None
    """``time.monotonic()`` when the first file was reported."""


def publish_manifest(manifest: pa.Table, output: str, written: Written,
                     progress: Progress | None = None) -> None:
    """Publish the files that manifest rows from :func:`~raysky.score.stages.write_batch`
    report, and add them to ``written``."""
    for row in manifest.to_pylist():
        written.files.add(out.publish(output, row["file"]))
        written.first_at = written.first_at or time.monotonic()
        written.rows += row["rows"]
        written.errors += row["error"]
        written.warnings += row.get("warnings") or 0
        if progress:
            progress.update(row["rows"], extra=f"{written.errors} errors")


def collect_written(ds, output: str, run_id: str, progress: Progress | None = None,
                    lock: output_lock.OutputLock | None = None,
                    written: Written | None = None) -> Written:
    """Run a dataset that ends in :func:`~raysky.score.stages.write_batch`, publish each file
    its manifest rows report and tally them (into ``written`` when given), then delete the
    files of this run that no manifest reported (duplicates left by retried tasks), so each
    input keeps exactly one row. A ``lock`` lost on the way (see :mod:`raysky.score.lock`)
    stops the run."""
    written = written if written is not None else Written()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if lock is not None:
            lock.check()
        publish_manifest(batch, output, written, progress)
    orphans = out.remove_orphans(output, run_id)
    if orphans:
        print(f"removed {len(orphans)} duplicate files left by retried tasks", file=sys.stderr)
    return written


def input_blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """Slice the driver's input table into blocks: enough to spread decoding over the cluster,
    few enough (at most about 256 for big inputs) to keep the driver's bookkeeping small."""
    step = min(1024, max(batch_size, math.ceil(table.num_rows / 256)))
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]


def _map_stage(ds, fn, **kwargs):
    """``ds.map_batches(fn, ...)`` on Arrow batches, with a task (or, for an actor pool, each
    batch) retried only :data:`~raysky.cluster.TASK_RETRIES` times after its worker died."""
    retries = "max_task_retries" if "compute" in kwargs else "max_retries"
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these options in favour of named parameters but names none for
        # retries yet, so they remain the only way to bound them.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, batch_format="pyarrow", **kwargs, **{retries: TASK_RETRIES})


def build_dataset(inputs: Inputs, settings: ScoreSettings, classes: tuple[str, ...], run_id: str,
                  one_per_task: bool = False) -> ray.data.Dataset:
    """The lazy Ray Dataset for one run; iterating it yields one manifest row per file written.

    Every task is retried :data:`TASK_RETRIES` times when its worker dies, then its rows are
    dropped and the run goes on (:func:`score_archive` finds them and scores them alone).
    ``one_per_task`` puts each input in its own block, so that one image that kills its
    worker takes no other row with it.
    """
    ds = _input_dataset(inputs, settings.batch_size, one_per_task)
    # A decode task holds the worst decode of one image (up to 37 bytes per pixel for a float
    # TIFF) plus the batch's RGB pixels, so it reserves that much memory; fewer concurrent
    # decodes beat an out-of-memory node. The reservation also keeps Ray Data from fusing
    # decoding into the model actors (it fuses only operators with equal resources), where it
    # would run serially with the model instead of in parallel CPU tasks.
    ds = _map_stage(
        ds, stages.decode_batch, batch_size=settings.batch_size,
        fn_kwargs={"max_pixels": settings.max_pixels, "skip_ids": inputs.skip_ids,
                   "metadata": inputs.metadata},
        memory=decode_batch_memory(settings.batch_size, settings.max_pixels),
    )
    model_stage, model_kwargs = _model_stage(settings, inputs.extra)
    ds = _map_stage(
        ds, model_stage, batch_size=settings.batch_size,
        compute=_pool(settings), num_cpus=settings.cpus_per_worker,
        num_gpus=settings.gpus_per_worker or None, fn_constructor_kwargs=model_kwargs,
    )
    ds = _map_stage(
        ds, stages.encode_batch, batch_size=settings.batch_size,
        fn_kwargs={"schema": output_schema(classes, settings.heatmaps, inputs.extra)},
    )
    # Writing waits on storage more than it computes. Its smaller CPU share also keeps Ray Data
    # from fusing it with the encode stage, which would gather a whole file's worth of raw,
    # uncompressed maps in one task instead of PNGs.
    ds = _map_stage(
        ds, stages.write_batch, batch_size=settings.rows_per_file,
        num_cpus=WRITE_CPUS, fn_kwargs={"output": settings.output, "run_id": run_id,
                   "rows_per_file": settings.rows_per_file},
    )
    # No stage raises on a bad input, so a failed block is a worker that died TASK_RETRIES + 1
    # times (the pool restarts dead actors: Ray Data's default). Its rows are missing
    # afterwards and are dealt with one by one instead of aborting the run.
    ds.context.max_errored_blocks = -1
    return ds


def _input_dataset(inputs: Inputs, batch_size: int, one_per_task: bool):
    """The rows to score: the listed table in blocks of ``batch_size`` (or one row per block),
    or the Parquet shards that hold them."""
    import ray

    if inputs.table is not None:
        blocks = ([inputs.table.slice(i, 1) for i in range(inputs.table.num_rows)] if one_per_task
                  else input_blocks(inputs.table, batch_size))
        return ray.data.from_arrow(blocks)
    fs, _ = storage.resolve(inputs.shards[0])
    paths = [storage.resolve(uri)[1] for uri in inputs.shards]
    return ray.data.read_parquet(paths, filesystem=fs, columns=inputs.shard_columns)


def _model_stage(settings: ScoreSettings, extra: pa.Schema | None) -> tuple[type, dict]:
    """The model actor's class and constructor arguments for ``settings.engine``."""
    if settings.engine == "onnx":
        from raysky.score.onnx_engine import OnnxScoreModel, exported_models

        return OnnxScoreModel, {
            **exported_models(settings.segmenter, settings.classifier),
            "threads": settings.cpus_per_worker, "tta": settings.tta, "extra": extra}
    return stages.ScoreModel, {
        "segmenter": settings.segmenter, "classifier": settings.classifier,
        "heatmaps": settings.heatmaps, "use_gpu": settings.gpus_per_worker > 0,
        "precision": settings.precision, "threads": settings.cpus_per_worker,
        "tta": settings.tta, "extra": extra,
    }


def _model_facts(settings: ScoreSettings) -> dict:
    """Versions and classes from the checkpoints' JSON, checked (kinds and weights' hashes)
    before any worker starts, so a damaged checkpoint fails the run before it writes a row."""
    from raysky.models.checkpoint import WEIGHTS_FILE, read_checkpoint_meta, verify_weights

    seg = read_checkpoint_meta(settings.segmenter, "segmenter")
    cls = read_checkpoint_meta(settings.classifier, "classifier")
    for meta, uri in ((seg, settings.segmenter), (cls, settings.classifier)):
        verify_weights(uri, meta, storage.read_bytes(storage.join(uri, WEIGHTS_FILE)))
    return {"format": RESULTS_FORMAT, "segmenter_version": seg["version"],
            "classifier_version": cls["version"], "classes": list(cls["classes"]),
            "heatmaps": settings.heatmaps}


NEW_CONFIG_KEYS: dict = {"extra_columns": []}
"""Run-config keys newer than some outputs, and what an output without them holds."""


def _extra_facts(inputs: Inputs) -> dict:
    """The manifest columns a run passes through, with their types: every file of an output
    must have the same columns, so a rerun with other columns is refused."""
    extra = inputs.extra or pa.schema([])
    return {"extra_columns": [[f.name, str(f.type)] for f in extra]}


def _score_alone(lost: pa.Array, inputs: Inputs, settings: ScoreSettings, facts: dict,
                 run_id: str, lock: output_lock.OutputLock, written: Written) -> None:
    """Score the inputs that lost their rows to dead workers one per task; give the ones that
    still kill their worker an error row. Stops the run when too many are lost for that to be
    a few bad files (a broken worker, a node that keeps dying): the rows written are kept and
    a re-run scores the rest."""
    classes = tuple(facts["classes"])
    if len(lost) > max(ISOLATE_AT_MOST, inputs.todo // 50):
        raise RuntimeError(
            f"{len(lost)} of {inputs.todo} inputs have no row in {settings.output}: their workers "
            "kept dying (see the errors above), too many for a few bad files. The rows written "
            "are kept; run the same command again to score the rest")
    print(f"{len(lost)} inputs lost their rows to workers that died; scoring them one per task "
          "to find the images at fault", file=sys.stderr)
    alone = Inputs(total=len(lost), todo=len(lost), table=input_rows(inputs, lost),
                   metadata=inputs.metadata, extra=inputs.extra)
    ds = build_dataset(alone, replace(settings, batch_size=1), classes, run_id, one_per_task=True)
    collect_written(ds, settings.output, run_id, lock=lock, written=written)
    crashed = lost_ids(alone, out.done_ids(settings.output))
    if len(crashed) > max(CRASHED_AT_MOST, inputs.todo // 100):
        raise RuntimeError(
            f"{len(crashed)} inputs kill their worker even when scored alone "
            f"({', '.join(map(repr, crashed.to_pylist()[:5]))}): more than a few bad files, so "
            "no error rows were written; see the worker errors above, then run again")
    if len(crashed):
        rows = input_rows(alone, crashed)
        print(f"{len(crashed)} inputs get an error row: {CRASH_REASON} "
              f"({', '.join(map(repr, crashed.to_pylist()[:5]))})", file=sys.stderr)
        table = stages.failure_rows(rows["image_id"].to_pylist(), rows["source_uri"].to_pylist(),
                                    CRASH_REASON, stages.BAD_INPUT,
                                    output_schema(classes, settings.heatmaps, inputs.extra), facts,
                                    inputs=rows)
        lock.check()
        publish_manifest(stages.write_batch(table, settings.output, run_id,
                                            settings.rows_per_file), settings.output, written)


def score_archive(settings: ScoreSettings) -> ScoreSummary:
    """Score every input not yet in ``settings.output`` and return the run's summary.

    Running again into the same output after an interruption scores only what is missing, plus
    the inputs that failed transiently (unless ``retry_transient`` is off);
    :func:`raysky.results.read` then returns exactly one row per input. The run holds the
    output's lock throughout (:mod:`raysky.score.lock`), and writes ``_SUCCESS`` when every
    input has a row.
    """
    settings.validate()
    start = time.monotonic()
    facts = _model_facts(settings)
    run_id = out.new_run_id()
    with output_lock.locked(settings.output, run_id, "score", settings.lock_timeout_s) as held:
        out.check_run_config(settings.output, RUN_CONFIG, facts)
        out.clear_success(settings.output)
        out.remove_stale_temporaries(settings.output)
        retried = (out.forget_transient_errors(settings.output, run_id)
                   if settings.retry_transient else 0)
        existing = out.done_rows(settings.output)
        done = pc.unique(existing["image_id"])
        inputs = list_inputs(settings.input, settings.metadata, done, existing)
        del existing
        out.check_run_config(settings.output, RUN_CONFIG, {**facts, **_extra_facts(inputs)},
                             absent=NEW_CONFIG_KEYS)
        listing_s = time.monotonic() - start
        written = Written()
        if inputs.todo:
            ensure_ray(settings.ray_address)
            progress = Progress("score", total=inputs.todo) if settings.progress else None
            ds = build_dataset(inputs, settings, tuple(facts["classes"]), run_id)
            written = collect_written(ds, settings.output, run_id, progress, held)
            lost = lost_ids(inputs, out.done_ids(settings.output))
            if len(lost):
                _score_alone(lost, inputs, settings, facts, run_id, held, written)
            done = out.done_ids(settings.output)
            missing = len(lost_ids(inputs, done))
            if missing:
                raise RuntimeError(f"{missing} inputs have no row in {settings.output} after the "
                                   "run; run the same command again to score them")
        held.check()
        out.write_success(settings.output, run_id, inputs.total, len(done))
    totals = summary.summarize(settings.output, settings.top) if reader.result_files(
        settings.output) else {}
    return ScoreSummary(
        output=settings.output, run_id=run_id, inputs=inputs.total,
        skipped=inputs.total - inputs.todo, scored=written.rows,
        scored_ok=written.rows - written.errors, scored_error=written.errors,
        files=len(written.files),
        elapsed_s=time.monotonic() - start, totals=totals, retried_transient=retried,
        warnings=written.warnings, listing_s=listing_s,
        first_result_s=None if written.first_at is None else written.first_at - start,
    )
