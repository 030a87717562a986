"""``raysky robustness``: flip rates, AUPRC/AUC changes and artefact attention under pasted
dermoscopic artefacts (rulers, ink, bubbles, hair, dark corners)."""

from __future__ import annotations

import argparse

from raysky.audit.artefacts import parse_kinds
from raysky.cli.options import add_setting, settings_from_args
from raysky.cli.tracking import add_tracking_flags, open_tracking
from raysky.data.records import FORMATS
from raysky.score.settings import RobustnessSettings


def register(subparsers) -> None:
    """Add the ``robustness`` sub-command."""
    parser = subparsers.add_parser(
        "robustness", help="measure how pasted dermoscopic artefacts change predictions",
        description="Write the dataset's images (or one --split, or a seeded --limit sample) "
        "as they are and, per artefact type, with a seeded procedurally drawn artefact pasted "
        "outside the lesion (the ground-truth mask where there is one, the segmenter's "
        "otherwise; the output says which). Score every folder with the `raysky score` "
        "pipeline (heatmaps on) and report, per type: the flip rate of the predicted class, "
        "the mean |change| of malignant_prob, the change of macro AUPRC and of malignant AUC "
        "(with paired bootstrap intervals), and the Grad-CAM share on the artefact's pixels. "
        "Writes robustness.json and the folders under --out.")
    add_setting(parser, RobustnessSettings, "segmenter", "--segmenter")
    add_setting(parser, RobustnessSettings, "classifier", "--classifier")
    add_setting(parser, RobustnessSettings, "data", "--data", metavar="URI")
    add_setting(parser, RobustnessSettings, "format", "--format", choices=FORMATS)
    add_setting(parser, RobustnessSettings, "metadata", "--metadata", metavar="URI")
    add_setting(parser, RobustnessSettings, "split", "--split")
    add_setting(parser, RobustnessSettings, "artefacts", "--artefacts", metavar="LIST",
                note="comma-separated", to_flag=",".join, from_flag=parse_kinds)
    add_setting(parser, RobustnessSettings, "out", "--out", metavar="DIR")
    add_setting(parser, RobustnessSettings, "limit", "--limit", type=int, metavar="N")
    add_setting(parser, RobustnessSettings, "seed", "--seed", type=int)
    add_setting(parser, RobustnessSettings, "replicates", "--replicates", type=int)
    add_setting(parser, RobustnessSettings, "tta", "--tta", action="store_true")
    # How each folder is scored: the nested RobustnessSettings.score, with raysky score's help.
    add_setting(parser, RobustnessSettings, "score.batch_size", "--batch-size", type=int)
    add_setting(parser, RobustnessSettings, "score.workers", "--workers", type=int)
    add_setting(parser, RobustnessSettings, "score.cpus_per_worker", "--cpus-per-worker", type=int)
    add_setting(parser, RobustnessSettings, "score.gpus_per_worker", "--gpus-per-worker",
                type=float)
    add_setting(parser, RobustnessSettings, "score.ray_address", "--address")
    parser.add_argument("--update-card", metavar="CKPT_URI",
                        help="write a new version of --classifier here whose model card gains "
                        "the robustness table (the weights are copied as they are)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_tracking_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the measurement, print the table and where the JSON went."""
    import os

    from raysky.audit.paired import ROBUSTNESS_FILE
    from raysky.score.robustness import card_section, format_report, run_robustness

    settings = settings_from_args(RobustnessSettings, args, **{"score.progress": not args.quiet})
    tracker = open_tracking(args)
    report = run_robustness(settings)
    print(format_report(report))
    print(f"\nwritten to {os.path.join(args.out, ROBUSTNESS_FILE)}")
    if args.update_card:
        from raysky.models.checkpoint import update_card

        meta = update_card(args.classifier, args.update_card, {"robustness": card_section(report)})
        print(f"model card updated: classifier {meta['version']} written to {args.update_card}")
    tracker.log_results("robustness", card_section(report).get("by_artefact", {}),
                        artifact=(report, ROBUSTNESS_FILE))
    return 0
