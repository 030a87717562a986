"""The settings of one scoring run (``raysky score``, ``jobs/score_archive.py``) and of the
robustness run that scores one folder per artefact kind (``raysky robustness``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from raysky import storage
from raysky.audit.artefacts import ARTEFACT_KINDS
from raysky.data.images import DEFAULT_MAX_PIXELS
from raysky.data.records import DatasetRef
from raysky.models.runtime import PRECISIONS
from raysky.score import lock as output_lock
from raysky.settings import TTA_HELP, ParameterError, setting

ENGINES = ("torch", "onnx")
"""What runs the models of a scoring run (see :mod:`raysky.score.onnx_engine`)."""


@dataclass(kw_only=True)
class ScoringResources:
    """How a scoring run uses the cluster: batch size, model workers and their CPUs and GPUs,
    which Ray, and whether it prints progress.

    Its own object because a run that scores several folders hands the same choices to each
    folder's :class:`ScoreSettings` (``raysky robustness`` nests one as
    :attr:`RobustnessSettings.score`), while each folder's input and output differ. A whole
    ``ScoreSettings`` could not be nested there: its ``input`` and ``output`` are required and
    would be placeholders that the run overwrites. ``ScoreSettings`` extends this class, so
    each field is declared, with its help and default, once.
    """

    batch_size: int = setting(16, help="images per model call")
    workers: int | None = setting(
        None, help="model workers; default: grow from 1 to what the cluster fits")
    gpus_per_worker: float = setting(
        0.0, help="GPUs per model worker; 0 runs the models on CPU")
    cpus_per_worker: int = setting(2, help="CPUs, and torch threads, per model worker")
    ray_address: str | None = setting(
        None, help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray; use "
        "'auto' for a cluster started with `ray start`)")
    progress: bool = setting(True, help="print progress lines while scoring")

    def resources(self) -> dict:
        """These fields alone, as keyword arguments for a :class:`ScoreSettings` (from a
        ``ScoreSettings`` too, whose other fields stay behind)."""
        return {f.name: getattr(self, f.name) for f in fields(ScoringResources)}

    def validate(self) -> None:
        """Raise :class:`~raysky.settings.ParameterError` naming the first of these fields that
        cannot work; a run that scores several folders calls it before preparing any."""
        _raise_first(self, [
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.workers is None or self.workers >= 1, "workers", "must be at least 1"),
            (self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0"),
            (self.cpus_per_worker >= 1, "cpus_per_worker", "must be at least 1"),
        ])


def _raise_first(settings: object, checks: list[tuple[bool, str, str]]) -> None:
    """Raise a :class:`ParameterError` for the first ``(ok, parameter, problem)`` not ok, with
    the parameter's value read from ``settings``."""
    for ok, parameter, problem in checks:
        if not ok:
            raise ParameterError(parameter, getattr(settings, parameter), problem)


@dataclass(kw_only=True)
class ScoreSettings(ScoringResources):
    """Everything one scoring run needs; the CLI and ``jobs/score_archive.py`` fill it in.

    ``input`` is a prefix of image and DICOM files (local or ``s3://``), a manifest
    (:mod:`raysky.data.manifest`) or Parquet shards written by ``raysky pack``. The fields of
    :class:`ScoringResources` say how the run uses the cluster: ``workers=None`` lets Ray Data
    grow the model pool from 1 up to what the cluster holds, and ``cpus_per_worker`` is also
    each model worker's torch thread count. ``retry_transient`` scores rows that failed for a
    transient reason again (see :mod:`raysky.score.stages`). ``lock_timeout_s`` is how long
    without a heartbeat before another run's lock on ``output`` counts as dead and is taken
    over. Keyword-only: the inherited fields come first and have defaults.
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
    retry_transient: bool = setting(
        True, help="score again the rows that failed transiently (error_kind 'transient', "
        "e.g. S3 throttling)")
    lock_timeout_s: float = setting(
        output_lock.STALE_AFTER_S, help="take over another run's lock on the output after "
        "this long without its heartbeat")

    def validate(self) -> None:
        """Raise :class:`~raysky.settings.ParameterError` naming the first setting that cannot
        work, before any worker starts (the CLI says it with the setting's flag)."""
        super().validate()
        onnx = self.engine == "onnx"
        _raise_first(self, [
            (self.rows_per_file >= 1, "rows_per_file", "must be at least 1"),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}"),
            (self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}"),
            (not onnx or not self.heatmaps, "engine",
             "cannot explain: Grad-CAM needs autograd, which an ONNX model does not have; turn "
             "heatmaps off"),
            (not onnx or (self.precision == "fp32" and self.gpus_per_worker == 0), "engine",
             "runs fp32 on CPUs: leave the precision at fp32 and the GPUs per worker at 0"),
            (self.max_pixels >= 1, "max_pixels", "must be positive"),
            (self.lock_timeout_s > 0, "lock_timeout_s", "must be positive"),
            (storage.resolve(self.input) != storage.resolve(self.output), "output",
             f"must differ from the input {self.input}"),
        ])


ROBUSTNESS_BATCH_SIZE = 8
"""Robustness's own default batch size, half ``raysky score``'s: the same number also sizes the
batches in which the driver process itself writes the altered images and, where the data has no
masks, runs the segmenter, so it is kept small for a driver that shares its machine."""


@dataclass
class RobustnessSettings:
    """One robustness run: the models, the data, the artefacts and where the work goes.

    ``out`` is a local folder that this command owns (an existing one must hold an earlier
    robustness run). ``limit`` scores a seeded sample of that many images. ``score`` is how
    each folder is scored: it nests a :class:`ScoringResources` rather than copying its fields,
    and rather than a whole :class:`ScoreSettings`, whose input, output and metadata the run
    picks per folder. Its batch size defaults to :data:`ROBUSTNESS_BATCH_SIZE`.
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
    tta: bool = setting(False, help=TTA_HELP)
    score: ScoringResources = setting(
        default_factory=lambda: ScoringResources(batch_size=ROBUSTNESS_BATCH_SIZE),
        help="how every folder is scored (batch size, workers, Ray); also the batch size of "
        "writing the altered images")

    def dataset(self) -> DatasetRef:
        """The dataset the images come from, with its split."""
        return DatasetRef(self.data, self.format, self.metadata, self.split)

    def identity(self) -> dict:
        """What decides the images and results: a run with the same identity may resume."""
        keys = ("segmenter", "classifier", "data", "format", "split", "metadata", "limit", "seed",
                "tta")
        return {k: getattr(self, k) for k in keys} | {"artefacts": list(self.artefacts)}
