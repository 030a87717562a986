"""The figures raysky reports and their intervals, defined once for the whole package.

- :mod:`raysky.metrics.isic`: segmentation and classification metrics with the ISIC
  Challenge's definitions (Dice, Jaccard, balanced accuracy, AUC, ``auc_sens_80``, AP), the
  one ``sensitivity_specificity`` and a fast rank AUC.
- :mod:`raysky.metrics.reliability`: calibration quality (reliability bins, ECE, Brier).
- :mod:`raysky.metrics.intervals`: confidence intervals, by lesion: Wilson with a design
  effect for proportions, a seeded cluster bootstrap for the rest.

A low layer: it imports numpy, scikit-learn and the standard library only, never another raysky
package. Import each name from its module; this package re-exports nothing.
"""

__all__: list[str] = []
