"""ONNX export of raysky checkpoints (:mod:`raysky.onnx.export`, opsets in
:mod:`raysky.onnx.opsets`) and the exported networks as modules on ONNX Runtime
(:mod:`raysky.onnx.runtime`); the scoring engine over them is :mod:`raysky.score.onnx_engine`.
Needs the ``onnx`` extra: ``pip install 'raysky[onnx]'``."""

__all__: list[str] = []
