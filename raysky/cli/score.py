"""``raysky score``, ``pack`` and ``results``: screening an archive with Ray Data."""

from __future__ import annotations

import argparse
import json
import sys

from raysky.cli.exit_codes import EXIT_OK, EXIT_TEMPFAIL
from raysky.cli.options import add_setting, settings_from_args
from raysky.models.runtime import PRECISIONS
from raysky.results.columns import CASE_COLUMNS
from raysky.score.settings import ENGINES, ScoreSettings


def register(subparsers) -> None:
    """Add the ``score``, ``pack`` and ``results`` sub-commands."""
    _add_score(subparsers)
    _add_pack(subparsers)
    _add_results(subparsers)


def _add_score(subparsers) -> None:
    """``raysky score``: every option is a :class:`ScoreSettings` field."""
    score = subparsers.add_parser(
        "score", help="score an archive of images (prefix or packed shards) into Parquet",
        description="Segment, classify and explain (Grad-CAM) every image under --input with Ray "
        "Data, writing one row per input object to Parquet under --output. Bad images get a row "
        "with status 'error', the reason and an error_kind (bad_input or transient). Running "
        "again into the same output scores only what is missing and what failed transiently. "
        "One run at a time per output (lock object _raysky.lock); _SUCCESS marks a complete "
        "output. Paths may be local or s3:// (endpoint from AWS_ENDPOINT_URL).")
    for name, flag in (("input", "--input"), ("output", "--output"),
                       ("segmenter", "--segmenter"), ("classifier", "--classifier")):
        add_setting(score, ScoreSettings, name, flag)
    add_setting(score, ScoreSettings, "metadata", "--metadata", metavar="CSV_URI")
    add_setting(score, ScoreSettings, "heatmaps", "--no-heatmaps", dest="heatmaps",
                action="store_false")
    add_setting(score, ScoreSettings, "batch_size", "--batch-size", type=int)
    add_setting(score, ScoreSettings, "gpus_per_worker", "--gpus-per-worker", type=float)
    add_setting(score, ScoreSettings, "cpus_per_worker", "--cpus-per-worker", type=int)
    add_setting(score, ScoreSettings, "workers", "--workers", type=int)
    add_setting(score, ScoreSettings, "rows_per_file", "--rows-per-file", type=int,
                note="files are also cut at 512 MiB of PNG data")
    add_setting(score, ScoreSettings, "precision", "--precision", choices=PRECISIONS)
    add_setting(score, ScoreSettings, "engine", "--engine", choices=ENGINES)
    add_setting(score, ScoreSettings, "tta", "--tta", action="store_true")
    add_setting(score, ScoreSettings, "max_pixels", "--max-pixels", type=int)
    add_setting(score, ScoreSettings, "top", "--top", type=int)
    add_setting(score, ScoreSettings, "ray_address", "--address")
    add_setting(score, ScoreSettings, "retry_transient", "--no-retry-transient",
                dest="retry_transient", action="store_false")
    add_setting(score, ScoreSettings, "lock_timeout_s", "--lock-timeout", type=float,
                metavar="SECONDS")
    score.add_argument("--json", action="store_true", help="print the summary as JSON")
    score.set_defaults(func=run_score)


def _add_pack(subparsers) -> None:
    """``raysky pack``: repack image objects into Parquet shards."""
    pack = subparsers.add_parser(
        "pack", help="repack small image objects into Parquet shards for faster scoring",
        description="Copy every image under --input into Parquet shards (image_id, source_uri, "
        "image bytes, metadata) of at most --rows-per-file rows. `raysky score` reads shards "
        "in large requests instead of one request per object. Resumable.")
    pack.add_argument("--input", required=True, help="prefix of .jpg/.jpeg/.png/.dcm objects")
    pack.add_argument("--output", required=True, help="prefix for the shards")
    # The same fields as `raysky score`'s: shards are cut like results files, and --address
    # means the same Ray either way.
    add_setting(pack, ScoreSettings, "rows_per_file", "--rows-per-file", type=int)
    add_setting(pack, ScoreSettings, "metadata", "--metadata", metavar="CSV_URI")
    add_setting(pack, ScoreSettings, "ray_address", "--address")
    pack.set_defaults(func=run_pack)


def _add_results(subparsers) -> None:
    """``raysky results``: summarise what ``raysky score`` wrote."""
    show = subparsers.add_parser(
        "results", help="summarise scoring results, per image or per lesion/patient",
        description="Read results written by `raysky score` (one row per input, duplicates "
        "removed) and print counts of ok and error rows, error reasons, the class "
        "distribution and the images with the highest malignant_prob. With --by, fold the "
        "images into one row per lesion or patient: the highest malignant_prob and its "
        "image, whether any image is referred, the worst OOD flag and the image count.")
    show.add_argument("uri", help="results prefix written by `raysky score`")
    add_setting(show, ScoreSettings, "top", "--top", type=int)
    show.add_argument("--by", choices=CASE_COLUMNS, default=None,
                      help="one row per lesion or patient (images without one stand alone)")
    show.add_argument("--out", default=None, metavar="FILE",
                      help="with --by, write every case to this .csv or .parquet (local or s3://)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=run_results)


def run_score(args: argparse.Namespace) -> int:
    """Run ``raysky score``."""
    from raysky.score.pipeline import score_archive

    summary = score_archive(settings_from_args(ScoreSettings, args))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    transient = summary.totals.get("transient_errors", 0)
    if transient:
        # Every input has a row, but these rows are worth another try: say so in the exit code,
        # so a scheduler retries the run instead of taking it as done.
        print(f"raysky score: {transient} inputs still failed transiently (error_kind "
              "'transient'); run the same command again to retry them", file=sys.stderr)
        return EXIT_TEMPFAIL
    return EXIT_OK


def run_pack(args: argparse.Namespace) -> int:
    """Run ``raysky pack``."""
    from raysky.score.pack import pack_archive

    summary = pack_archive(args.input, args.output, rows_per_file=args.rows_per_file,
                           metadata_uri=args.metadata, ray_address=args.address)
    print(summary.format())
    return 0


def run_results(args: argparse.Namespace) -> int:
    """Run ``raysky results``."""
    from raysky.results import by_case, summary

    if args.out and not args.by:
        raise ValueError("--out writes the per-case table: give --by lesion_id or patient_id")
    if args.by:
        table = by_case.cases(args.uri, by=args.by)
        if args.out:
            _write_cases(table, args.out)
        if args.json:
            print(table.head(args.top).to_json(orient="records", indent=2))
        else:
            print(by_case.format_cases(table, args.by, args.top))
            if args.out:
                print(f"{len(table)} cases written to {args.out}")
        return 0
    totals = summary.summarize(args.uri, top=args.top)
    print(json.dumps(totals, indent=2) if args.json else summary.format_summary(totals))
    return 0


def _write_cases(table, uri: str) -> None:
    """The per-case table as CSV (image ids joined by ';') or Parquet, local or ``s3://``."""
    import io

    from raysky import storage

    if uri.lower().endswith(".parquet"):
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    elif uri.lower().endswith(".csv"):
        flat = table.assign(image_ids=table["image_ids"].map(";".join))
        data = flat.to_csv(index=False, lineterminator="\n").encode()
    else:
        raise ValueError(f"--out {uri}: expected a .csv or .parquet file name")
    storage.write_bytes(uri, data)
