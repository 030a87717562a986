"""``raysky serve``: run the live endpoint until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os


def register(subparsers) -> None:
    """Add the ``serve`` sub-command."""
    from raysky.cli.options import add_setting
    from raysky.models.runtime import PRECISIONS
    from raysky.serve.config import ServeSettings

    parser = subparsers.add_parser(
        "serve", help="run the live HTTP endpoint (Ray Serve) until Ctrl-C",
        description="Deploy the segmenter + classifier + Grad-CAM pipeline behind a batched, "
        "autoscaled Ray Serve endpoint and block until Ctrl-C or SIGTERM, then shut it down. "
        "POST /v1/predict takes a multipart 'image' plus optional age, sex, site and image_id, "
        "and needs 'Authorization: Bearer <key>'. The keys (at least 32 characters each) come "
        "from --api-keys-file, the file named by RAYSKY_API_KEYS_FILE, or RAYSKY_API_KEYS "
        "(comma separated); without any the command refuses to start unless "
        "--allow-unauthenticated is given. For 'serve run'/'serve deploy' use "
        "infra/serve/raysky.yaml instead.")
    add_setting(parser, ServeSettings, "segmenter", "--segmenter")
    add_setting(parser, ServeSettings, "classifier", "--classifier")
    add_setting(parser, ServeSettings, "host", "--host")
    add_setting(parser, ServeSettings, "port", "--port", type=int)
    add_setting(parser, ServeSettings, "min_replicas", "--min-replicas", type=int)
    add_setting(parser, ServeSettings, "max_replicas", "--max-replicas", type=int)
    add_setting(parser, ServeSettings, "target_ongoing_requests", "--target-ongoing-requests",
                type=float)
    add_setting(parser, ServeSettings, "max_batch_size", "--max-batch-size", type=int)
    add_setting(parser, ServeSettings, "batch_wait_timeout_s", "--batch-wait-ms", type=float,
                note="in milliseconds", to_flag=lambda s: s * 1000.0,
                from_flag=lambda ms: ms / 1000.0)
    add_setting(parser, ServeSettings, "max_ongoing_requests", "--max-ongoing-requests",
                type=int)
    add_setting(parser, ServeSettings, "max_queued_requests", "--max-queued-requests",
                type=int)
    add_setting(parser, ServeSettings, "num_cpus", "--num-cpus", type=float)
    add_setting(parser, ServeSettings, "torch_threads", "--threads", type=int)
    add_setting(parser, ServeSettings, "use_gpu", "--gpu", action="store_true")
    add_setting(parser, ServeSettings, "precision", "--precision", choices=PRECISIONS)
    add_setting(parser, ServeSettings, "tta", "--tta", action="store_true")
    add_setting(parser, ServeSettings, "max_body_bytes", "--max-body-mb", type=float,
                note="in MiB", to_flag=lambda b: b / 2**20,
                from_flag=lambda mib: int(mib * 2**20))
    add_setting(parser, ServeSettings, "max_pixels", "--max-pixels", type=int)
    add_setting(parser, ServeSettings, "max_inflight_pixels", "--max-inflight-pixels",
                type=int)
    add_setting(parser, ServeSettings, "api_keys_file", "--api-keys-file")
    add_setting(parser, ServeSettings, "allow_unauthenticated", "--allow-unauthenticated",
                action="store_true")
    add_setting(parser, ServeSettings, "enable_docs", "--enable-docs", action="store_true")
    add_setting(parser, ServeSettings, "access_log", "--access-log")
    add_setting(parser, ServeSettings, "ray_address", "--address")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Deploy, print the URL, block until interrupted, shut down."""
    from raysky.cli.options import settings_from_args
    from raysky.serve.config import ServeSettings
    from raysky.serve.security import load_api_keys
    from raysky.serve.server import run_server

    # Read here, so a missing or short key fails before Ray starts, and so the keys also
    # protect replicas on other nodes (--address auto), which only receive their digests.
    keys = load_api_keys(args.api_keys_file)
    # The keys are already read from the file: AppConfig takes one or the other, not both.
    settings = settings_from_args(
        ServeSettings, args, api_keys=keys, api_keys_file=None,
        access_log=os.path.abspath(args.access_log) if args.access_log else None)
    # So warnings, such as serving without authentication, reach this terminal with their level.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    auth = f"on ({len(keys)} keys)" if keys else "OFF"
    print(f"raysky serve: API-key auth {auth}; {settings.min_replicas}-"
          f"{settings.max_replicas} model replicas, batches of {settings.max_batch_size}",
          flush=True)
    run_server(settings, blocking=True)
    return 0
