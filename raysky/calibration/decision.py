"""A decision rule for balanced error: per-class offsets added to the calibrated logits.

The probabilities a calibrated checkpoint reports are ``softmax(logits / T)``. Their argmax is
the Bayes decision for *accuracy* under the training prior, so on HAM10000, where two thirds
of the images are naevi, it calls too much ``nv`` and misses rare classes. Balanced accuracy
(mean per-class recall, ISIC's headline figure) wants the decision under a uniform prior:
``argmax(logits / T - log prior)`` (Menon et al., ICLR 2021, "logit adjustment"). The offsets
change only ``predicted_class``; ``prob_*``, ``malignant_prob`` and ``refer`` stay the calibrated
probabilities and what follows from them.

Two variants are fitted on the calibration data:

* ``prior``: ``offset_k = -tau * log prior_k``, one number ``tau`` chosen on a grid for the
  best balanced accuracy (the middle of the best plateau, since with 10 df images balanced
  accuracy moves in steps). ``tau`` absorbs whatever balancing training already did (class
  weights make the best ``tau`` smaller). The prior is the training split's class counts
  when the checkpoint records them, else the calibration data's.
* ``prior+classwise``: ``prior``, then bounded (|shift| <= :data:`MAX_SHIFT`), L2-penalised
  coordinate ascent on each class's offset in turn, for classes present in the data.

Which one a calibration keeps is measured, not assumed: both are cross-fitted on two
lesion-disjoint halves of the calibration data (fit on one, balanced accuracy on the other,
and the other way round), and ``prior+classwise`` is kept only if it beats ``prior`` there by
more than :data:`MIN_GAIN`; with rare classes of 10-40 images it usually does not, since
seven free offsets fit the noise of a few images. The figures are in the record.

A class with no calibration image cannot have its offset fitted: it keeps its ``prior``
offset when the training prior knows the class, and otherwise the mean of the fitted offsets
(neither favoured nor held back against the others); ``classes_not_fitted`` names it and the
calibration output says so. Offsets are centred to mean zero, since only their differences
change a decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

VARIANTS: tuple[str, ...] = ("prior", "prior+classwise")
TAU_GRID: tuple[float, ...] = tuple(round(float(t), 2) for t in np.arange(-0.5, 2.0001, 0.05))
"""Candidate ``tau``; 0 (plain argmax) is among them, negative undoes over-weighting."""
MAX_SHIFT = 1.0
"""Bound on a class's own shift away from its ``prior`` offset, in units of ``logits / T``."""
SHIFT_STEP = 0.05
SHIFT_PENALTY = 0.02
"""Balanced accuracy given up per unit squared shift: a shift must earn its keep."""
MIN_GAIN = 0.005
"""Cross-fitted balanced-accuracy gain ``prior+classwise`` needs over ``prior`` to be kept."""
SWEEPS = 3


def decide(scaled_logits: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Class index per row: ``argmax(logits / T + offsets)``; plain argmax without offsets.

    ``scaled_logits`` may be any per-row shift of ``logits / T``, such as ``log p`` of the
    calibrated probabilities (TTA averages), since a per-row constant cannot move an argmax.
    """
    z = np.asarray(scaled_logits, dtype=np.float64)
    return (z if offsets is None else z + np.asarray(offsets, dtype=np.float64)).argmax(axis=1)


def offsets_vector(record_offsets: Mapping[str, float] | None,
                   classes: Sequence[str]) -> np.ndarray | None:
    """A checkpoint's ``decision_offsets`` (class name -> offset) in ``classes`` order.

    None when there are none (a calibration from before decision offsets). A class of the
    model missing from the mapping is an error naming it, not a silent zero.
    """
    if not record_offsets:
        return None
    missing = [c for c in classes if c not in record_offsets]
    if missing:
        raise ValueError(f"decision_offsets lacks class(es) {missing} of the classifier "
                         f"{list(classes)}; recalibrate with raysky calibrate")
    return np.asarray([float(record_offsets[c]) for c in classes], dtype=np.float64)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (class indices)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    present = np.unique(labels)
    if not len(present):
        return float("nan")
    return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))


def decision_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict:
    """Balanced accuracy and accuracy of ``predicted_class`` strings against ``labels``.

    What ``raysky evaluate`` reports beside ISIC's probability-argmax figures, since a
    calibration's decision offsets make the two differ. Classes absent from ``labels`` do not
    enter the mean recall.
    """
    truth = np.asarray(list(labels), dtype=object)
    guess = np.asarray(list(predicted), dtype=object)
    recalls = {str(c): float((guess[truth == c] == c).mean()) for c in sorted(set(truth))}
    return {"balanced_accuracy": float(np.mean(list(recalls.values()))) if recalls else None,
            "accuracy": float((truth == guess).mean()) if len(truth) else None,
            "recall": recalls}


def _centred(offsets: np.ndarray) -> np.ndarray:
    return offsets - offsets.mean()


def log_prior(classes: Sequence[str], labels: np.ndarray,
              training_counts: Mapping[str, int] | None) -> tuple[np.ndarray, str]:
    """Log class prior and where it came from; classes without images get NaN."""
    if training_counts and sum(int(training_counts.get(c, 0)) for c in classes) > 0:
        counts = np.array([float(training_counts.get(c, 0)) for c in classes])
        source = "training split"
    else:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).astype(float)
        source = "calibration data"
    with np.errstate(divide="ignore"):
        logp = np.where(counts > 0, np.log(counts / counts.sum()), np.nan)
    return logp, source


def prior_offsets(logp: np.ndarray, tau: float) -> np.ndarray:
    """``-tau * log prior``, centred; classes with no prior get the mean (see the module doc)."""
    offsets = -tau * logp
    known = np.isfinite(offsets)
    offsets = np.where(known, offsets, offsets[known].mean() if known.any() else 0.0)
    return _centred(offsets)


def fit_tau(scaled: np.ndarray, labels: np.ndarray, logp: np.ndarray) -> tuple[float, float]:
    """The ``tau`` of :data:`TAU_GRID` with the best balanced accuracy, and that accuracy.

    Ties (a plateau, common with few images of a class) resolve to the plateau's middle, the
    value farthest from where the accuracy drops on either side.
    """
    scores = np.array([balanced_accuracy(labels, decide(scaled, prior_offsets(logp, t)))
                       for t in TAU_GRID])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    # The longest run of consecutive best grid points, and its middle.
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    run = max(runs, key=len)
    choice = int(run[len(run) // 2])
    return TAU_GRID[choice], float(scores[choice])


def refine_classwise(scaled: np.ndarray, labels: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Coordinate ascent on each present class's offset, bounded and L2-penalised.

    Each class in turn takes the shift on a grid within ``+-MAX_SHIFT`` of ``base`` that
    maximises ``balanced accuracy - SHIFT_PENALTY * shift**2``; :data:`SWEEPS` passes over the
    classes. Classes absent from ``labels`` keep ``base``.
    """
    present = np.unique(labels)
    shifts = np.zeros(len(base))
    grid = np.arange(-MAX_SHIFT, MAX_SHIFT + 1e-9, SHIFT_STEP)

    def objective(k: int, value: float) -> float:
        trial = shifts.copy()
        trial[k] = value
        return (balanced_accuracy(labels, decide(scaled, base + trial))
                - SHIFT_PENALTY * float((trial ** 2).sum()))

    for _ in range(SWEEPS):
        changed = False
        for k in present:
            values = [objective(k, v) for v in grid]
            best = float(grid[int(np.argmax(values))])
            if abs(best - shifts[k]) > 1e-12 and max(values) > objective(k, shifts[k]) + 1e-12:
                shifts[k], changed = best, True
        if not changed:
            break
    return _centred(base + shifts)


def fit_variant(variant: str, scaled: np.ndarray, labels: np.ndarray,
                logp: np.ndarray) -> tuple[np.ndarray, float]:
    """Offsets (``[C]``) of one of :data:`VARIANTS` fitted on the data, and its ``tau``."""
    if variant not in VARIANTS:
        raise ValueError(f"decision variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    tau, _ = fit_tau(scaled, labels, logp)
    offsets = prior_offsets(logp, tau)
    if variant == "prior+classwise":
        offsets = refine_classwise(scaled, labels, offsets)
    return offsets, tau


def lesion_halves(groups: Sequence[str], seed: int = 0) -> np.ndarray:
    """A boolean mask of the first of two halves that share no group (lesion), seeded."""
    unique = np.array(sorted({str(g) for g in groups}))
    first = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 2])
    return np.array([str(g) in first for g in groups])


def cross_fit(scaled: np.ndarray, labels: np.ndarray, logp: np.ndarray,
              groups: Sequence[str], seed: int = 0) -> dict:
    """Balanced accuracy of no offsets and of each variant, cross-fitted on lesion halves.

    Each variant is fitted on one half and measured on the other, both ways; the figure is
    the mean of the two held-out balanced accuracies.
    """
    first = lesion_halves(groups, seed)
    figures: dict = {"none": [], **{v: [] for v in VARIANTS}}
    for fit_on in (first, ~first):
        held = ~fit_on
        if not fit_on.any() or not held.any():
            continue
        figures["none"].append(balanced_accuracy(labels[held], decide(scaled[held], None)))
        for variant in VARIANTS:
            offsets, _ = fit_variant(variant, scaled[fit_on], labels[fit_on], logp)
            figures[variant].append(balanced_accuracy(labels[held], decide(scaled[held], offsets)))
    return {name: (round(float(np.mean(v)), 6) if v else None) for name, v in figures.items()}


def fit_decision_rule(scaled_logits: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                      groups: Sequence[str] | None = None,
                      training_counts: Mapping[str, int] | None = None,
                      seed: int = 0) -> tuple[dict[str, float], dict]:
    """Fit the decision offsets for balanced error; ``(decision_offsets, decision_rule)``.

    ``scaled_logits`` are ``logits / T`` on labelled calibration images (class indices
    ``labels`` into ``classes``), ``groups`` their lesion ids (image ids when unknown),
    ``training_counts`` the training split's images per class when recorded. The variant is
    chosen by :func:`cross_fit` (see the module doc) and refitted on all the data.
    ``decision_offsets`` maps every class to its offset; ``decision_rule`` says how they were
    fitted, on what, which classes could not be fitted, and the balanced accuracy before
    and after (in-sample and cross-fitted).
    """
    scaled = np.asarray(scaled_logits, dtype=np.float64)
    labels_arr = np.asarray(labels, dtype=np.int64)
    groups = [str(g) for g in (groups if groups is not None else range(len(labels_arr)))]
    logp, prior_source = log_prior(classes, labels_arr, training_counts)
    crossed = cross_fit(scaled, labels_arr, logp, groups, seed)
    variant = "prior"
    if (crossed["prior+classwise"] is not None and crossed["prior"] is not None
            and crossed["prior+classwise"] > crossed["prior"] + MIN_GAIN):
        variant = "prior+classwise"
    offsets, tau = fit_variant(variant, scaled, labels_arr, logp)
    present = set(np.unique(labels_arr).tolist())
    not_fitted = {}
    for k, name in enumerate(classes):
        if k in present:
            continue
        not_fitted[name] = ("no calibration image; keeps its tau * log prior offset from the "
                            "training split" if np.isfinite(logp[k]) else
                            "no calibration image and no prior; gets the mean offset")
    rule = {
        "method": "logit adjustment" + (" + classwise" if variant != "prior" else ""),
        "variant": variant, "tau": tau, "prior_source": prior_source,
        "classes_not_fitted": not_fitted,
        "balanced_accuracy": {
            "before": round(balanced_accuracy(labels_arr, decide(scaled, None)), 6),
            "after": round(balanced_accuracy(labels_arr, decide(scaled, offsets)), 6),
            "cross_fitted": crossed, "min_gain_for_classwise": MIN_GAIN,
        },
    }
    return {name: round(float(v), 6) for name, v in zip(classes, offsets, strict=True)}, rule


def describe_decision(calibration: dict) -> str:
    """One clause on a calibration's decision rule, for logs and ``raysky calibrate``."""
    offsets = calibration.get("decision_offsets")
    if not offsets:
        return ("no decision offsets are set: predicted_class is the argmax of the calibrated "
                "probabilities (raysky calibrate fits offsets for balanced accuracy)")
    rule = calibration.get("decision_rule", {})
    ba = rule.get("balanced_accuracy", {})
    text = (f"decision offsets ({rule.get('method', 'recorded')}, tau {rule.get('tau')}): "
            + ", ".join(f"{k} {v:+.3f}" for k, v in offsets.items()))
    if ba:
        crossed = ba.get("cross_fitted", {})
        text += (f"; balanced accuracy {ba['before']:.3f} -> {ba['after']:.3f} in-sample, "
                 f"cross-fitted none {_fmt(crossed.get('none'))} / prior "
                 f"{_fmt(crossed.get('prior'))} / classwise {_fmt(crossed.get('prior+classwise'))}")
    for name, why in rule.get("classes_not_fitted", {}).items():
        text += f"; {name} not fitted ({why})"
    return text


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
