"""Fine-tuning the segmenter and the classifier with Ray Train (DDP, Ray Data input, S3 checkpoints).

``train_segmenter(TrainSettings(...))`` and ``train_classifier(TrainSettings(...))`` return a
:class:`TrainResult` whose ``best_checkpoint_uri`` loads with
:func:`raysky.models.load_checkpoint`, locally or on S3.
"""

from __future__ import annotations

from raysky.train.settings import TrainResult, TrainSettings

__all__ = ["TrainResult", "TrainSettings", "train_classifier", "train_segmenter"]


def __getattr__(name: str):
    # The training entry points pull in torch, timm and Ray; load them on first use so that
    # `raysky --help` and code that only needs the settings stay light.
    if name in ("train_segmenter", "train_classifier"):
        from raysky.train import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'raysky.train' has no attribute {name!r}")
