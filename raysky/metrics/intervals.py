"""Confidence intervals for every figure raysky reports, in one place, by lesion.

HAM10000 holds several images of one lesion, and they are not independent: treating them as
such gives intervals that are too narrow. Wherever lesion ids exist they are the unit here.

Which method, and why:

* **A proportion** (sensitivity, specificity, a flip rate): the Wilson score interval on the
  effective sample size ``n / deff``, with ``deff`` the design effect of the lesion clusters
  (:func:`design_effect`). Wilson never collapses at 0 or 1: 62 of 62 malignant images referred
  gives about [0.94, 1.00] where a percentile bootstrap gives [1.00, 1.00], a certainty 62
  images cannot carry. Its coverage stays near the nominal level down to small groups (Brown,
  Cai and DasGupta, Stat Sci 2001), where the bootstrap's does not. And it is exact arithmetic,
  not a resample: the same figure gets the same interval wherever it is computed (evaluate,
  the report, the model card, the subgroup audit).
* **Any other statistic** (AUC, balanced accuracy, differences between paired runs): a seeded
  percentile bootstrap that resamples lesions, every image of a drawn lesion coming along
  (:func:`bootstrap_intervals`). Where every replicate gives the same value (a perfect AUC of
  1.0 does) the bootstrap has no spread to show; the interval then falls back to a Wilson
  interval at that value on the number of independent units given as ``collapse_n`` (the
  lesions of the smaller class), and says so in ``method``.

Only numpy and the standard library: this module sits below everything that reports a figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

DEFAULT_REPLICATES = 1000
DEFAULT_LEVEL = 0.95
WILSON = "wilson"
BOOTSTRAP = "bootstrap"
BOOTSTRAP_COLLAPSED = "wilson (bootstrap collapsed)"


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


def count_clusters(clusters: Sequence | None, rows: np.ndarray | None = None) -> int:
    """How many distinct clusters (lesions) the chosen ``rows`` (a boolean mask) span."""
    n = len(clusters) if clusters is not None else (len(rows) if rows is not None else 0)
    ids = cluster_ids(clusters, n)
    return int(len(np.unique(ids if rows is None else ids[np.asarray(rows, dtype=bool)])))


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_interval(proportion: float, n: float, level: float = DEFAULT_LEVEL
                    ) -> tuple[float, float]:
    """The Wilson score interval of an observed ``proportion`` over ``n`` trials (``n`` may be
    an effective, non-integer count); ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return math.nan, math.nan
    z2 = _z(level) ** 2
    centre = (proportion + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(proportion * (1 - proportion) / n + z2 / (4 * n * n)) * math.sqrt(z2) / (
        1 + z2 / n)
    # At 0 and 1 one bound is exact; rounding must not move it off.
    low = 0.0 if proportion <= 0.0 else max(0.0, centre - half)
    high = 1.0 if proportion >= 1.0 else min(1.0, centre + half)
    return low, high


def design_effect(outcomes: np.ndarray, clusters: Sequence | None) -> float:
    """How much the lesion clusters inflate a proportion's variance over independent images.

    The ratio of the cluster-robust variance of the mean (between-lesion spread of the
    per-lesion totals) to the binomial one, kept within ``[1, sum(m^2) / n]``: below 1 would
    claim more certainty than independent images give, and ``sum(m^2) / n`` (Kish's design
    effect at intra-lesion correlation 1, with ``m`` the lesions' image counts) is the most
    that perfectly alike images of each lesion can cost. When every outcome agrees (a rate of 0
    or 1) the data cannot tell how alike a lesion's images are, and that cautious upper bound
    is used. Without clusters, or with one image per lesion, it is 1.
    """
    y = np.asarray(outcomes, dtype=np.float64)
    n = len(y)
    if clusters is None or n == 0:
        return 1.0
    cluster = cluster_ids(clusters, n)
    sizes = np.bincount(cluster).astype(np.float64)
    most = float((sizes ** 2).sum() / n)
    p = float(y.mean())
    if len(sizes) < 2 or p in (0.0, 1.0):
        return most
    totals = np.bincount(cluster, weights=y)
    between = len(sizes) / (len(sizes) - 1) * float(((totals - p * sizes) ** 2).sum()) / n ** 2
    return float(min(max(between / (p * (1 - p) / n), 1.0), most))


def proportion_interval(outcomes: np.ndarray, clusters: Sequence | None = None,
                        level: float = DEFAULT_LEVEL) -> dict:
    """A proportion (the share of True ``outcomes``) with its Wilson interval on the
    lesion-clustered effective sample size (see the module docstring).

    Returns ``value``, ``low``, ``high`` (None without outcomes), ``level``, ``method``, ``n``
    and ``effective_n`` (``n`` over the design effect).
    """
    y = np.asarray(outcomes, dtype=bool)
    n = len(y)
    if not n:
        return {"value": None, "low": None, "high": None, "level": level, "method": WILSON,
                "n": 0, "effective_n": 0.0}
    effective = n / design_effect(y, clusters)
    value = float(y.mean())
    low, high = wilson_interval(value, effective, level)
    return {"value": value, "low": low, "high": high, "level": level, "method": WILSON,
            "n": n, "effective_n": round(effective, 1)}


def resample_indices(cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample of rows: K clusters drawn with replacement from the K there are,
    each row repeated as often as its cluster was drawn (row order does not matter to the
    metrics here, so no shuffling is needed)."""
    k = int(cluster.max()) + 1 if len(cluster) else 0
    draws = np.bincount(rng.integers(0, k, size=k), minlength=k)
    return np.repeat(np.arange(len(cluster)), draws[cluster])


def bootstrap_intervals(metrics: Mapping[str, Callable[..., float]], *arrays: np.ndarray,
                        clusters: Sequence | None = None, replicates: int = DEFAULT_REPLICATES,
                        seed: int = 0, level: float = DEFAULT_LEVEL,
                        collapse_n: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Each ``metric(*arrays)`` with a seeded percentile bootstrap interval at ``level``.

    ``arrays`` are aligned per sample (the same length); each replicate draws one resample, of
    images or of ``clusters`` (one id per sample, e.g. lesion ids), and evaluates every metric
    on it. Replicates where a metric is undefined (NaN: a resample without a malignant case)
    are dropped and counted. Where every defined replicate agrees and ``collapse_n`` names the
    metric's independent units, the interval is the Wilson interval at the value on that many
    (a statistic in [0, 1], such as an AUC). Per metric: ``value``, ``low``, ``high`` (None when
    undefined), ``level``, ``method`` and ``replicates`` (the defined ones used).
    """
    _z(level)
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
        method = BOOTSTRAP
        units = (collapse_n or {}).get(name)
        if low is not None and low == high and units:
            low, high = wilson_interval(min(max(value, 0.0), 1.0), units, level)
            method = BOOTSTRAP_COLLAPSED
        out[name] = {"value": None if math.isnan(value) else value,
                     "low": None if low is None else float(low),
                     "high": None if high is None else float(high),
                     "level": level, "method": method, "replicates": int(len(drawn))}
    return out


def bootstrap_interval(metric: Callable[..., float], *arrays: np.ndarray,
                       clusters: Sequence | None = None, replicates: int = DEFAULT_REPLICATES,
                       seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    """One metric's :func:`bootstrap_intervals` entry: ``value``, ``low``, ``high``, ``level``,
    ``method`` and ``replicates``."""
    return bootstrap_intervals({"metric": metric}, *arrays, clusters=clusters,
                               replicates=replicates, seed=seed, level=level)["metric"]


def format_interval(entry: Mapping | None, digits: int = 3) -> str:
    """A figure as ``value [low, high]`` (``-`` without a value): the one way evaluate, the
    report, the model card and the subgroup table print an interval, so one figure reads the
    same everywhere."""
    if not entry or entry.get("value") is None:
        return "-"
    if entry.get("low") is None:
        return f"{entry['value']:.{digits}f}"
    return f"{entry['value']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def group_rows(audit: dict, separator: str = " = ") -> list[tuple[str, dict]]:
    """``(label, group)`` for the overall figures and then every group of every grouping of a\n    table of intervals by group (:func:`raysky.audit.subgroups.subgroup_audit`), in the order\n    the text table, the report and the model card print them."""
    rows = [("overall", audit["overall"])]
    for grouping, body in audit["groupings"].items():
        rows += [(f"{grouping}{separator}{g['group']}", g) for g in body["groups"]]
    return rows
