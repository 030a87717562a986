"""Clinical audit building blocks: subgroup performance (intervals from
:mod:`raysky.metrics.intervals`), synthetic dermoscopic artefacts, artefact attention, and the
paired clean-versus-altered figures that ``raysky robustness`` (:mod:`raysky.score.robustness`)
reports.

Pure numpy/pandas: nothing here loads a model. Import each name from its module.
"""

__all__: list[str] = []
