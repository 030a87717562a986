"""``raysky robustness``: flip rates, AUPRC/AUC changes and artefact attention under pasted
dermoscopic artefacts (rulers, ink, bubbles, hair, dark corners)."""

from __future__ import annotations

import argparse

from raysky.audit.robustness import RobustnessSettings
from raysky.cli.options import settings_defaults
from raysky.data.readers import FORMATS


def register(subparsers) -> None:
    """Add the ``robustness`` sub-command."""
    d = settings_defaults(RobustnessSettings)
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
    parser.add_argument("--segmenter", required=True, help="segmenter checkpoint")
    parser.add_argument("--classifier", required=True, help="classifier checkpoint")
    parser.add_argument("--data", required=True, metavar="URI",
                        help="dataset: local folder or s3:// prefix")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of --data")
    parser.add_argument("--metadata", metavar="URI", help="metadata CSV, for --format archive")
    parser.add_argument("--split", help="one split: for isic2018 Training, Validation or Test; "
                        "otherwise train, val or test of the splits.csv at the --data root")
    parser.add_argument("--artefacts", default=",".join(d["artefacts"]), metavar="LIST",
                        help="comma-separated artefact types (default: %(default)s)")
    parser.add_argument("--out", default=d["out"], metavar="DIR",
                        help="local working and output folder (default: %(default)s)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="a seeded sample of N images instead of all")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="artefacts, sample and bootstrap seed (default: %(default)s)")
    parser.add_argument("--replicates", type=int, default=d["replicates"],
                        help="bootstrap replicates for the intervals (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="images per model call (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=d["workers"], help="model workers (see score)")
    parser.add_argument("--cpus-per-worker", type=int, default=d["cpus_per_worker"],
                        help="CPUs per model worker (default: %(default)s)")
    parser.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                        help="GPUs per model worker (default: %(default)s)")
    parser.add_argument("--address", default=d["ray_address"],
                        help="Ray cluster address (see `raysky score`)")
    parser.add_argument("--update-card", metavar="CKPT_URI",
                        help="write a new version of --classifier here whose model card gains "
                        "the robustness table (the weights are copied as they are)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the measurement, print the table and where the JSON went."""
    import os

    from raysky.audit.artefacts import parse_kinds
    from raysky.audit.robustness import (
        OUTPUT_FILE,
        RobustnessSettings,
        card_section,
        format_report,
        run_robustness,
    )

    if args.replicates < 1:
        raise ValueError(f"--replicates must be at least 1, got {args.replicates}")
    settings = RobustnessSettings(
        segmenter=args.segmenter, classifier=args.classifier, data=args.data,
        format=args.format, metadata=args.metadata, split=args.split,
        artefacts=parse_kinds(args.artefacts), out=args.out, limit=args.limit, seed=args.seed,
        replicates=args.replicates, batch_size=args.batch_size, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        ray_address=args.address, progress=not args.quiet)
    report = run_robustness(settings)
    print(format_report(report))
    print(f"\nwritten to {os.path.join(args.out, OUTPUT_FILE)}")
    if args.update_card:
        from raysky.models.card import update_card

        meta = update_card(args.classifier, args.update_card, {"robustness": card_section(report)})
        print(f"model card updated: classifier {meta['version']} written to {args.update_card}")
    return 0
