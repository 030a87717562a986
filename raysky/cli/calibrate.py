"""``raysky calibrate``: fit temperature, referral threshold and OOD statistics on labelled data."""

from __future__ import annotations

import argparse

from raysky.calibration.ood import DEFAULT_METHOD, METHODS
from raysky.calibration.referral import DEFAULT_SENSITIVITY
from raysky.cli.tracking import add_tracking_flags, open_tracking
from raysky.data.records import FORMATS, DatasetRef


def register(subparsers) -> None:
    """Add the ``calibrate`` sub-command."""
    parser = subparsers.add_parser(
        "calibrate", help="calibrate a classifier checkpoint on labelled data (new version)",
        description="Run the classifier over labelled images and fit four things: a "
        "temperature for its probabilities, per-class decision offsets that make "
        "predicted_class aim at balanced accuracy (the probabilities stay calibrated; a class "
        "with no image here is reported as not fitted), the malignant_prob threshold that "
        "reaches the referral sensitivity for malignant lesions (MEL, BCC, AKIEC), and "
        "out-of-distribution statistics with a threshold flagging about 5% of these images "
        "(by default a dermoscopy gate on a frozen ImageNet encoder). Writes a new "
        "checkpoint version to --out: the same weights, with the calibration in its "
        "config.json. Needs at least 20 malignant and 20 benign labelled images.")
    parser.add_argument("--classifier", required=True, metavar="CKPT_URI",
                        help="classifier checkpoint to calibrate (local path or s3://)")
    parser.add_argument("--data", required=True, metavar="URI",
                        help="labelled dataset: local folder or s3:// prefix")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of --data")
    parser.add_argument("--metadata", metavar="URI",
                        help="metadata CSV with labels, for --format archive")
    parser.add_argument("--split", help="calibrate on one split only (val, train or test; for "
                        "isic2018 Training, Validation or Test): the splits.csv at the --data "
                        "root, else the lesion-grouped split training makes")
    parser.add_argument("--out", required=True, metavar="CKPT_URI",
                        help="where to write the calibrated checkpoint (must differ from "
                        "--classifier)")
    parser.add_argument("--referral-sensitivity", type=float, default=DEFAULT_SENSITIVITY, metavar="S",
                        help="sensitivity for malignant lesions the referral threshold reaches "
                        "on this data (default: %(default)s)")
    parser.add_argument("--ood-method", choices=METHODS, default=DEFAULT_METHOD,
                        help="out-of-distribution score: imagenet-gate (a frozen ImageNet encoder's "
                        "features, per-class thresholds), mahalanobis (the classifier's feature) "
                        "or energy (its logits) (default: %(default)s)")
    masks = parser.add_mutually_exclusive_group(required=True)
    masks.add_argument("--segmenter", metavar="CKPT_URI",
                       help="segmenter checkpoint whose masks feed the lesion stream")
    masks.add_argument("--gt-masks", action="store_true",
                       help="use the dataset's ground-truth masks instead")
    parser.add_argument("--gpu", action="store_true", help="run the models on a GPU")
    add_tracking_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate and write the new checkpoint version."""
    from raysky.calibration.fit import describe_calibration
    from raysky.data.splits import read_split
    from raysky.train.calibrate import calibrate_checkpoint
    from raysky.train.tracking import calibration_figures

    tracker = open_tracking(args)
    records = read_split(DatasetRef(args.data, args.format, args.metadata, args.split))
    meta = calibrate_checkpoint(
        args.classifier, records, args.out,
        {"data": str(args.data), "format": args.format, "split": args.split},
        target_sensitivity=args.referral_sensitivity,
        segmenter_uri=None if args.gt_masks else args.segmenter,
        ood_method=args.ood_method, use_gpu=args.gpu)
    print(describe_calibration(meta["calibration"]))
    print(f"calibrated checkpoint {meta['version']} ({meta['calibration']['version']}) written "
          f"to {args.out}")
    tracker.log_results("calibration", calibration_figures(meta["calibration"]), tags={
        "raysky.calibrated_checkpoint_uri": args.out,
        "raysky.calibrated_checkpoint_version": meta["version"],
        "raysky.calibration_version": meta["calibration"]["version"]})
    return 0
