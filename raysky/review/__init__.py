"""Reviewing results against ground truth: ISIC's metrics (``metrics``), ``raysky evaluate``
(``evaluate``: joins results to a dataset and computes every figure, from ``inputs``,
``task_metrics``, ``calibration_audit`` and ``output``) and the HTML review page of
``raysky report`` (``report``)."""
