"""``raysky info``: describe presets, or a checkpoint's JSON config."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``info`` sub-command."""
    parser = subparsers.add_parser(
        "info", help="list model presets, or describe a checkpoint",
        description="Without arguments, list the model presets and their sizes. With a checkpoint "
        "URI (local path or s3://), print its kind, version, classes and config.")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint directory or s3:// prefix")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print presets or a checkpoint description."""
    if args.checkpoint:
        from raysky.models.checkpoint import read_checkpoint_meta

        print(json.dumps(read_checkpoint_meta(args.checkpoint), indent=2))
        return 0
    from raysky.models.config import PRESETS

    for preset in PRESETS.values():
        seg, cls = preset.segmenter, preset.classifier
        print(f"{preset.name:6s} segmenter {seg.encoder}@{seg.input_size}px  "
              f"classifier 2x{cls.encoder}@{cls.input_size}px  -- {preset.description}")
    return 0
