"""The paper's models: Deep-UNet segmenter, dual-stream classifier, presets and checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysky.models.config import (
    PRESETS,
    ClassifierConfig,
    SegmenterConfig,
    classifier_config_for,
    get_preset,
    segmenter_config_for,
)

if TYPE_CHECKING:
    from raysky.data.metadata import MetadataVocab
    from raysky.models.classifier import DualStreamClassifier
    from raysky.models.segmenter import DeepUNet

# The torch-backed names load on first use, so light importers (CLI parsers, settings
# classes reading presets or PRECISIONS) do not pay for torch and timm.
_LAZY = {
    "DeepUNet": "raysky.models.segmenter",
    "segmentation_loss": "raysky.models.segmenter",
    "DualStreamClassifier": "raysky.models.classifier",
    "suppress_background": "raysky.models.classifier",
    "LoadedModel": "raysky.models.checkpoint",
    "load_checkpoint": "raysky.models.checkpoint",
    "save_checkpoint": "raysky.models.checkpoint",
    "PretrainedWeightsError": "raysky.models.pretrained",
    "initialise_model": "raysky.models.pretrained",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raysky.models' has no attribute {name!r}")


def _initialise(model, pretrained_encoder: str | None):
    from raysky.models.pretrained import initialise_model

    # Records of where each encoder's weights came from travel with the model into its
    # checkpoint (see raysky.train); a plain attribute keeps the state dict untouched.
    model.initial_weights = (initialise_model(model, pretrained_encoder)
                             if pretrained_encoder else {})
    return model


def create_segmenter(preset: str = "paper", pretrained_encoder: str | None = None,
                     **overrides) -> DeepUNet:
    """Build a segmenter from a preset name, with any config field overridden.

    ``pretrained_encoder`` is ``"imagenet"``, ``"none"`` or a weights path or URI (see
    :mod:`raysky.models.pretrained`); ``None`` leaves timm's random initialisation without a
    record. The sources used are in ``model.initial_weights``.
    """
    from raysky.models.segmenter import DeepUNet

    return _initialise(DeepUNet(segmenter_config_for(preset, **overrides)), pretrained_encoder)


def create_classifier(preset: str = "paper", classes=None, use_metadata: bool = True,
                      vocab: MetadataVocab | None = None, pretrained_encoder: str | None = None,
                      **overrides) -> DualStreamClassifier:
    """Build a classifier; ``classes`` defaults to the preset's (HAM10000's seven).

    ``pretrained_encoder`` initialises both streams, as in :func:`create_segmenter`.
    """
    from raysky.models.classifier import DualStreamClassifier

    classes = classes if classes is not None else get_preset(preset).classifier.classes
    model = DualStreamClassifier(classifier_config_for(preset, classes, use_metadata, **overrides),
                                 vocab)
    return _initialise(model, pretrained_encoder)


def count_parameters(model) -> int:
    """Total number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "PRESETS",
    "ClassifierConfig",
    "DeepUNet",
    "DualStreamClassifier",
    "LoadedModel",
    "PretrainedWeightsError",
    "SegmenterConfig",
    "count_parameters",
    "create_classifier",
    "create_segmenter",
    "get_preset",
    "initialise_model",
    "load_checkpoint",
    "save_checkpoint",
    "segmentation_loss",
    "suppress_background",
]
