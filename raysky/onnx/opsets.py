"""The ONNX opsets raysky exports to: light, so the command line can offer them while ``raysky
--help`` runs without loading torch."""

DEFAULT_OPSET = 18
"""ONNX Runtime 1.14+, TensorRT 8.6+ and Triton's ONNX backend all run opset 18, and it is the
opset torch's exporter translates to natively."""
MIN_OPSET, MAX_OPSET = 18, 23
"""torch's exporter writes opset 18 and converts upwards; earlier opsets lack the operators
(and the ``axes`` inputs) that its translations use."""
