"""Experiment tracking with MLflow: a training run, and what later commands measure of its
checkpoints, land in one MLflow run.

The driver resolves the tracking URI, checks that the store answers and finds or creates the
run (:func:`start_run`); rank 0 of the training function logs to it through a
:class:`Tracker` (the parameters, the machine's facts, every epoch's metrics), as Ray Train's
own guide does; the driver closes it with the best checkpoint's URI and version as tags
(:func:`finish_run`). ``raysky calibrate``, ``evaluate`` and ``robustness`` add their figures
to the same run given its id (:func:`open_run`).

Tracking never fails the work it records: a store that cannot be reached turns tracking off
with one warning, and the run goes on. MLflow is an optional extra (``raysky[mlflow]``);
asking for tracking without it is an error before anything starts.

Without a URI the store is MLflow's own default, ``sqlite:///mlflow.db`` in the current
folder with artifacts in ``./mlruns`` (MLflow 3 refuses the older ``./mlruns`` file store
unless ``MLFLOW_ALLOW_FILE_STORE=true``), so ``mlflow ui`` started there shows the runs.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

LOCAL_STORE = "sqlite:///mlflow.db"
"""The store used when tracking is asked for without a URI: MLflow's own default."""
LOCAL_DB, LOCAL_ARTIFACTS = "mlflow.db", "mlruns"
DEFAULT_EXPERIMENT = "raysky"
RUN_TAG = "raysky.run_uri"
"""Tag naming the raysky run (``<storage>/<name>``), so a resumed run logs to the same MLflow
run."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow retries an unreachable server for minutes by default; a training run should learn in
seconds that tracking is off. Values already in the environment win."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a parameter value; longer values are cut, with an ellipsis."""

T = TypeVar("T")


def _mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri``, or ``ValueError`` saying how to install MLflow."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise ValueError("MLflow tracking needs the mlflow extra: pip install "
                         f"'raysky[mlflow]' ({exc})") from None
    return MlflowClient(tracking_uri=uri)


def resolve_uri(uri: str) -> tuple[str, str | None]:
    """``(tracking URI, artifact folder)`` for ``uri`` as the user gave it.

    A local sqlite store gets an absolute path (Ray Train workers run in other folders) and
    its artifacts go to ``mlruns`` beside it; a plain folder path means such a store in that
    folder. Servers (``http(s)://``, ``databricks``) and ``file:`` stores keep their own
    artifact locations (``None``).
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        path = os.path.abspath(path)
        return f"sqlite:///{path}", os.path.join(os.path.dirname(path), LOCAL_ARTIFACTS)
    if "://" in uri or uri.startswith(("file:", "databricks")):
        return uri, None
    folder = os.path.abspath(os.path.expanduser(uri))
    return f"sqlite:///{os.path.join(folder, LOCAL_DB)}", os.path.join(folder, LOCAL_ARTIFACTS)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def warn(message: str) -> None:
    """One line on stderr: a tracking problem is worth a warning, never a failed run."""
    print(f"raysky: warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrackingTarget:
    """The MLflow run a training run logs to: what the driver hands rank 0."""

    uri: str
    run_id: str
    experiment_id: str

    def to_dict(self) -> dict[str, str]:
        """Plain form, for :class:`~raysky.train.settings.LoopConfig`."""
        return asdict(self)


def start_run(uri: str, experiment: str, run_uri: str, run_name: str,
              kind: str) -> TrackingTarget | None:
    """Find the MLflow run of ``run_uri`` (a resumed run) or create one; ``None`` with one
    warning when the store cannot be reached, so training goes on untracked.

    Raises ``ValueError`` only when MLflow is not installed: asking for tracking without it is
    a setup mistake to fix before training, not a server that is down.
    """
    tracking_uri, artifacts = resolve_uri(uri)
    client = _mlflow_client(tracking_uri)
    try:
        if artifacts:
            os.makedirs(os.path.dirname(artifacts), exist_ok=True)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None else client.create_experiment(
            experiment, artifact_location=artifacts and f"file://{artifacts}"))
        # A quote cannot occur in a run URI raysky accepts; were one there, a new run is safer
        # than a filter that breaks.
        existing = [] if "'" in run_uri else client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_uri}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=run_name,
                                       tags={RUN_TAG: run_uri, "raysky.kind": kind}).info.run_id
    except Exception as exc:  # any failure of the store: tracking off, training on
        warn(f"MLflow tracking is off for this run: {tracking_uri} cannot be used ({_reason(exc)})")
        return None
    print(f"{kind}: MLflow run {run_id} in experiment {experiment!r} at {tracking_uri}", flush=True)
    return TrackingTarget(tracking_uri, run_id, experiment_id)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``auc_per_class.mel``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-NaN numbers of ``flatten(values)``; booleans and text are left out."""
    return {k: float(v) for k, v in flatten(values).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and not (isinstance(v, float) and math.isinf(v))}


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."


class Tracker:
    """What rank 0 logs to its run; every method is a no-op when tracking is off.

    The first failure of the store turns it off for the rest of the run with one warning:
    tracking must never fail (or slow down) the training it records.
    """

    def __init__(self, target: Mapping[str, str] | None, enabled: bool = True):
        self.target = TrackingTarget(**target) if target and enabled else None
        self._client = None
        if self.target is not None:
            try:
                self._client = _mlflow_client(self.target.uri)
            except ValueError as exc:  # a worker node without MLflow: train on, untracked
                warn(f"MLflow tracking is off for this run: {exc}")

    @property
    def enabled(self) -> bool:
        """Whether calls reach MLflow."""
        return self._client is not None

    def _call(self, what: str, method: str, *args: Any) -> Any:
        """``self._client.<method>(*args)``, or nothing once tracking is off."""
        if self._client is None:
            return None
        try:
            return getattr(self._client, method)(*args)
        except Exception as exc:
            warn(f"MLflow tracking is off for the rest of this run: {what} failed "
                 f"({_reason(exc)})")
            self._client = None
            return None

    def _log_batch(self, what: str, metrics=(), params=(), tags=()) -> None:
        self._call(what, "log_batch", self.target.run_id if self.target else None,
                   list(metrics), list(params), list(tags))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (flattened; values as text, cut at MLflow's limit)."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        batch = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params a batch
            self._log_batch("logging parameters", params=batch[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numbers in ``metrics`` (flattened) at ``step``."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch("logging metrics", metrics=[
            Metric(k, v, now, step) for k, v in numeric(metrics).items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set ``tags`` (flattened; values as text); later values replace earlier ones."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._log_batch("setting tags", tags=[
            RunTag(k, _param_text(v)) for k, v in flatten(tags).items() if v is not None])

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` (or ``FAILED``)."""
        if self.enabled:
            self._call("closing the run", "set_terminated", self.target.run_id, status)

    def log_results(self, prefix: str, metrics: Mapping[str, Any],
                    tags: Mapping[str, Any] | None = None,
                    artifact: tuple[Any, str] | None = None) -> None:
        """A later command's figures: ``metrics`` under ``prefix.``, ``tags`` as they are and
        ``artifact`` (``(data, file name)``) as a JSON artifact of the run."""
        if not self.enabled:
            return
        self.log_metrics({prefix: dict(metrics)}, step=0)
        if tags:
            self.set_tags(tags)
        if artifact is not None and self.enabled:
            self._call(f"storing {artifact[1]}", "log_dict", self.target.run_id, *artifact)
        if self.enabled:
            print(f"logged to MLflow run {self.target.run_id} at {self.target.uri}", flush=True)


def training_params(kind: str, settings: Mapping[str, Any],
                    provenance: Mapping[str, Any]) -> dict[str, Any]:
    """What rank 0 logs as parameters: the run's full settings (recipe filled in) and the
    data it trained on, the same facts the model card records."""
    data = dict(provenance.get("training_data") or {})
    return {"kind": kind, **settings, "data": data,
            "schedule": provenance.get("schedule"),
            "augmentation": provenance.get("augmentation")}


def start_tracking(settings, kind: str, run_uri: str) -> TrackingTarget | None:
    """The MLflow run of a training run with ``settings.mlflow`` set (see :func:`start_run`);
    ``None`` when tracking is off or its store cannot be reached."""
    if settings.mlflow is None:
        return None
    return start_run(settings.mlflow or LOCAL_STORE, settings.mlflow_experiment, run_uri,
                     settings.name, kind)


def finish_run(target: TrackingTarget | None, result) -> None:
    """Tag the run with its checkpoints (URIs and versions) and close it; ``result`` is the
    :class:`~raysky.train.settings.TrainResult`, or ``None`` when training failed, which
    marks the run ``FAILED``."""
    if target is None:
        return
    tracker = Tracker(target.to_dict())
    if result is not None:
        tracker.set_tags(checkpoint_tags(result))
        if result.calibrated_checkpoint_uri:
            from raysky.models.checkpoint import read_checkpoint_meta

            calibration = read_checkpoint_meta(result.calibrated_checkpoint_uri)["calibration"]
            tracker.log_metrics({"calibration": calibration_figures(calibration)}, step=0)
    tracker.finish("FINISHED" if result is not None else "FAILED")


def calibration_figures(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a calibration record: temperature, NLL before and after, the
    referral threshold with its sensitivity and specificity, and the OOD threshold (not the
    OOD statistics, which are a matrix)."""
    ood = calibration.get("ood") or {}
    return {"temperature": calibration.get("temperature"),
            "nll_before": calibration.get("nll_before"), "nll_after": calibration.get("nll_after"),
            "referral": calibration.get("referral") or {},
            "ood": {k: ood.get(k) for k in ("threshold", "quantile")}}


def checkpoint_tags(result) -> dict[str, str | None]:
    """The best, latest and calibrated checkpoints of a run, with their versions."""
    from raysky.models.checkpoint import read_checkpoint_meta

    tags: dict[str, str | None] = {"raysky.result_uri": result.result_uri}
    for name in ("best", "latest", "calibrated"):
        uri = getattr(result, f"{name}_checkpoint_uri", None)
        if uri is None:
            continue
        tags[f"raysky.{name}_checkpoint_uri"] = uri
        try:
            meta = read_checkpoint_meta(uri)
        except (OSError, ValueError):
            continue
        tags[f"raysky.{name}_checkpoint_version"] = meta.get("version")
        if meta.get("calibration"):
            tags[f"raysky.{name}_calibration_version"] = meta["calibration"].get("version")
    return tags


def open_run(uri: str | None, run_id: str | None) -> Tracker:
    """The :class:`Tracker` of an existing run, checked before a command does its work.

    Off (a no-op) without ``run_id``. A ``run_id`` the store does not hold is a
    ``ValueError`` (a typo would otherwise surface only after the work); a store that cannot
    be reached is one warning, and the command goes on untracked.
    """
    if not run_id:
        return Tracker(None)
    tracking_uri, _ = resolve_uri(uri or LOCAL_STORE)
    client = _mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"MLflow run {run_id!r} does not exist in {tracking_uri}; give the "
                             "run id that raysky train printed, and its tracking URI") from None
        warn(f"MLflow tracking is off: {tracking_uri} cannot be used ({_reason(exc)})")
        return Tracker(None)
    return Tracker({"uri": tracking_uri, "run_id": run_id,
                    "experiment_id": run.info.experiment_id})
