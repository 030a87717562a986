"""Scoring on ONNX Runtime: ``raysky score --engine onnx`` (heatmaps off).

The exports run inside the same :class:`raysky.inference.LesionPipeline` as the PyTorch models:
:class:`OnnxSegmenter` and :class:`OnnxClassifier` are modules whose forward passes are ONNX
Runtime sessions, presenting the calls the pipeline makes of a segmenter and a classifier. So
resizing, the lesion mask handed to the classifier, calibration, referral, OOD, skin tone and
the result rows are the PyTorch path's own code, and only the network runs elsewhere.
Grad-CAM needs autograd, which an ONNX model does not have: asking for it is an error.

:class:`OnnxScoreModel` is the Ray Data model stage over it; the driver exports both
checkpoints once per run (:func:`exported_models`, after the same sha256 check scoring does)
and the actors receive the serialised models through the object store.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from raysky.data.metadata import MetadataVocab
from raysky.models.checkpoint import LoadedModel
from raysky.models.preprocess import metadata_to_tensors
from raysky.models.runtime import on_torch_thread, set_torch_threads
from raysky.onnx import DEFAULT_OPSET
from raysky.onnx.export import (
    SEGMENTER_IO,
    classifier_io,
    read_metadata,
    session,
)
from raysky.results.columns import model_output_schema
from raysky.score.stages import INPUT_FACTS, ScoreModel

NO_AUTOGRAD = ("an ONNX Runtime model has no gradients, so it cannot compute Grad-CAM; score "
               "with heatmaps off (raysky score --engine onnx --no-heatmaps)")


def _feed(tensor: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)


class OnnxSegmenter(nn.Module):
    """A segmenter export as a module: ``forward(image)`` returns the lesion logits."""

    def __init__(self, model: bytes, threads: int = 1):
        super().__init__()
        self.session = session(model, threads)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run([SEGMENTER_IO[1][0]], {"image": _feed(image, np.float32)})
        return torch.from_numpy(logits)


class OnnxClassifier(nn.Module):
    """A classifier export as a module, with the calls :mod:`raysky.inference` makes of a
    :class:`~raysky.models.classifier.DualStreamClassifier`.

    The whole network is one session, so :meth:`encode` only hands the image and mask on, and
    :meth:`classify_with_features` runs the session on them.
    """

    def __init__(self, model: bytes, meta: dict, threads: int = 1):
        super().__init__()
        self.session = session(model, threads)
        self.vocab = MetadataVocab.from_dict(meta.get("metadata_vocab") or {})
        config = meta.get("config", {})
        self.inputs = classifier_io(config.get("use_lesion_stream", True),
                                    config.get("use_metadata", True))[0]

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs as they are: the session encodes them in :meth:`classify_with_features`."""
        return image, mask

    def classify_with_features(self, image: torch.Tensor, mask: torch.Tensor,
                               metadata: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits and the OOD image feature from the session."""
        if torch.is_grad_enabled() and (image.requires_grad or mask.requires_grad):
            raise RuntimeError(NO_AUTOGRAD)
        if metadata is None:
            batch = image.shape[0]
            metadata = metadata_to_tensors(self.vocab.encode_batch([None] * batch, [None] * batch,
                                                                   [None] * batch))
        values = {"image": _feed(image, np.float32), "lesion_mask": _feed(mask, np.float32),
                  "age": _feed(metadata["age"], np.float32),
                  "sex": _feed(metadata["sex"], np.int64), "site": _feed(metadata["site"], np.int64)}
        logits, features = self.session.run(["logits", "features"],
                                            {name: values[name] for name in self.inputs})
        return torch.from_numpy(logits), torch.from_numpy(features)

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                metadata: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.classify_with_features(image, mask, metadata)[0]


def onnx_pipeline(segmenter: bytes, classifier: bytes, threads: int = 1, tta: bool = False):
    """A :class:`~raysky.inference.LesionPipeline` whose networks are the two exports."""
    from raysky.inference import LesionPipeline

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
        import ray

        segmenter, classifier = (ray.get(m) if isinstance(m, ray.ObjectRef) else m
                                 for m in (segmenter, classifier))
        threads = on_torch_thread(set_torch_threads, threads)
        self.pipeline = on_torch_thread(onnx_pipeline, segmenter, classifier, threads, tta)
        self.heatmaps = False
        self.classes = self.pipeline.classes
        self.schema = model_output_schema(self.classes, False, extra)
        self.carried = [name for name, _type in INPUT_FACTS] + list((extra or pa.schema([])).names)


@functools.lru_cache(maxsize=4)
def _exported(segmenter: str, classifier: str, versions: tuple, opset: int, job: str) -> dict:
    import ray

    from raysky.onnx.export import export_checkpoint

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
    import ray

    from raysky.models.checkpoint import read_checkpoint_meta

    versions = tuple((m["version"], (m.get("calibration") or {}).get("version"))
                     for m in (read_checkpoint_meta(segmenter), read_checkpoint_meta(classifier)))
    # Object refs live as long as the driver's connection: a new Ray session exports anew.
    job = ray.get_runtime_context().get_job_id()
    return _exported(segmenter, classifier, versions, opset, job)
