"""Seeded percentile-bootstrap intervals, resampling images or whole lesions.

HAM10000 holds several images of one lesion; resampling images treats them as independent and
gives intervals that are too narrow, so where lesion ids exist the clusters (lesions) are
resampled with replacement and every image of a drawn lesion comes along. Replicates whose
metric is undefined (NaN: say, a resample without a malignant case) are dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

MIN_PER_CLASS = 10
"""Fewer malignant or fewer benign images than this: too few to judge a group."""
DEFAULT_REPLICATES = 1000


def too_few(is_malignant: np.ndarray, minimum: int = MIN_PER_CLASS) -> bool:
    """True when ``is_malignant`` (booleans) holds fewer than ``minimum`` malignant or benign."""
    truth = np.asarray(is_malignant, dtype=bool)
    return bool(truth.sum() < minimum or (~truth).sum() < minimum)


def cluster_ids(clusters: Sequence | None, n: int) -> np.ndarray:
    """Dense cluster numbers ``0..K-1`` per row; a missing id (None or NaN) is its own cluster,
    and without ``clusters`` every row is one."""
    if clusters is None:
        return np.arange(n)
    numbers: dict[object, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, key in enumerate(clusters):
        missing = key is None or (isinstance(key, float) and math.isnan(key))
        out[i] = numbers.setdefault(("_row", i) if missing else key, len(numbers))
    return out


def resample_indices(cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample of rows: K clusters drawn with replacement from the K there are,
    each row repeated as often as its cluster was drawn (row order does not matter to the
    metrics here, so no shuffling is needed)."""
    k = int(cluster.max()) + 1 if len(cluster) else 0
    draws = np.bincount(rng.integers(0, k, size=k), minlength=k)
    return np.repeat(np.arange(len(cluster)), draws[cluster])


def bootstrap_intervals(metrics: Mapping[str, Callable[..., float]], *arrays: np.ndarray,
                        clusters: Sequence | None = None, replicates: int = DEFAULT_REPLICATES,
                        seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Each ``metric(*arrays)`` with a percentile bootstrap interval at ``level``.

    ``arrays`` are aligned per sample (the same length); each replicate draws one resample, of
    images or of ``clusters`` (one id per sample, e.g. lesion ids), and evaluates every metric
    on it. Per metric: ``value``, ``low``, ``high`` (None when undefined), ``level`` and
    ``replicates`` (the defined ones used). The same seed gives the same intervals.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0]) if arrays else 0
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap arrays must all have the same length")
    values = {name: float(fn(*arrays)) if n else float("nan") for name, fn in metrics.items()}
    stats: dict[str, list[float]] = {name: [] for name in metrics}
    live = [name for name, v in values.items() if not math.isnan(v)]
    if live:
        rng = np.random.default_rng(seed)
        cluster = cluster_ids(clusters, n)
        for _ in range(replicates):
            index = resample_indices(cluster, rng)
            sample = tuple(a[index] for a in arrays)
            for name in live:
                stats[name].append(float(metrics[name](*sample)))
    tail = (1.0 - level) / 2.0
    out = {}
    for name, value in values.items():
        drawn = np.asarray(stats[name], dtype=np.float64)
        drawn = drawn[~np.isnan(drawn)]
        low, high = (np.quantile(drawn, [tail, 1.0 - tail]) if len(drawn) else (None, None))
        out[name] = {"value": None if math.isnan(value) else value,
                     "low": None if low is None else float(low),
                     "high": None if high is None else float(high),
                     "level": level, "replicates": int(len(drawn))}
    return out


def bootstrap_interval(metric: Callable[..., float], *arrays: np.ndarray,
                       clusters: Sequence | None = None, replicates: int = DEFAULT_REPLICATES,
                       seed: int = 0, level: float = 0.95) -> dict:
    """One metric's :func:`bootstrap_intervals` entry: ``value``, ``low``, ``high``, ``level``
    and ``replicates``."""
    return bootstrap_intervals({"metric": metric}, *arrays, clusters=clusters,
                               replicates=replicates, seed=seed, level=level)["metric"]


def rank_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney count, ties counted half, as scikit-learn's; NaN without
    positives or negatives. Fast enough to run a thousand times per group."""
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # Per positive, the negatives scored below it and those tied with it, by binary search in
    # the sorted negatives: the same sum as ranking, without a full rank transform per replicate.
    negative = np.sort(scores[~truth])
    below = np.searchsorted(negative, scores[truth], side="left")
    tied = np.searchsorted(negative, scores[truth], side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (positives * negatives))
