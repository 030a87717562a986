"""The Ray Data stages of batch scoring: decode, model, encode PNGs, write Parquet.

Every stage takes and returns ``pyarrow.Table`` batches with explicit schemas, so no column ever
becomes a Ray tensor extension type and the files open in any Parquet reader. Decoded pixels,
raw masks and raw heatmaps travel between stages as ``large_binary`` plus ``width``/``height``
(a batch of large images can exceed the 2 GiB that a ``binary`` array can hold); only the
final, compressed PNGs are written, as plain ``binary``.

No stage raises on a bad image: every failure becomes a row with ``status='error'``, a short
reason in ``error`` and its kind in ``error_kind``: ``bad_input`` when the input itself is at
fault (not an image, too large, gone, breaks the model), ``transient`` when reading it failed
for a reason that may pass (S3 throttling, a timeout, a dropped connection) after
:data:`raysky.storage.READ_ATTEMPTS` tries with backoff. A re-run scores transient rows again.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysky import storage
from raysky.data.dicom import DicomFacts, decode_dicom, is_dicom
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png
from raysky.models.runtime import on_torch_thread, set_torch_threads
from raysky.results.columns import INPUT_FACTS, PROB_PREFIX, model_output_schema
from raysky.score.output import write_pieces

if TYPE_CHECKING:  # for the annotation only: ScoreModel imports it where it builds one
    from raysky.inference import LesionPipeline

MAX_INPUT_BYTES = 256 * 1024 * 1024
"""Objects larger than this are not read at all; no dermoscopy image comes near it."""

OK, ERROR = "ok", "error"
BAD_INPUT, TRANSIENT = "bad_input", "transient"
ERROR_KINDS: tuple[str, ...] = (BAD_INPUT, TRANSIENT)
"""Values of ``error_kind`` on error rows (null on ok rows)."""


INPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_uri", pa.string()), ("age", pa.float64()),
    ("sex", pa.string()), ("site", pa.string()),
])
"""Rows entering the decode stage. They may also carry :data:`INPUT_EXTRAS` (and packed
shards ``image``, the object's bytes); any other column (a manifest's own) passes through every
stage to the results unchanged."""
METADATA_FIELDS: tuple[str, ...] = ("age", "sex", "site")
INPUT_EXTRAS: tuple[str, ...] = ("age_source", "sex_source", "site_source", "lesion_id",
                                 "patient_id", "read_error")
"""Optional input columns: where each metadata value came from, the lesion and patient, and
``read_error``: why the input cannot be read at all (an unsafe name, a manifest row that names
no object it may read, a packed object that could not be read)."""
DEVICE_FIELDS: tuple[str, ...] = ("manufacturer", "manufacturer_model", "polarization",
                                  "contact_method")
"""Header facts of a DICOM input, null for other inputs."""
_STAGE_COLUMNS = frozenset({*INPUT_SCHEMA.names, *INPUT_EXTRAS, "image"})

DECODED_SCHEMA = pa.schema([
    *INPUT_SCHEMA, *((name, pa.string()) for name in INPUT_EXTRAS if name != "read_error"),
    *((name, pa.string()) for name in DEVICE_FIELDS), ("warning", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("error_kind", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("pixels", pa.large_binary()),
])
"""Rows leaving the decode stage, followed by the columns passed through."""

MANIFEST_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()),
                             ("error", pa.int64()), ("warnings", pa.int64())])


def carried_columns(names: Sequence[str]) -> list[str]:
    """The columns of an input batch that no stage reads and every stage passes through."""
    return [name for name in names if name not in _STAGE_COLUMNS]


def failure_rows(image_ids: Sequence[str], source_uris: Sequence[str], reason: str, kind: str,
                 schema: pa.Schema, versions: dict,
                 inputs: pa.Table | None = None) -> pa.Table:
    """Error rows in ``schema`` for inputs that no stage could turn into a row of their own
    (their worker died on them): ``reason`` in ``error``, ``kind`` in ``error_kind``, and the
    model versions of the run from ``versions``. ``inputs`` (their input rows, in the same
    order) supplies what is known about them: metadata, lesion, a manifest's own columns."""
    count = len(image_ids)
    now = dt.datetime.now(dt.timezone.utc)
    columns: dict[str, list] = {name: [None] * count for name in schema.names}
    if inputs is not None:
        columns.update({name: inputs[name].to_pylist() for name in schema.names
                        if name in inputs.column_names})
    columns.update({
        "image_id": list(image_ids), "source_uri": list(source_uris), "status": [ERROR] * count,
        "error": [reason] * count, "error_kind": [kind] * count, "scored_at": [now] * count,
        "segmenter_version": [versions["segmenter_version"]] * count,
        "classifier_version": [versions["classifier_version"]] * count,
    })
    return pa.table(columns, schema=schema)


# ---------------------------------------------------------------------------------------------
# Decode (CPU tasks)
# ---------------------------------------------------------------------------------------------


def read_limited(uri: str, limit: int = MAX_INPUT_BYTES,
                 attempts: int = storage.READ_ATTEMPTS) -> bytes:
    """Read one object, refusing (with :class:`ImageDecodeError`) anything over ``limit`` bytes.

    Transient ``OSError``s are retried by :func:`raysky.storage.read_bytes`, and raised when
    the last of ``attempts`` tries fails too.
    """
    data = storage.read_bytes(uri, limit=limit, attempts=attempts)
    if len(data) > limit:
        raise ImageDecodeError(uri, f"file too large (over {limit} bytes)")
    return data


def read_failure(exc: Exception) -> tuple[str, str]:
    """``(error, error_kind)`` for an exception met while reading and decoding one input."""
    if isinstance(exc, ImageDecodeError):
        return exc.reason, BAD_INPUT
    if isinstance(exc, FileNotFoundError):
        return "file not found", BAD_INPUT
    if isinstance(exc, OSError):
        return f"cannot read file ({exc})", TRANSIENT
    return f"cannot decode ({type(exc).__name__}: {exc})", BAD_INPUT


def _decode_one(uri: str, data: bytes | None, read_error: str | None, max_pixels: int
                ) -> tuple[str | None, str | None, int | None, int | None, bytes | None,
                           DicomFacts | None]:
    """Return ``(error, error_kind, width, height, pixels, dicom facts)``; either error or
    pixels is set, and the facts for a DICOM input."""
    if read_error:
        # The input could not be read when it was listed or packed; nothing to read now.
        return read_error, BAD_INPUT, None, None, None, None
    facts = None
    try:
        if data is None:
            data = read_limited(uri)
        if is_dicom(data):
            image, facts = decode_dicom(data, source=uri, max_pixels=max_pixels)
        else:
            image = decode_image(data, source=uri, max_pixels=max_pixels)
    except Exception as exc:  # a batch job must not die on one input, whatever went wrong
        return (*read_failure(exc), None, None, None, None)
    pixels = np.asarray(image, dtype=np.uint8).tobytes()
    return None, None, image.width, image.height, pixels, facts


def _column(batch: pa.Table, name: str) -> list:
    return batch[name].to_pylist() if name in batch.column_names else [None] * batch.num_rows


def _input_metadata(batch: pa.Table, metadata: pa.Table | None) -> dict[str, list]:
    """Each row's age, sex and site with their sources (see
    :data:`raysky.results.columns.SOURCES`); ``metadata`` (a ``--metadata`` CSV joined by id, for
    packed shards) replaces the rows' own. A value without a recorded source was joined from
    a metadata CSV (by ``raysky pack``)."""
    columns = {name: _column(batch, name) for name in METADATA_FIELDS}
    sources = {name: _column(batch, f"{name}_source") for name in METADATA_FIELDS}
    if metadata is not None:
        index = {row["image_id"]: row for row in metadata.to_pylist()}
        ids = batch["image_id"].to_pylist()
        for name in METADATA_FIELDS:
            columns[name] = [index.get(i, {}).get(name) for i in ids]
            sources[name] = [None] * len(ids)
    for name in METADATA_FIELDS:
        sources[name] = [source or ("metadata" if value is not None else None)
                         for value, source in zip(columns[name], sources[name], strict=True)]
    return {**columns, **{f"{name}_source": sources[name] for name in METADATA_FIELDS}}


def _fill_from_dicom(columns: dict[str, list], i: int, facts: DicomFacts) -> str | None:
    """Fill row ``i``'s unknown metadata and device facts from its DICOM header; return the
    warning worth keeping (a malformed PatientAge, where no other age was given)."""
    for name in METADATA_FIELDS:
        value = getattr(facts, name)
        if columns[name][i] is None and value is not None:
            columns[name][i] = value
            columns[f"{name}_source"][i] = "dicom"
    for name in DEVICE_FIELDS:
        columns[name][i] = getattr(facts, name)
    return facts.warning if columns["age"][i] is None else None


def decode_batch(batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS,
                 skip_ids: pa.Array | None = None, metadata: pa.Table | None = None) -> pa.Table:
    """Decode a batch of input rows into RGB pixels; failures become ``error`` rows.

    Rows come either with a URI to read (a raw prefix, a manifest) or with the bytes already
    in ``image`` (packed shards); ``read_error`` marks an input that cannot be read at all.
    DICOM objects are decoded with :func:`raysky.data.dicom.decode_dicom`, and their header
    fills the metadata no other source gave, and the device columns. ``skip_ids`` drops inputs
    already scored (resume over shards). ``metadata`` (``image_id, age, sex, site``) replaces
    the rows' own metadata by image id; ids it lacks get unknown metadata. Columns this stage
    does not know are passed through.
    """
    if skip_ids is not None and len(skip_ids):
        batch = batch.filter(pc.invert(pc.is_in(batch["image_id"], value_set=skip_ids)))
    uris = batch["source_uri"].to_pylist()
    columns: dict[str, list] = {
        "image_id": batch["image_id"].to_pylist(), "source_uri": uris,
        **_input_metadata(batch, metadata),
        "lesion_id": _column(batch, "lesion_id"), "patient_id": _column(batch, "patient_id"),
        **{name: [None] * batch.num_rows for name in
           (*DEVICE_FIELDS, "warning", "status", "error", "error_kind", "width", "height",
            "pixels")},
    }
    images, read_errors = _column(batch, "image"), _column(batch, "read_error")
    for i, (uri, data, read_error) in enumerate(zip(uris, images, read_errors, strict=True)):
        error, kind, width, height, raw, facts = _decode_one(uri, data, read_error, max_pixels)
        if facts is not None:
            columns["warning"][i] = _fill_from_dicom(columns, i, facts)
        columns["status"][i] = ERROR if error else OK
        columns["error"][i], columns["error_kind"][i] = error, kind
        columns["width"][i], columns["height"][i], columns["pixels"][i] = width, height, raw
    decoded = pa.table(columns, schema=DECODED_SCHEMA)
    for name in carried_columns(batch.column_names):
        decoded = decoded.append_column(batch.schema.field(name), batch[name])
    return decoded


# ---------------------------------------------------------------------------------------------
# Model (actor pool)
# ---------------------------------------------------------------------------------------------


class ScoreModel:
    """Callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``.

    Each actor loads both checkpoints once into a :class:`raysky.inference.LesionPipeline`,
    the same pipeline the live endpoint uses, and scores batches of decoded rows: prediction
    and Grad-CAM come from one pass. Rows that failed to decode pass through unchanged.
    Ray Data calls the constructor and the batches on different threads, so the model work
    runs on the actor's one torch thread (see :func:`raysky.models.runtime.on_torch_thread`).
    """

    def __init__(self, segmenter: str, classifier: str, heatmaps: bool = True,
                 use_gpu: bool = False, precision: str = "fp32", threads: int | None = None,
                 tta: bool = False, extra: pa.Schema | None = None):
        from raysky.inference import LesionPipeline

        # Ray pins OMP_NUM_THREADS=1 in actors; use the CPUs this actor was granted instead.
        on_torch_thread(set_torch_threads, threads)
        self._set_pipeline(on_torch_thread(LesionPipeline.from_uris, segmenter, classifier,
                                           use_gpu=use_gpu, precision=precision, tta=tta),
                           heatmaps, extra)

    def _set_pipeline(self, pipeline: LesionPipeline, heatmaps: bool, extra: pa.Schema | None) -> None:
        """Adopt ``pipeline`` and derive what :meth:`__call__` writes from it: the row schema
        and the input columns carried to each row. Every engine's constructor ends here
        (:class:`raysky.score.onnx_engine.OnnxScoreModel` too), so a new column or carried
        fact reaches all of them at once."""
        self.pipeline = pipeline
        self.heatmaps = heatmaps
        self.classes = pipeline.classes
        self.schema = model_output_schema(self.classes, heatmaps, extra)
        # What is known about each input rides along to its results row.
        self.carried = [name for name, _type in INPUT_FACTS] + list((extra or pa.schema([])).names)

    def _predict(self, images: list[np.ndarray], metadata: list[dict]) -> list:
        """Predictions for a batch; if the batch fails, images are retried one by one so that
        only the image that breaks the model gets an error."""
        try:
            return self.pipeline(images, metadata, explain=self.heatmaps)
        except Exception as exc:
            if len(images) == 1:
                return [f"scoring failed ({type(exc).__name__}: {exc})"]
        return [self._predict([image], [meta])[0] for image, meta in zip(images, metadata, strict=True)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the ``ok`` rows of a decoded batch and return model-stage rows."""
        rows = batch.drop_columns(["pixels"]).to_pylist()
        pixels = batch["pixels"].to_pylist()
        todo = [i for i, row in enumerate(rows) if row["status"] == OK]
        images = [
            # A copy: Arrow buffers are read-only and torch warns on non-writable arrays.
            np.frombuffer(pixels[i], dtype=np.uint8).reshape(rows[i]["height"], rows[i]["width"], 3).copy()
            for i in todo
        ]
        metadata = [{key: rows[i][key] for key in ("age", "sex", "site")} for i in todo]
        scored = on_torch_thread(self._predict, images, metadata) if todo else []
        predictions = dict(zip(todo, scored, strict=True))
        del images, pixels
        now = dt.datetime.now(dt.timezone.utc)
        out: dict[str, list] = {name: [] for name in self.schema.names}
        for i, row in enumerate(rows):
            result = predictions.get(i)
            if isinstance(result, str):
                row = {**row, "status": ERROR, "error": result, "error_kind": BAD_INPUT}
                result = None
            values = {
                "image_id": row["image_id"], "source_uri": row["source_uri"],
                "status": row["status"], "error": row["error"],
                "error_kind": row["error_kind"], "width": row["width"],
                "height": row["height"], "segmenter_version": self.pipeline.segmenter_version,
                "classifier_version": self.pipeline.classifier_version,
                "calibration_version": self.pipeline.calibration_version, "scored_at": now,
                **{name: row.get(name) for name in self.carried},
            }
            if result is not None:
                values.update({
                    "predicted_class": result.predicted_class,
                    "malignant_prob": result.malignant_prob,
                    "refer": result.refer, "ood_score": result.ood_score, "ood": result.ood,
                    "ita_deg": result.ita_deg, "skin_tone": result.skin_tone,
                    "mask_raw": result.mask.astype(np.uint8).tobytes(),
                    "lesion_area_frac": result.lesion_area_frac,
                    "lesion_focus": None if math.isnan(result.lesion_focus) else result.lesion_focus,
                })
                values.update({f"{PROB_PREFIX}{code}": float(p)
                               for code, p in zip(self.classes, result.probabilities, strict=True)})
                if self.heatmaps and result.heatmap is not None:
                    values["heatmap_raw"] = np.rint(result.heatmap * 255.0).astype(np.uint8).tobytes()
            for name in out:
                out[name].append(values.get(name))
        return pa.table(out, schema=self.schema)


# ---------------------------------------------------------------------------------------------
# Encode PNGs and write (CPU tasks)
# ---------------------------------------------------------------------------------------------


def _png(raw: bytes | None, width: int, height: int, is_mask: bool) -> bytes | None:
    if raw is None:
        return None
    array = np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
    return encode_png(array, mask=is_mask)


def encode_batch(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Turn the model stage's raw masks and heatmaps into PNGs at the original size."""
    widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
    columns = {}
    for name in schema.names:
        if name in ("mask_png", "heatmap_png"):
            raw = batch[name.replace("_png", "_raw")].to_pylist()
            columns[name] = [_png(r, w, h, name == "mask_png")
                             for r, w, h in zip(raw, widths, heights, strict=True)]
        else:
            columns[name] = batch[name]
    return pa.table(columns, schema=schema)


def write_batch(batch: pa.Table, output: str, run_id: str, rows_per_file: int) -> pa.Table:
    """Write a batch as atomic Parquet files and return one manifest row per file.

    ``error`` counts rows whose ``status`` is not ``ok`` (results) or that carry a
    ``read_error`` (packed shards); ``warnings`` the rows with a ``warning``.
    """
    manifest = {name: [] for name in MANIFEST_SCHEMA.names}
    for uri, piece in write_pieces(batch, output, run_id, rows_per_file) if batch.num_rows else []:
        failed = (pc.not_equal(piece["status"], OK) if "status" in piece.column_names
                  else pc.is_valid(piece["read_error"]))
        ok = piece.num_rows - int(pc.sum(failed).as_py() or 0)
        warned = (int(pc.sum(pc.is_valid(piece["warning"])).as_py() or 0)
                  if "warning" in piece.column_names else 0)
        manifest["file"].append(uri)
        manifest["rows"].append(piece.num_rows)
        manifest["ok"].append(ok)
        manifest["error"].append(piece.num_rows - ok)
        manifest["warnings"].append(warned)
    return pa.table(manifest, schema=MANIFEST_SCHEMA)
