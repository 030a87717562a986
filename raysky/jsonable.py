"""Turning metrics and summaries into strict JSON (no NaN, no NumPy scalars), and writing it."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from raysky import storage


def to_jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and NumPy scalars as Python ones.

    Metrics are often undefined (an AUC for a class without positives); strict JSON has no
    NaN, and ``null`` is what other tools read as "missing".
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rounded(array: np.ndarray) -> list:
    """``array`` as nested lists of floats with eight significant digits: small JSON (the OOD
    statistics a checkpoint records), and the scores unchanged at float32 level."""
    return np.vectorize(lambda v: float(f"{v:.8g}"))(array).tolist()


def write_json(metrics: dict, uri: str) -> None:
    """Write ``metrics`` as indented strict JSON (NaN as null) to a local path or ``s3://``."""
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False)
    storage.write_bytes(uri, (text + "\n").encode())
