"""Reading scoring results: the public name of :mod:`raysky.score.results`.

The reader lives with the writer in :mod:`raysky.score`; ``raysky.results.read`` (one row per
input) and the summary functions stay importable from here.
"""

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

__all__ = ["OPTIONAL_COLUMNS", "PROB_PREFIX", "SUMMARY_COLUMNS", "class_columns", "dedupe",
           "duplicate_ids", "format_summary", "is_hidden", "read", "read_table", "result_files",
           "schema", "summarize"]
