"""The ``raysky`` command line: one sub-command per job, each defined in its own module."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import traceback

from raysky.cli.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE
from raysky.cli.options import SETTING_DESTS
from raysky.settings import ParameterError

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


def flag_for(parser: argparse.ArgumentParser, args: argparse.Namespace, parameter: str) -> str:
    """The flag of the chosen sub-command that sets Python ``parameter``: a flag declared from
    a settings field of that name (a nested field answers to its own name too, as the nested
    settings' checks say ``batch_size``, not ``score.batch_size``), else the flag whose
    destination is the name, else the name itself (a parameter the command computes rather
    than reads from a flag)."""
    dests: dict[str, str] = {}
    for dest, (_cls, name, _conv) in (getattr(args, SETTING_DESTS, None) or {}).items():
        dests[name] = dest
        dests.setdefault(name.rpartition(".")[2], dest)
    dest = dests.get(parameter, parameter)
    for action in _chosen_parser(parser, args)._actions:
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return parameter


def _chosen_parser(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost sub-command parser ``args`` came through (``train segmenter``'s, not
    ``train``'s): the one that declares the command's flags."""
    while True:
        commands = next((a for a in parser._actions
                         if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None or getattr(args, commands.dest, None) not in commands.choices:
            return parser
        parser = commands.choices[getattr(args, commands.dest)]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the process exit code:
    :data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_USAGE` or :data:`EXIT_TEMPFAIL`
    (argparse itself exits with 2 on a usage error)."""
    from raysky.score.lock import OutputLocked

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OutputLocked as exc:
        # Not the caller's mistake: the same command will work once the other run is done.
        print(f"raysky {args.command}: busy: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except ParameterError as exc:
        # Raised below the CLI in Python's words; said here with the flag the user typed.
        flag = functools.partial(flag_for, parser, args)
        print(f"raysky {args.command}: error: {exc.with_flag(flag(exc.parameter), flag)}",
              file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        # User mistakes (bad paths, malformed datasets, wrong checkpoints) get one clear line,
        # not a traceback.
        print(f"raysky {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        # Anything else is a failure of the run, not of its input: the traceback is what a
        # bug report needs, and the exit code says it is not worth retrying unchanged.
        traceback.print_exc()
        print(f"raysky {args.command}: failed (exit {EXIT_FAILURE})", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
