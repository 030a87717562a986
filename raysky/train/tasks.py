"""What differs between training the segmenter and the classifier: the model, its inputs, its
loss and its validation metrics, as one small task object per kind.

The per-worker loop (:mod:`raysky.train.loops`) drives either; the throughput benchmark's
plain-PyTorch baseline uses the same objects, so both measure the same step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysky.data.metadata import EncodedMetadata, MetadataVocab
from raysky.metrics.isic import classification_summary, segmentation_summary
from raysky.models import create_classifier, create_segmenter, get_preset, segmentation_loss
from raysky.models.preprocess import images_to_tensor, masks_to_tensor, metadata_to_tensors
from raysky.models.runtime import autocast, choose_precision
from raysky.models.segmenter import MASK_THRESHOLD
from raysky.train.datasets import readable_rows
from raysky.train.settings import LoopConfig


class SegmenterTask:
    """Deep-UNet on image/mask pairs: BCE + soft Dice, validated by Dice and Jaccard."""

    kind = "segmenter"

    def __init__(self, config: LoopConfig):
        self.config = config
        self.model_config = get_preset(config.preset).segmenter

    @property
    def input_size(self) -> int:
        """Side of the square the data pipeline resizes to."""
        return self.model_config.input_size

    def build_model(self) -> nn.Module:
        """A fresh segmenter for the preset."""
        return create_segmenter(self.config.preset)

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """Normalised image and 0/1 mask tensors on ``device``."""
        cfg = self.model_config
        image = images_to_tensor(list(batch["image"]), cfg.input_size, cfg.mean, cfg.std)
        mask = masks_to_tensor(list(batch["mask"]), cfg.input_size)
        return {"image": _to_device(image, device), "mask": mask.to(device, non_blocking=True)}

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The paper's BCE + soft-Dice loss."""
        return segmentation_loss(model(inputs["image"]), inputs["mask"])

    def synthetic_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the real shapes and dtypes with arbitrary values, for timing steps."""
        return _synthetic_images(batch_size, self.input_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict], device: torch.device,
                 precision: str) -> dict[str, Any]:
        """Mean loss, Dice, Jaccard and ISIC's thresholded Jaccard over the validation set."""
        model.eval()
        preds, truths, loss_sum, count = [], [], 0.0, 0
        for batch in _readable(batches):
            inputs = self.inputs(batch, device)
            with autocast(device, precision):
                logits = model(inputs["image"])
            n = len(inputs["mask"])
            loss_sum += float(segmentation_loss(logits, inputs["mask"])) * n
            count += n
            preds.extend((torch.sigmoid(logits.float()) > MASK_THRESHOLD)[:, 0].cpu().numpy())
            truths.extend(inputs["mask"][:, 0].cpu().numpy())
        if not count:
            raise ValueError("the validation set yielded no decodable images")
        return {"val_loss": loss_sum / count, **segmentation_summary(preds, truths),
                "val_images": count}


class ClassifierTask:
    """Dual-stream classifier: weighted cross-entropy, validated by accuracy, balanced accuracy
    and per-class AUC."""

    kind = "classifier"

    def __init__(self, config: LoopConfig):
        self.config = config
        self.classes = tuple(config.classes)
        self.model_config = get_preset(config.preset).classifier
        self.vocab = MetadataVocab.from_dict(config.vocab) if config.vocab else MetadataVocab()
        weights = config.class_weights
        self.weight = torch.tensor(weights, dtype=torch.float32) if weights else None

    @property
    def input_size(self) -> int:
        """Side of the square the data pipeline resizes to."""
        return self.model_config.input_size

    def build_model(self) -> nn.Module:
        """A fresh classifier with this run's classes and metadata setting."""
        return create_classifier(self.config.preset, classes=self.classes,
                                 use_metadata=self.config.use_metadata, vocab=self.vocab,
                                 use_lesion_stream=self.config.use_lesion_stream)

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
        """Normalised image, lesion mask, metadata tensors and label indices on ``device``."""
        cfg = self.model_config
        image = images_to_tensor(list(batch["image"]), cfg.input_size, cfg.mean, cfg.std)
        mask = masks_to_tensor(list(batch["mask"]), cfg.input_size)
        metadata = None
        if self.config.use_metadata:
            encoded = EncodedMetadata(batch["age"], batch["sex"], batch["site"])
            metadata = metadata_to_tensors(encoded, device)
        return {"image": _to_device(image, device), "mask": mask.to(device, non_blocking=True),
                "metadata": metadata,
                "label": torch.as_tensor(batch["label"], dtype=torch.long).to(device)}

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Class-weighted, label-smoothed cross-entropy (the weights offset HAM10000's 67%
        ``nv``; smoothing keeps a fine-tuned model from growing over-confident)."""
        logits = model(inputs["image"], inputs["mask"], inputs["metadata"])
        weight = self.weight.to(logits.device) if self.weight is not None else None
        return F.cross_entropy(logits.float(), inputs["label"], weight=weight,
                               label_smoothing=self.config.label_smoothing)

    def synthetic_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the real shapes and dtypes with arbitrary values, for timing steps."""
        return {**_synthetic_images(batch_size, self.input_size),
                "age": np.zeros((batch_size, 2), np.float32),
                "sex": np.zeros(batch_size, np.int64), "site": np.zeros(batch_size, np.int64),
                "label": np.arange(batch_size, dtype=np.int64) % len(self.classes)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict], device: torch.device,
                 precision: str) -> dict[str, Any]:
        """Unweighted loss, accuracy, balanced accuracy, macro and per-class AUC."""
        model.eval()
        labels, probs, loss_sum = [], [], 0.0
        for batch in _readable(batches):
            inputs = self.inputs(batch, device)
            with autocast(device, precision):
                logits = model(inputs["image"], inputs["mask"], inputs["metadata"]).float()
            loss_sum += float(F.cross_entropy(logits, inputs["label"], reduction="sum"))
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            labels.append(inputs["label"].cpu().numpy())
        if not labels:
            raise ValueError("the validation set yielded no decodable images")
        label_arr, prob_arr = np.concatenate(labels), np.concatenate(probs)
        summary = classification_summary(label_arr, prob_arr, self.classes)
        return {"val_loss": loss_sum / len(label_arr), **summary, "val_images": len(label_arr)}


TASKS = {"segmenter": SegmenterTask, "classifier": ClassifierTask}


def _readable(batches: Iterable[dict]) -> Iterable[dict]:
    # Validation skips unreadable images (logged where they were read) and empty batches.
    for batch in batches:
        batch, _ = readable_rows(batch)
        if len(batch["image"]):
            yield batch


def _synthetic_images(batch_size: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.zeros((batch_size, size, size), np.uint8)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
            "mask": mask}


def measure_precision(task, model: nn.Module, device: torch.device, requested: str,
                      batch_size: int) -> tuple[str, dict]:
    """Resolve ``auto`` precision by timing this model's own training step both ways.

    bf16 pays off or not per model, input size and CPU (measured: 0.82x the fp32 step time
    for EfficientNet-Lite0 at 128 px, 1.76x for DenseNet201, 20x without AVX-512-BF16), so
    nothing short of a measurement decides it. The steps run on a copy, leaving the model's
    weights and batch-norm statistics as they were.
    """
    import copy

    probe = copy.deepcopy(model).train()
    inputs = task.inputs(task.synthetic_batch(batch_size), device)

    def step(precision: str) -> None:
        with autocast(device, precision):
            loss = task.loss(probe, inputs)
        loss.backward()
        probe.zero_grad(set_to_none=True)

    return choose_precision(requested, device, step)


def make_task(config: LoopConfig) -> SegmenterTask | ClassifierTask:
    """The task object for ``config.kind``."""
    return TASKS[config.kind](config)


def _to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    image = image.to(device, non_blocking=True)
    # channels_last pays off with cuDNN convolutions; on CPU it is left as is.
    return image.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else image
