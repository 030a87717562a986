"""``raysky info``: describe presets, or a checkpoint's JSON config."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``info`` sub-command."""
    parser = subparsers.add_parser(
        "info", help="list model presets, or describe a checkpoint",
        description="Without arguments, list the model presets and their sizes. With a checkpoint "
        "URI (local path or s3://), print its kind, version, classes and config, or with --card its "
        "model card.")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint directory or s3:// prefix")
    parser.add_argument("--card", action="store_true",
                        help="print the checkpoint's model card (Markdown) instead of its config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print presets or a checkpoint description."""
    if args.card and not args.checkpoint:
        raise ValueError("--card needs a checkpoint")
    if args.checkpoint:
        from raysky.models.checkpoint import read_checkpoint_meta, with_parameters

        meta = read_checkpoint_meta(args.checkpoint)
        if args.card:
            from raysky.models.card import build_card, render_markdown

            # Rendered from config.json, the card's only source, so it matches the checkpoint
            # even where model_card.md was never written (checkpoints older than cards).
            print(render_markdown(build_card(with_parameters(meta))), end="")
        else:
            print(json.dumps(meta, indent=2))
            if meta.get("calibration"):
                import sys

                from raysky.calibration.fit import describe_calibration

                # On stderr, so stdout stays the checkpoint's JSON for scripts.
                print(describe_calibration(meta["calibration"]), file=sys.stderr)
        return 0
    from raysky.models.config import PRESETS, encoder_label, inference_size

    for preset in PRESETS.values():
        seg, cls = preset.segmenter, preset.classifier
        print(f"{preset.name}: {preset.description}")
        for kind, config in (("segmenter", seg), ("classifier", cls)):
            recipe = preset.recipe(kind)
            streams, view = "", ""
            if kind == "classifier" and config.use_lesion_stream:
                shared = config.lesion_branch == "shared"
                streams = "" if shared else "2 x "
                view = " (lesion view mask-pooled from its map)" if shared else ""
            served = inference_size(config)
            size = (f"{config.input_size} px" if served == config.input_size
                    else f"{config.input_size} px (runs at {served})")
            print(f"  {kind:10s} {streams}{encoder_label(config)}{view} @ {size}; "
                  f"weights {recipe.pretrained_encoder}, lr {recipe.lr:g} (encoders x"
                  f"{recipe.encoder_lr_scale:g}), batch {recipe.batch_size}, weight decay "
                  f"{recipe.weight_decay:g}, label smoothing {recipe.label_smoothing:g}")
    return 0
