"""The flags that name an MLflow run for the commands that add to one (``calibrate``,
``evaluate``, ``robustness``); see :mod:`raysky.train.tracking`."""

from __future__ import annotations

import argparse

from raysky.train.tracking import LOCAL_STORE, Tracker, open_run


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--mlflow-run-id`` and ``--mlflow`` (its store) to ``parser``."""
    group = parser.add_argument_group(
        "experiment tracking", "Log this command's figures to the MLflow run that `raysky train "
        "--mlflow` printed (pip install 'raysky[mlflow]'); an unreachable store is a warning.")
    group.add_argument("--mlflow-run-id", metavar="RUN_ID",
                       help="the MLflow run to add the figures to")
    group.add_argument("--mlflow", metavar="URI", default=LOCAL_STORE,
                       help="tracking URI of that run: a tracking server, a sqlite:/// store "
                       "or a local folder (default: %(default)s in this folder)")


def open_tracking(args: argparse.Namespace) -> Tracker:
    """The :class:`~raysky.train.tracking.Tracker` of the run the flags name, checked before
    the command's work (off without ``--mlflow-run-id``)."""
    return open_run(args.mlflow, args.mlflow_run_id)
