"""Scoring on ONNX Runtime: ``raysky score --engine onnx`` (heatmaps off).

The exports run inside the same :class:`raysky.inference.LesionPipeline` as the PyTorch models
(:func:`onnx_pipeline`, over the modules of :mod:`raysky.onnx.runtime`).
:class:`OnnxScoreModel` is the Ray Data model stage over it; the driver exports both
checkpoints once per run (:func:`exported_models`, after the same sha256 check scoring does)
and the actors receive the serialised models through the object store. Imported only when a
run asks for the ONNX engine, since it needs the ``onnx`` extra.
"""

from __future__ import annotations

import functools
import time

import pyarrow as pa
import ray

from raysky.inference import LesionPipeline
from raysky.models.checkpoint import LoadedModel, read_checkpoint_meta
from raysky.models.runtime import on_torch_thread, set_torch_threads
from raysky.onnx.export import export_checkpoint, read_metadata
from raysky.onnx.opsets import DEFAULT_OPSET
from raysky.onnx.runtime import OnnxClassifier, OnnxSegmenter
from raysky.score.stages import ScoreModel


def onnx_pipeline(segmenter: bytes, classifier: bytes, threads: int = 1, tta: bool = False
                  ) -> LesionPipeline:
    """A :class:`~raysky.inference.LesionPipeline` whose networks are the two exports."""
    seg_meta = read_metadata(segmenter)["checkpoint"]
    cls_meta = read_metadata(classifier)["checkpoint"]
    return LesionPipeline(LoadedModel(OnnxSegmenter(segmenter, threads), seg_meta),
                          LoadedModel(OnnxClassifier(classifier, cls_meta, threads), cls_meta),
                          use_gpu=False, precision="fp32", tta=tta)


class OnnxScoreModel(ScoreModel):
    """The model stage of ``raysky score --engine onnx``: :class:`ScoreModel`'s batches, rows and
    error handling over :func:`onnx_pipeline`, with ONNX Runtime's intra-op threads set to the
    CPUs the actor holds. ``segmenter``/``classifier`` are serialised exports, or object refs
    to them."""

    def __init__(self, segmenter, classifier, threads: int | None = None, tta: bool = False,
                 extra: pa.Schema | None = None):
        segmenter, classifier = (ray.get(m) if isinstance(m, ray.ObjectRef) else m
                                 for m in (segmenter, classifier))
        threads = on_torch_thread(set_torch_threads, threads)
        # No heatmaps: Grad-CAM needs autograd, which an ONNX model does not have.
        self._set_pipeline(on_torch_thread(onnx_pipeline, segmenter, classifier, threads, tta),
                           heatmaps=False, extra=extra)


@functools.lru_cache(maxsize=4)
def _exported(segmenter: str, classifier: str, versions: tuple, opset: int, job: str) -> dict:
    started = time.monotonic()
    refs = {}
    for name, uri in (("segmenter", segmenter), ("classifier", classifier)):
        refs[name] = ray.put(export_checkpoint(uri, opset=opset, expected_kind=name).model)
    print(f"score: exported the segmenter and classifier to ONNX (opset {opset}, verified "
          f"against PyTorch) in {time.monotonic() - started:.0f} s", flush=True)
    return refs


def exported_models(segmenter: str, classifier: str, opset: int = DEFAULT_OPSET) -> dict:
    """``{"segmenter": ref, "classifier": ref}``: both checkpoints exported (each verified
    against its sha256 and then against PyTorch) and put in the object store, once per
    Ray session for the same checkpoint versions."""
    versions = tuple((m["version"], (m.get("calibration") or {}).get("version"))
                     for m in (read_checkpoint_meta(segmenter), read_checkpoint_meta(classifier)))
    # Object refs live as long as the driver's connection: a new Ray session exports anew.
    job = ray.get_runtime_context().get_job_id()
    return _exported(segmenter, classifier, versions, opset, job)
