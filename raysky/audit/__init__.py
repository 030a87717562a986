"""Clinical audit building blocks: skin tone (ITA), subgroup performance (intervals from
:mod:`raysky.metrics.intervals`), synthetic dermoscopic artefacts, artefact attention, and the
``raysky robustness`` run.

The building blocks are pure numpy/pandas and load no model code; only
:mod:`raysky.audit.robustness` touches checkpoints and Ray.
"""
