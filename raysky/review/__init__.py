"""Reviewing results against ground truth: ``raysky evaluate`` (:mod:`~raysky.review.evaluate`,
from :mod:`~raysky.review.inputs`, :mod:`~raysky.review.task_metrics`,
:mod:`~raysky.review.calibration_audit` and :mod:`~raysky.review.output`) and the HTML review
page of ``raysky report`` (:mod:`~raysky.review.report` and its templates, with the data of
its sections from :mod:`~raysky.review.reliability_plot` and :mod:`~raysky.review.audit_plots`).
Import each name from its module."""

__all__: list[str] = []
