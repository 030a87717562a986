"""``raysky demo``: the whole job end to end on the bundled sample (what ``make demo`` runs)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``demo`` sub-command."""
    from raysky.cli.options import add_setting
    from raysky.local.demo import DemoSettings
    from raysky.models.config import PRESETS

    parser = subparsers.add_parser(
        "demo", help="train, screen, report and serve on the bundled sample, all on 127.0.0.1",
        description="Start a local Ray and an embedded S3 endpoint (moto) on 127.0.0.1, upload the "
        "bundled real HAM10000 sample, train the segmenter and the classifier with Ray Train, "
        "screen the archive into Parquet with Ray Data, evaluate it and write the HTML review "
        "page, serve the models with Ray Serve and make one live prediction, then shut "
        "everything down. Point --data at your own HAM10000/ISIC folder to use your data.")
    add_setting(parser, DemoSettings, "data", "--data")
    add_setting(parser, DemoSettings, "format", "--format",
                choices=["ham10000", "isic2018", "isic2019"])
    add_setting(parser, DemoSettings, "preset", "--preset", choices=list(PRESETS))
    add_setting(parser, DemoSettings, "segmenter_epochs", "--segmenter-epochs", type=int)
    add_setting(parser, DemoSettings, "classifier_epochs", "--classifier-epochs", type=int)
    add_setting(parser, DemoSettings, "batch_size", "--batch-size", type=int)
    add_setting(parser, DemoSettings, "workers", "--workers", type=int)
    add_setting(parser, DemoSettings, "out", "--out")
    add_setting(parser, DemoSettings, "storage", "--storage")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags."""
    try:
        import httpx  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the demo needs the 'demo' extra ({exc.name} is not installed): "
                         "pip install 'raysky[demo]'") from exc
    from raysky.cli.options import settings_from_args
    from raysky.local.demo import DemoSettings, run_demo

    run_demo(settings_from_args(DemoSettings, args))
    return 0
