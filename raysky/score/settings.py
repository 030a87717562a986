"""The settings of one scoring run (``raysky score``, ``jobs/score_archive.py``) and of the
robustness run that scores one folder per artefact kind (``raysky robustness``)."""

from __future__ import annotations

from dataclasses import dataclass

from raysky import storage
from raysky.audit.artefacts import ARTEFACT_KINDS
from raysky.data.images import DEFAULT_MAX_PIXELS
from raysky.data.records import DatasetRef
from raysky.models.runtime import PRECISIONS
from raysky.score import lock as output_lock
from raysky.settings import TTA_HELP, same_as, setting

ENGINES = ("torch", "onnx")
"""What runs the models of a scoring run (see :mod:`raysky.score.onnx_engine`)."""


@dataclass
class ScoreSettings:
    """Everything one scoring run needs; the CLI and ``jobs/score_archive.py`` fill it in.

    ``input`` is a prefix of image and DICOM files (local or ``s3://``), a manifest
    (:mod:`raysky.data.manifest`) or Parquet shards written by ``raysky pack``. ``workers=None`` lets Ray Data grow the model pool from 1 up to what the
    cluster holds. ``cpus_per_worker`` is also each model worker's torch thread count.
    ``retry_transient`` scores rows that failed for a transient reason again (see
    :mod:`raysky.score.stages`). ``lock_timeout_s`` is how long without a heartbeat before
    another run's lock on ``output`` counts as dead and is taken over.
    """

    input: str = setting(
        help="prefix of .jpg/.jpeg/.png/.dcm objects; a manifest (.csv or .parquet: an image "
        "URI per row, optional image_id, age, sex, site, lesion_id, patient_id, other columns "
        "passed through); or shards written by `raysky pack`")
    output: str = setting(help="results prefix (part-*.parquet files)")
    segmenter: str = setting(help="segmenter checkpoint directory or prefix")
    classifier: str = setting(help="classifier checkpoint directory or prefix")
    metadata: str | None = setting(
        None, help="CSV joined by image id or file path (image_id or image column; age, sex, "
        "localization/anatom_site_general, lesion_id, patient_id); fills what a manifest "
        "leaves empty; images without a row get unknown metadata")
    heatmaps: bool = setting(
        True, help="explain each image with Grad-CAM (without: no heatmap_png column, "
        "lesion_focus left empty)")
    batch_size: int = setting(16, help="images per model call")
    workers: int | None = setting(
        None, help="model workers; default: grow from 1 to what the cluster fits")
    gpus_per_worker: float = setting(
        0.0, help="GPUs per model worker; 0 runs the models on CPU")
    cpus_per_worker: int = setting(2, help="CPUs, and torch threads, per model worker")
    rows_per_file: int = setting(
        1000, help="rows per Parquet file at most (score results, or `raysky pack` shards)")
    precision: str = setting("fp32", help="model precision")
    engine: str = setting(
        "torch", help="what runs the models: torch, or onnx (ONNX Runtime on CPU over "
        "verified exports of both checkpoints, made once per run; needs heatmaps off, fp32 and "
        "pip install 'raysky[onnx]')")
    tta: bool = setting(False, help=TTA_HELP)
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="reject larger images as decompression bombs")
    top: int = setting(10, help="rows listed by malignant_prob in the summary")
    ray_address: str | None = setting(
        None, help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray; use "
        "'auto' for a cluster started with `ray start`)")
    progress: bool = setting(True, help="print progress lines while scoring")
    retry_transient: bool = setting(
        True, help="score again the rows that failed transiently (error_kind 'transient', "
        "e.g. S3 throttling)")
    lock_timeout_s: float = setting(
        output_lock.STALE_AFTER_S, help="take over another run's lock on the output after "
        "this long without its heartbeat")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        checks = [
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.rows_per_file >= 1, f"rows_per_file must be at least 1, got {self.rows_per_file}"),
            (self.workers is None or self.workers >= 1,
             f"workers must be at least 1, got {self.workers}"),
            (self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}"),
            (self.cpus_per_worker >= 1, f"cpus_per_worker must be at least 1, got {self.cpus_per_worker}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
            (self.engine != "onnx" or not self.heatmaps,
             "engine='onnx' needs heatmaps=False: Grad-CAM needs autograd, which an ONNX model "
             "does not have"),
            (self.engine != "onnx" or (self.precision == "fp32" and self.gpus_per_worker == 0),
             "engine='onnx' runs fp32 on CPUs: leave precision at fp32 and gpus_per_worker at 0"),
            (self.max_pixels >= 1, f"max_pixels must be positive, got {self.max_pixels}"),
            (self.lock_timeout_s > 0, f"lock_timeout_s must be positive, got {self.lock_timeout_s}"),
            (storage.resolve(self.input) != storage.resolve(self.output),
             f"output {self.output} must differ from input {self.input}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class RobustnessSettings:
    """One robustness run: the models, the data, the artefacts and where the work goes.

    ``out`` is a local folder that this command owns (an existing one must hold an earlier
    robustness run). ``limit`` scores a seeded sample of that many images. The scoring
    fields are passed to :class:`raysky.score.ScoreSettings`.
    """

    segmenter: str = setting(help="segmenter checkpoint")
    classifier: str = setting(help="classifier checkpoint")
    data: str = setting(help="dataset: local folder or s3:// prefix")
    format: str = setting(help="layout of the dataset")
    out: str = setting("robustness", help="local working and output folder")
    split: str | None = setting(
        None, help="one split: for isic2018 Training, Validation or Test; otherwise train, val "
        "or test of the splits.csv at the dataset root")
    metadata: str | None = setting(None, help="metadata CSV, for the archive format")
    artefacts: tuple[str, ...] = setting(ARTEFACT_KINDS, help="artefact types")
    limit: int | None = setting(None, help="a seeded sample of this many images instead of all")
    seed: int = setting(0, help="artefacts, sample and bootstrap seed")
    replicates: int = setting(200, help="bootstrap replicates for the intervals")
    # Handed on to ScoreSettings, so they mean what its fields mean (batch_size: smaller here).
    batch_size: int = same_as(ScoreSettings, "batch_size", default=8)
    workers: int | None = same_as(ScoreSettings, "workers")
    cpus_per_worker: int = same_as(ScoreSettings, "cpus_per_worker")
    gpus_per_worker: float = same_as(ScoreSettings, "gpus_per_worker")
    ray_address: str | None = same_as(ScoreSettings, "ray_address")
    progress: bool = same_as(ScoreSettings, "progress")

    def dataset(self) -> DatasetRef:
        """The dataset the images come from, with its split."""
        return DatasetRef(self.data, self.format, self.metadata, self.split)

    def identity(self) -> dict:
        """What decides the images and results: a run with the same identity may resume."""
        keys = ("segmenter", "classifier", "data", "format", "split", "metadata", "limit", "seed")
        return {k: getattr(self, k) for k in keys} | {"artefacts": list(self.artefacts)}
