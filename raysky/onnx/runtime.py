"""The exported networks on ONNX Runtime, as modules the inference pipeline can run.

:class:`OnnxSegmenter` and :class:`OnnxClassifier` are modules whose forward passes are ONNX
Runtime sessions, presenting the calls :class:`raysky.inference.LesionPipeline` makes of a
segmenter and a classifier. So resizing, the lesion mask handed to the classifier,
calibration, referral, OOD, skin tone and the result rows stay the PyTorch path's own code, and
only the network runs elsewhere (``raysky score --engine onnx``,
:mod:`raysky.score.onnx_engine`). Grad-CAM needs autograd, which an ONNX model does not have:
asking for it is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from raysky.data.metadata import MetadataVocab
from raysky.models.preprocess import metadata_to_tensors
from raysky.onnx.export import (
    SEGMENTER_IO,
    classifier_io,
    session,
)

NO_AUTOGRAD = ("an ONNX Runtime model has no gradients, so it cannot compute Grad-CAM; score "
               "with heatmaps off (heatmaps=False)")


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

    shares_encoder = False
    """Grad-CAM then asks for the mask's gradient too, which the session refuses (no autograd)."""

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
