"""``raysky evaluate`` and ``raysky report``: ISIC metrics and the HTML review page."""

from __future__ import annotations

import argparse

from raysky.cli.options import add_setting, settings_from_args
from raysky.cli.tracking import add_tracking_flags, open_tracking
from raysky.data.records import FORMATS, DatasetRef
from raysky.review.settings import LOW_FOCUS_THRESHOLD, ReportOptions


def _add_ground_truth(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--data", required=required, metavar="URI",
                        help="ground-truth dataset: local folder or s3:// prefix")
    parser.add_argument("--format", choices=FORMATS, required=required,
                        help="layout of --data (archive: labels come from --metadata)")
    parser.add_argument("--metadata", metavar="URI",
                        help="metadata CSV with labels, for --format archive")
    parser.add_argument("--split", help="evaluate one split only: for isic2018 Training "
                        "(default), Validation or Test; for the other layouts train, val or test "
                        "of the splits.csv at the --data root (test: images training never saw)")
    parser.add_argument("--classifier", metavar="CKPT_URI",
                        help="the classifier checkpoint the results were scored with: its "
                        "temperature gives the calibration figures before and after")
    parser.add_argument("--by", action="append", default=[], metavar="COLUMN",
                        help="also audit subgroups by this column of the results, the records "
                        "or the dataset's metadata file (repeatable); sex, "
                        "age band, site and skin tone are always audited")
    parser.add_argument("--low-focus", type=float, default=LOW_FOCUS_THRESHOLD, metavar="F",
                        help="lesion focus below which an image is flagged (default: %(default)s)")


def register(subparsers) -> None:
    """Add the ``evaluate`` and ``report`` sub-commands."""
    parser = subparsers.add_parser(
        "evaluate", help="score results against ground truth with ISIC's metrics",
        description="Join a results Parquet (from `raysky score`) with ground truth in any "
        "supported layout and compute ISIC's metrics: Dice, Jaccard and thresholded Jaccard per "
        "image and on average; balanced accuracy, AUC, AUC above 80% sensitivity, average "
        "precision, sensitivity and specificity per class and macro-averaged, plus malignant "
        "versus benign; the confusion matrix; lesion-focus statistics; and calibration: ECE "
        "(15 bins) and Brier score before and after calibration (with --classifier), and the "
        "sensitivity and specificity of the referrals with bootstrap 95% intervals. Prints a "
        "table and optionally writes JSON with ISIC's metric names.")
    parser.add_argument("--results", required=True, metavar="URI",
                        help="results Parquet file or folder of Parquet files (local or s3://)")
    _add_ground_truth(parser, required=True)
    parser.add_argument("--update-card", metavar="CKPT_URI",
                        help="write a new version of --classifier here whose model card gains "
                        "these figures and the subgroup table (the weights are copied as they "
                        "are)")
    parser.add_argument("--out", metavar="URI",
                        help="write the metrics as JSON here (local path or s3://)")
    add_tracking_flags(parser)
    parser.set_defaults(func=run_evaluate)

    parser = subparsers.add_parser(
        "report", help="write a self-contained HTML review page from results",
        description="Build one HTML file with every image inlined: a summary, a gallery of the "
        "highest-risk lesions (image with mask outline, Grad-CAM overlay, probabilities, lesion "
        "focus), and the images flagged for review (low lesion focus, scoring errors). With "
        "--data and --format it adds the ISIC metrics, a confusion matrix and ROC curves.")
    parser.add_argument("--results", required=True, metavar="URI",
                        help="results Parquet file or folder of Parquet files (local or s3://)")
    parser.add_argument("--out", default="report.html", metavar="URI",
                        help="where to write the HTML (local path or s3://; default: %(default)s)")
    _add_ground_truth(parser, required=False)
    add_setting(parser, ReportOptions, "top_n", "--top", type=int, metavar="N")
    add_setting(parser, ReportOptions, "max_flagged", "--max-flagged", type=int, metavar="N")
    add_setting(parser, ReportOptions, "title", "--title")
    add_setting(parser, ReportOptions, "robustness_dir", "--robustness", metavar="DIR",
                note="its table and an example strip per artefact type")
    parser.set_defaults(func=run_report)


def _dataset(args: argparse.Namespace) -> DatasetRef:
    return DatasetRef(args.data, args.format, args.metadata, args.split)


def run_evaluate(args: argparse.Namespace) -> int:
    """Compute, print and optionally write the metrics."""
    from raysky.jsonable import write_json
    from raysky.review.evaluate import evaluate
    from raysky.review.output import card_sections, format_table

    tracker = open_tracking(args)
    metrics = evaluate(args.results, _dataset(args), low_focus=args.low_focus,
                       classifier_uri=args.classifier, by=args.by)
    if args.update_card and not args.classifier:
        raise ValueError("--update-card needs --classifier, the checkpoint the results were "
                         "scored with, whose card it extends")
    print(format_table(metrics))
    if args.out:
        write_json(metrics, args.out)
        print(f"\nmetrics written to {args.out}")
    if args.update_card:
        from raysky.models.checkpoint import update_card

        meta = update_card(args.classifier, args.update_card, card_sections(metrics))
        print(f"model card updated: classifier {meta['version']} written to {args.update_card}")
    tracker.log_results("evaluation", card_sections(metrics)["evaluation"],
                        tags={"raysky.evaluated_results": args.results},
                        artifact=(metrics, "evaluation.json"))
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Write the HTML report."""
    from raysky.review.report import build_report

    if (args.data is None) != (args.format is None):
        raise ValueError("--data and --format go together: give both, or neither")
    if args.top < 0 or args.max_flagged < 0:
        raise ValueError("--top and --max-flagged must be >= 0")
    options = settings_from_args(ReportOptions, args, low_focus=args.low_focus,
                                 classifier_uri=args.classifier, by=tuple(args.by))
    summary = build_report(args.results, args.out,
                           _dataset(args) if args.data is not None else None, options)
    print(f"report written to {args.out}: {summary['images']} images, {summary['errors']} "
          f"errors, {summary['gallery']} in the gallery, {summary['flagged']} flagged, "
          f"{summary['ood']} out of distribution")
    return 0
