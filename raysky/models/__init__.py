"""The paper's models: Deep-UNet segmenter, dual-stream classifier, presets and checkpoints."""

from __future__ import annotations

from raysky.data.metadata import MetadataVocab
from raysky.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from raysky.models.classifier import DualStreamClassifier, suppress_background
from raysky.models.config import (
    PRESETS,
    ClassifierConfig,
    SegmenterConfig,
    classifier_config_for,
    get_preset,
    segmenter_config_for,
)
from raysky.models.segmenter import DeepUNet, segmentation_loss


def create_segmenter(preset: str = "paper", **overrides) -> DeepUNet:
    """Build an untrained segmenter from a preset name, with any config field overridden."""
    return DeepUNet(segmenter_config_for(preset, **overrides))


def create_classifier(preset: str = "paper", classes=None, use_metadata: bool = True,
                      vocab: MetadataVocab | None = None, **overrides) -> DualStreamClassifier:
    """Build an untrained classifier; ``classes`` defaults to the preset's (HAM10000's seven)."""
    classes = classes if classes is not None else get_preset(preset).classifier.classes
    return DualStreamClassifier(classifier_config_for(preset, classes, use_metadata, **overrides), vocab)


def count_parameters(model) -> int:
    """Total number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "PRESETS",
    "ClassifierConfig",
    "DeepUNet",
    "DualStreamClassifier",
    "LoadedModel",
    "SegmenterConfig",
    "count_parameters",
    "create_classifier",
    "create_segmenter",
    "get_preset",
    "load_checkpoint",
    "save_checkpoint",
    "segmentation_loss",
    "suppress_background",
]
