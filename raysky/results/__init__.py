"""Scoring results: the columns of a results file and the one reader of them.

``raysky score`` writes results (:mod:`raysky.score`); everything that reads them (``raysky
results``, ``evaluate``, ``report``, the audits, export) reads through here, so the package sits
low, beside :mod:`raysky.data`, and imports only :mod:`raysky.storage` and
:mod:`raysky.data`.

- :mod:`~raysky.results.columns`: the schema (``output_schema``, ``PROB_PREFIX``, the columns
  added since the first format) and the model's classes named by the ``prob_*`` columns;
- :mod:`~raysky.results.reader`: :func:`read`, exactly one row per input, and its helpers;
- :mod:`~raysky.results.summary`: the counts printed after a run;
- :mod:`~raysky.results.by_case`: one row per lesion or patient.

``raysky.results.read(uri)``, ``raysky.results.cases(uri, by=...)`` and the other names of
``__all__`` are the public API (see :mod:`raysky.exports`).
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "CASE_COLUMNS": "columns", "PROB_PREFIX": "columns", "class_columns": "columns",
    "result_classes": "columns", "output_schema": "columns",
    "OPTIONAL_COLUMNS": "reader", "dedupe": "reader", "duplicate_ids": "reader",
    "is_hidden": "reader", "read": "reader", "read_table": "reader", "result_files": "reader",
    "schema": "reader",
    "SUMMARY_COLUMNS": "summary", "format_summary": "summary", "summarize": "summary",
    "cases": "by_case", "format_cases": "by_case",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
