"""Reading scoring results: the public name of :mod:`raysky.score.results`.

The reader lives with the writer in :mod:`raysky.score`; ``raysky.results.read`` (one row per
input), the summary functions and ``raysky.results.cases`` (one row per lesion or patient,
:mod:`raysky.score.cases`) stay importable from here.
"""

from raysky.score.cases import CASE_COLUMNS, cases, format_cases
from raysky.score.results import (
    OPTIONAL_COLUMNS,
    PROB_PREFIX,
    SUMMARY_COLUMNS,
    class_columns,
    dedupe,
    duplicate_ids,
    format_summary,
    is_hidden,
    read,
    read_table,
    result_files,
    schema,
    summarize,
)

__all__ = ["CASE_COLUMNS", "OPTIONAL_COLUMNS", "PROB_PREFIX", "SUMMARY_COLUMNS", "cases",
           "class_columns", "dedupe", "duplicate_ids", "format_cases", "format_summary",
           "is_hidden", "read", "read_table", "result_files", "schema", "summarize"]
