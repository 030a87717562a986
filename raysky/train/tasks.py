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
from raysky.models.config import recipe_from_dict
from raysky.models.preprocess import metadata_to_tensors, normalize
from raysky.models.runtime import autocast, choose_precision
from raysky.models.segmenter import MASK_THRESHOLD
from raysky.train.augment import Augmenter
from raysky.train.datasets import cache_side, readable_rows
from raysky.train.settings import LoopConfig


class _ImageTask:
    """What both tasks share: the recipe, the worker's augmenter and the input layout."""

    kind = ""

    def __init__(self, config: LoopConfig, model_config, rank: int = 0):
        self.config = config
        self.model_config = model_config
        self.recipe = recipe_from_dict(config.recipe)
        self.cache_size = cache_side(model_config.input_size)
        self.augmenter = Augmenter(self.recipe.augment, model_config.input_size, self.cache_size,
                                   config.settings.seed, rank)
        # channels_last where a measured step says so (raysky.train.loops); NCHW until then.
        self.memory_format = torch.contiguous_format

    @property
    def input_size(self) -> int:
        """Side of the square the model sees."""
        return self.model_config.input_size

    def images(self, batch: dict[str, np.ndarray], device: torch.device, train: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and 0/1 masks on ``device``: augmented from the uint8 cache for
        training, resized for validation, normalised as inference normalises."""
        return self.to_model(*self.augmenter(batch["image"], batch["mask"], train), device)

    def to_model(self, pixels: torch.Tensor, masks: torch.Tensor, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] normalised as inference normalises, and their masks, on ``device``
        in the memory layout the step was measured fastest in."""
        cfg = self.model_config
        image = normalize(pixels, cfg.mean, cfg.std, cfg.color_constancy)
        image = image.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return image, masks.to(device, non_blocking=True)

    def synthetic_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the cache's shapes and dtypes with arbitrary values, for timing steps."""
        return _synthetic_images(batch_size, self.cache_size)


class SegmenterTask(_ImageTask):
    """Deep-UNet on image/mask pairs: BCE + soft Dice, validated by Dice and Jaccard."""

    kind = "segmenter"

    def __init__(self, config: LoopConfig, rank: int = 0):
        super().__init__(config, get_preset(config.settings.preset).segmenter, rank)

    def build_model(self) -> nn.Module:
        """A fresh segmenter for the preset."""
        return create_segmenter(self.config.settings.preset)

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device,
               train: bool = False) -> dict[str, torch.Tensor]:
        """Normalised image and 0/1 mask tensors on ``device``."""
        image, mask = self.images(batch, device, train)
        return {"image": image, "mask": mask}

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The paper's BCE + soft-Dice loss."""
        return segmentation_loss(model(inputs["image"]), inputs["mask"])

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


CONSISTENCY_PAIRS = 0.25
"""With artefact consistency on, up to this share of a training batch gets a clean twin: each
twin costs one more image's forward and backward pass."""


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats) between the rows' softmax distributions: symmetric
    and bounded by log 2, so neither view is taken as the truth and no pair dominates."""
    p, q = torch.softmax(logits_a, dim=1), torch.softmax(logits_b, dim=1)
    log_mean = ((p + q) / 2).clamp_min(1e-7).log()
    return 0.5 * (F.kl_div(log_mean, p, reduction="batchmean")
                  + F.kl_div(log_mean, q, reduction="batchmean"))


class ClassifierTask(_ImageTask):
    """Classifier: weighted cross-entropy, validated by accuracy, balanced accuracy and
    per-class AUC; training hides metadata at the recipe's rates and, with
    ``artefact_consistency``, asks artefacted images to agree with their clean twins."""

    kind = "classifier"

    def __init__(self, config: LoopConfig, rank: int = 0):
        super().__init__(config, get_preset(config.settings.preset).classifier, rank)
        self.classes = tuple(config.classes)
        self.vocab = MetadataVocab.from_dict(config.vocab) if config.vocab else MetadataVocab()
        weights = config.class_weights
        self.weight = torch.tensor(weights, dtype=torch.float32) if weights else None

    def build_model(self) -> nn.Module:
        """A fresh classifier with this run's classes and metadata setting."""
        overrides = {}
        if self.config.settings.lesion_branch:
            overrides["lesion_branch"] = self.config.settings.lesion_branch
        if self.config.settings.inference_size:
            overrides["inference_size"] = self.config.settings.inference_size
        return create_classifier(self.config.settings.preset, classes=self.classes,
                                 use_metadata=self.config.settings.use_metadata, vocab=self.vocab,
                                 use_lesion_stream=self.config.settings.use_lesion_stream, **overrides)

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device,
               train: bool = False) -> dict[str, Any]:
        """Normalised image, lesion mask, metadata tensors and label indices on ``device``.

        A training batch with artefact consistency on has clean twins appended to its images,
        masks and metadata (not its labels); ``twin_of`` gives each twin's artefacted image.
        """
        n = len(batch["image"])
        pairs = int(n * CONSISTENCY_PAIRS) if train and self.consistency > 0 else 0
        if pairs:
            pixels, masks, twin_of = self.augmenter.paired(batch["image"], batch["mask"], pairs)
            image, mask = self.to_model(pixels, masks, device)
        else:
            image, mask = self.images(batch, device, train)
            twin_of = torch.zeros(0, dtype=torch.long)
        metadata = None
        if self.config.settings.use_metadata:
            encoded = EncodedMetadata(batch["age"], batch["sex"], batch["site"])
            if train:
                encoded = self._drop_metadata(encoded)
            if len(twin_of):
                rows = np.concatenate([np.arange(n), twin_of.numpy()])
                encoded = EncodedMetadata(np.asarray(encoded.age)[rows],
                                          np.asarray(encoded.sex)[rows],
                                          np.asarray(encoded.site)[rows])
            metadata = metadata_to_tensors(encoded, device)
        return {"image": image, "mask": mask, "metadata": metadata,
                "label": torch.as_tensor(batch["label"], dtype=torch.long).to(device),
                "twin_of": twin_of.to(device)}

    @property
    def consistency(self) -> float:
        """The weight of the artefact-consistency loss (0: off)."""
        return self.config.settings.artefact_consistency or 0.0

    def _drop_metadata(self, encoded: EncodedMetadata) -> EncodedMetadata:
        """Show each field as unknown with ``metadata_dropout``, all three with
        ``metadata_drop_all``: archives often lack some or all of them."""
        rate, all_rate = self.recipe.metadata_dropout, self.recipe.metadata_drop_all
        if not (rate or all_rate):
            return encoded
        generator = self.augmenter.generator
        n = len(encoded.sex)
        unknown_age, _, unknown_sex, unknown_site = self.vocab.encode(None, None, None)
        every = torch.rand(n, generator=generator).numpy() < all_rate

        def hidden() -> np.ndarray:
            return every | (torch.rand(n, generator=generator).numpy() < rate)

        age = np.array(encoded.age, dtype=np.float32, copy=True)
        age[hidden()] = (unknown_age, 1.0)
        sex = np.where(hidden(), unknown_sex, np.asarray(encoded.sex))
        site = np.where(hidden(), unknown_site, np.asarray(encoded.site))
        return EncodedMetadata(age, sex, site)

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Class-weighted, label-smoothed cross-entropy (the weights offset HAM10000's 67%
        ``nv``; smoothing keeps a fine-tuned model from growing over-confident), plus the
        artefact-consistency term where the batch has clean twins."""
        logits = model(inputs["image"], inputs["mask"], inputs["metadata"]).float()
        labels = inputs["label"]
        weight = self.weight.to(logits.device) if self.weight is not None else None
        loss = F.cross_entropy(logits[:len(labels)], labels, weight=weight,
                               label_smoothing=self.config.settings.label_smoothing)
        twin_of = inputs.get("twin_of")
        if twin_of is not None and len(twin_of):
            loss = loss + self.consistency * jensen_shannon(logits[twin_of], logits[len(labels):])
        return loss

    def synthetic_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the real shapes and dtypes with arbitrary values, for timing steps."""
        return {**super().synthetic_batch(batch_size),
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


def make_task(config: LoopConfig, rank: int = 0) -> SegmenterTask | ClassifierTask:
    """The task object for ``config.kind`` on the worker of ``rank``."""
    return TASKS[config.kind](config, rank)
