"""The ``raysky`` command line: one sub-command per job, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)``, adding a sub-command whose parser sets ``func``.
COMMAND_MODULES: tuple[str, ...] = (
    "raysky.cli.info",
    "raysky.cli.calibrate",
    "raysky.cli.demo",
    "raysky.cli.evaluate",
    "raysky.cli.export",
    "raysky.cli.robustness",
    "raysky.cli.score",
    "raysky.cli.serve",
    "raysky.cli.train",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="raysky",
        description="Explainable skin-lesion segmentation and classification on Ray: "
        "train, screen archives, serve.",
    )
    from raysky import __version__

    parser.add_argument("--version", action="version", version=f"raysky {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # User mistakes (bad paths, malformed datasets, wrong checkpoints) get one clear line,
        # not a traceback.
        print(f"raysky {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
