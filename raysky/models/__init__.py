"""The paper's models: Deep-UNet segmenter, dual-stream classifier, presets and checkpoints.

Public names load from their modules on first use (:mod:`raysky.exports`), so light importers
(CLI parsers, settings classes reading presets or PRECISIONS) do not pay for torch and timm.
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "PRESETS": "config", "ClassifierConfig": "config", "SegmenterConfig": "config",
    "get_preset": "config",
    "DeepUNet": "segmenter", "segmentation_loss": "segmenter",
    "DualStreamClassifier": "classifier", "suppress_background": "classifier",
    "LoadedModel": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "count_parameters": "checkpoint",
    "PretrainedWeightsError": "pretrained", "initialise_model": "pretrained",
    "create_classifier": "factory", "create_segmenter": "factory",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
