"""Building the paper's models from a preset name: the segmenter and the classifier, with any
config field overridden and, optionally, pretrained encoder weights."""

from __future__ import annotations

from raysky.data.metadata import MetadataVocab
from raysky.models.classifier import DualStreamClassifier
from raysky.models.config import classifier_config_for, get_preset, segmenter_config_for
from raysky.models.pretrained import initialise_model
from raysky.models.segmenter import DeepUNet


def _initialise(model, pretrained_encoder: str | None):
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
    return _initialise(DeepUNet(segmenter_config_for(preset, **overrides)), pretrained_encoder)


def create_classifier(preset: str = "paper", classes=None, use_metadata: bool = True,
                      vocab: MetadataVocab | None = None, pretrained_encoder: str | None = None,
                      **overrides) -> DualStreamClassifier:
    """Build a classifier; ``classes`` defaults to the preset's (HAM10000's seven).

    ``pretrained_encoder`` initialises both streams, as in :func:`create_segmenter`.
    """
    classes = classes if classes is not None else get_preset(preset).classifier.classes
    model = DualStreamClassifier(classifier_config_for(preset, classes, use_metadata, **overrides),
                                 vocab)
    return _initialise(model, pretrained_encoder)
