"""``raysky score``, ``pack``, ``export`` and ``results``: screening an archive with Ray Data."""

from __future__ import annotations

import argparse
import json

from raysky.cli.options import settings_defaults
from raysky.models.runtime import PRECISIONS
from raysky.score.pipeline import ScoreSettings


def register(subparsers) -> None:
    """Add the ``score``, ``pack``, ``export`` and ``results`` sub-commands."""
    d = settings_defaults(ScoreSettings)
    score = subparsers.add_parser(
        "score", help="score an archive of images (prefix or packed shards) into Parquet",
        description="Segment, classify and explain (Grad-CAM) every image under --input with Ray "
        "Data, writing one row per input object to Parquet under --output. Bad images get a row "
        "with status 'error', the reason and an error_kind (bad_input or transient). Running "
        "again into the same output scores only what is missing and what failed transiently. "
        "One run at a time per output (lock object _raysky.lock); _SUCCESS marks a complete "
        "output. Paths may be local or s3:// (endpoint from AWS_ENDPOINT_URL).")
    score.add_argument("--input", required=True,
                       help="prefix of .jpg/.jpeg/.png objects, or shards written by `raysky pack`")
    score.add_argument("--output", required=True, help="results prefix (part-*.parquet files)")
    score.add_argument("--segmenter", required=True, help="segmenter checkpoint directory or prefix")
    score.add_argument("--classifier", required=True, help="classifier checkpoint directory or prefix")
    score.add_argument("--metadata", metavar="CSV_URI",
                       help="CSV joined by image id (image_id or image column; age, sex, "
                       "localization/anatom_site_general); images without a row get unknown metadata")
    score.add_argument("--no-heatmaps", dest="heatmaps", action="store_false",
                       help="skip Grad-CAM: no heatmap_png column, lesion_focus left empty")
    score.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help="images per model call (default %(default)s)")
    score.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                       help="GPUs per model worker; 0 runs the models on CPU (default %(default)s)")
    score.add_argument("--cpus-per-worker", type=int, default=d["cpus_per_worker"],
                       help="CPUs, and torch threads, per model worker (default %(default)s)")
    score.add_argument("--workers", type=int, default=d["workers"],
                       help="model workers; default: grow from 1 to what the cluster fits")
    score.add_argument("--rows-per-file", type=int, default=d["rows_per_file"],
                       help="rows per Parquet file at most (default %(default)s); files are also cut at "
                       "512 MiB of PNG data")
    score.add_argument("--precision", choices=PRECISIONS, default=d["precision"],
                       help="model precision (default %(default)s)")
    score.add_argument("--tta", action="store_true",
                       help="test-time augmentation: average the models over the four flips of "
                       "each image (4x the model work; Grad-CAM explains the unflipped view)")
    score.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                       help="reject larger images as decompression bombs (default %(default)s)")
    score.add_argument("--top", type=int, default=d["top"],
                       help="rows listed by malignant_prob in the summary (default %(default)s)")
    score.add_argument("--address", default=d["ray_address"],
                       help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray; "
                       "use 'auto' for a cluster started with `ray start`)")
    score.add_argument("--no-retry-transient", dest="retry_transient", action="store_false",
                       help="keep rows that failed transiently (error_kind 'transient', e.g. S3 "
                       "throttling) instead of scoring them again")
    score.add_argument("--lock-timeout", type=float, metavar="SECONDS", default=d["lock_timeout_s"],
                       help="take over another run's lock on --output after this long without "
                       "its heartbeat (default %(default)s)")
    score.add_argument("--json", action="store_true", help="print the summary as JSON")
    score.set_defaults(func=run_score)

    pack = subparsers.add_parser(
        "pack", help="repack small image objects into Parquet shards for faster scoring",
        description="Copy every image under --input into Parquet shards (image_id, source_uri, "
        "image bytes, metadata) of at most --rows-per-file rows. `raysky score` reads shards "
        "in large requests instead of one request per object. Resumable.")
    pack.add_argument("--input", required=True, help="prefix of .jpg/.jpeg/.png objects")
    pack.add_argument("--output", required=True, help="prefix for the shards")
    pack.add_argument("--rows-per-file", type=int, default=d["rows_per_file"],
                      help="images per shard at most (default %(default)s)")
    pack.add_argument("--metadata", metavar="CSV_URI", help="metadata CSV joined by image id")
    pack.add_argument("--address", default=None, help="Ray cluster address (see `raysky score`)")
    pack.set_defaults(func=run_pack)

    export = subparsers.add_parser(
        "export", help="write results in the ISIC 2018 / 2019 submission formats",
        description="Write <FORMAT>_classification.csv (image,<ISIC classes>, values in [0,1]) "
        "and <FORMAT>_segmentation/<id>_segmentation.png masks (single channel, 0/255, original "
        "size) from `raysky score` results. Images with status 'error' are left out.")
    export.add_argument("format", choices=("isic2018", "isic2019"), help="submission format")
    export.add_argument("--results", required=True, help="results prefix written by `raysky score`")
    export.add_argument("--out", required=True, help="folder or s3:// prefix to write into")
    export.set_defaults(func=run_export)

    show = subparsers.add_parser(
        "results", help="summarise scoring results",
        description="Read results written by `raysky score` (one row per input, duplicates "
        "removed) and print counts of ok and error rows, error reasons, the class "
        "distribution and the images with the highest malignant_prob.")
    show.add_argument("uri", help="results prefix written by `raysky score`")
    show.add_argument("--top", type=int, default=d["top"],
                      help="rows listed by malignant_prob (default %(default)s)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=run_results)


def run_score(args: argparse.Namespace) -> int:
    """Run ``raysky score``."""
    from raysky.score import ScoreSettings, score_archive

    summary = score_archive(ScoreSettings(
        input=args.input, output=args.output, segmenter=args.segmenter,
        classifier=args.classifier, metadata=args.metadata, heatmaps=args.heatmaps,
        batch_size=args.batch_size, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, rows_per_file=args.rows_per_file,
        precision=args.precision, tta=args.tta, max_pixels=args.max_pixels, top=args.top,
        ray_address=args.address, retry_transient=args.retry_transient,
        lock_timeout_s=args.lock_timeout,
    ))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """Run ``raysky pack``."""
    from raysky.score.pack import pack_archive

    summary = pack_archive(args.input, args.output, rows_per_file=args.rows_per_file,
                           metadata_uri=args.metadata, ray_address=args.address)
    print(summary.format())
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Run ``raysky export``."""
    from raysky.score.export import export_results

    print(export_results(args.format, args.results, args.out).format())
    return 0


def run_results(args: argparse.Namespace) -> int:
    """Run ``raysky results``."""
    from raysky import results

    summary = results.summarize(args.uri, top=args.top)
    print(json.dumps(summary, indent=2) if args.json else results.format_summary(summary))
    return 0
