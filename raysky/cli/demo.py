"""``raysky demo``: the whole job end to end on the bundled sample (what ``make demo`` runs)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    from raysky.local.demo import DemoSettings
    from raysky.models.config import PRESETS

    defaults = DemoSettings()  # every field has a default: the instance is the defaults
    parser = subparsers.add_parser(
        "demo", help="train, screen, report and serve on the bundled sample, all on 127.0.0.1",
        description="Start a local Ray and an embedded S3 endpoint (moto) on 127.0.0.1, upload the "
        "bundled real HAM10000 sample, train the segmenter and the classifier with Ray Train, "
        "screen the archive into Parquet with Ray Data, evaluate it and write the HTML review "
        "page, serve the models with Ray Serve and make one live prediction, then shut "
        "everything down. Point --data at your own HAM10000/ISIC folder to use your data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=defaults.data,
                        help="dataset folder or s3:// prefix; the bundled sample by default")
    parser.add_argument("--format", default=defaults.format,
                        choices=["ham10000", "isic2018", "isic2019"], help="dataset layout")
    parser.add_argument("--preset", default=defaults.preset, choices=list(PRESETS),
                        help="model sizes and training recipe (see `raysky info`)")
    parser.add_argument("--segmenter-epochs", type=int, default=defaults.segmenter_epochs)
    parser.add_argument("--classifier-epochs", type=int, default=defaults.classifier_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="Ray Train workers")
    parser.add_argument("--out", default=defaults.out,
                        help="local folder for the review page, metrics and summary")
    parser.add_argument("--storage", default=None,
                        help="use this existing s3:// prefix (AWS_* variables) instead of the "
                        "embedded S3 endpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags."""
    try:
        import httpx  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the demo needs the 'demo' extra ({exc.name} is not installed): "
                         "pip install 'raysky[demo]'") from exc
    from raysky.local.demo import DemoSettings, run_demo

    run_demo(DemoSettings(
        data=args.data, format=args.format, preset=args.preset,
        segmenter_epochs=args.segmenter_epochs, classifier_epochs=args.classifier_epochs,
        batch_size=args.batch_size, workers=args.workers, out=args.out, storage=args.storage,
    ))
    return 0
