"""Temperature scaling: one scalar that divides the logits, fitted by minimising the NLL.

Guo et al. (2017) showed that modern networks are over-confident and that a single temperature,
fitted on held-out data, fixes most of it without changing any prediction: the argmax of
``logits / T`` is the argmax of ``logits``, so accuracy, AUCs and Grad-CAM's target class stay
exactly as they were, and only the probabilities move.
"""

from __future__ import annotations

import math

import numpy as np

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The search range; a fit that lands on a bound says the data cannot pin the temperature."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    return np.exp(log_softmax(logits))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (class indices) under ``softmax(logits / T)``."""
    labels = np.asarray(labels, dtype=np.int64)
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` that minimises the NLL of ``labels`` under ``softmax(logits / T)``.

    A bounded 1-D search over ``log T`` (Brent's method via SciPy): the NLL is smooth and
    unimodal in ``log T`` for any fixed logits, so a scalar search is exact to its tolerance and
    needs no learning rate, unlike gradient descent on ``T``. ``labels`` are class indices.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"need [N, C] logits and N labels, got {logits.shape} and {labels.shape}")
    from scipy.optimize import minimize_scalar

    low, high = (math.log(b) for b in bounds)
    result = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)),
                             bounds=(low, high), method="bounded",
                             options={"xatol": 1e-5})
    return float(math.exp(result.x))


def uncalibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Undo a temperature on stored probabilities: ``softmax(log p * T)``.

    ``log p`` equals ``logits / T`` up to a per-row constant, which softmax ignores, so this
    recovers ``softmax(logits)`` exactly, apart from the float32 rounding of stored
    probabilities (tiny ones are clipped at 1e-30 before the log).
    """
    logp = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, None))
    return softmax(logp * temperature)


def recalibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Apply a temperature to stored uncalibrated probabilities: ``softmax(log p / T)``."""
    return uncalibrate(probabilities, 1.0 / temperature)
