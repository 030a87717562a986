"""ONNX export of raysky checkpoints (:mod:`raysky.onnx.export`) and the scoring pipeline on
ONNX Runtime (:mod:`raysky.onnx.runtime`). Needs the ``onnx`` extra: ``pip install
'raysky[onnx]'``."""

DEFAULT_OPSET = 18
"""ONNX Runtime 1.14+, TensorRT 8.6+ and Triton's ONNX backend all run opset 18, and it is the
opset torch's exporter translates to natively."""
MIN_OPSET, MAX_OPSET = 18, 23
"""torch's exporter writes opset 18 and converts upwards; earlier opsets lack the operators
(and the ``axes`` inputs) that its translations use."""
