"""Fine-tuning the segmenter and the classifier with Ray Train (DDP, Ray Data input, S3 checkpoints).

``train_segmenter(TrainSettings(...))`` and ``train_classifier(TrainSettings(...))`` return a
:class:`TrainResult` whose ``best_checkpoint_uri`` loads with
:func:`raysky.models.load_checkpoint`, locally or on S3. Public names load on first use
(:mod:`raysky.exports`): the entry points pull in torch, timm and Ray.
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "TrainResult": "settings", "TrainSettings": "settings", "train_classifier": "driver",
    "train_segmenter": "driver",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
