"""The exit codes of every ``raysky`` command, as docs/cli/index.md lists them.

A scheduler (cron, Airflow, a Kubernetes Job) decides from the code alone whether to retry:
75 means "the same command will work later", 2 "fix the command first", 1 "it broke".
"""

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_FAILURE = 1
"""It failed for a reason that is not the caller's input (a crash, a job that could not finish)."""
EXIT_USAGE = 2
"""Bad usage or bad input: unknown flags, a missing path, a malformed dataset. Retrying the
same command cannot help."""
EXIT_TEMPFAIL = 75
"""``EX_TEMPFAIL`` (sysexits.h): try again later. Another run holds the output's lock, or a
finished scoring run still has inputs that failed transiently (``error_kind='transient'``),
which the same command run again retries. A scheduler can retry on this code alone."""
