"""``raysky serve``: run the live endpoint until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os


def register(subparsers) -> None:
    """Add the ``serve`` sub-command."""
    from raysky.cli.options import settings_defaults
    from raysky.models.runtime import PRECISIONS
    from raysky.serve.config import ServeSettings

    d = settings_defaults(ServeSettings)

    parser = subparsers.add_parser(
        "serve", help="run the live HTTP endpoint (Ray Serve) until Ctrl-C",
        description="Deploy the segmenter + classifier + Grad-CAM pipeline behind a batched, "
        "autoscaled Ray Serve endpoint and block until Ctrl-C or SIGTERM, then shut it down. "
        "POST /v1/predict takes a multipart 'image' plus optional age, sex, site and image_id, "
        "and needs 'Authorization: Bearer <key>'. The keys (at least 32 characters each) come "
        "from --api-keys-file, the file named by RAYSKY_API_KEYS_FILE, or RAYSKY_API_KEYS "
        "(comma separated); without any the command refuses to start unless "
        "--allow-unauthenticated is given. For 'serve run'/'serve deploy' use "
        "infra/serve/raysky.yaml instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--segmenter", required=True,
                        help="segmenter checkpoint directory or s3:// prefix")
    parser.add_argument("--classifier", required=True,
                        help="classifier checkpoint directory or s3:// prefix")
    parser.add_argument("--host", default=d["host"],
                        help="address to bind; 0.0.0.0 exposes the endpoint to the network")
    parser.add_argument("--port", type=int, default=d["port"], help="HTTP port")
    parser.add_argument("--min-replicas", type=int, default=d["min_replicas"],
                        help="model replicas kept running when idle")
    parser.add_argument("--max-replicas", type=int, default=d["max_replicas"],
                        help="model replicas the autoscaler may grow to")
    parser.add_argument("--target-ongoing-requests", type=float,
                        default=d["target_ongoing_requests"],
                        help="autoscaling target of in-flight requests per model replica "
                        "(default: --max-batch-size)")
    parser.add_argument("--max-batch-size", type=int, default=d["max_batch_size"],
                        help="largest batch a model replica scores at once")
    parser.add_argument("--batch-wait-ms", type=float, default=d["batch_wait_timeout_s"] * 1000.0,
                        help="how long an idle model waits for a batch to fill; requests queued "
                        "behind a busy model join its next batch anyway")
    parser.add_argument("--max-ongoing-requests", type=int, default=d["max_ongoing_requests"],
                        help="in-flight requests per model replica (>= --max-batch-size)")
    parser.add_argument("--max-queued-requests", type=int, default=d["max_queued_requests"],
                        help="requests queued for the model beyond that; more get 503")
    parser.add_argument("--num-cpus", type=float, default=d["num_cpus"],
                        help="CPUs reserved per model replica")
    parser.add_argument("--threads", type=int, default=d["torch_threads"],
                        help="torch threads per model replica (default: --num-cpus)")
    parser.add_argument("--gpu", action="store_true", help="give each model replica one GPU")
    parser.add_argument("--precision", choices=PRECISIONS, default=d["precision"],
                        help="inference precision")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the models over the four flips of "
                        "each image (4x the model work; Grad-CAM explains the unflipped view)")
    parser.add_argument("--max-body-mb", type=float, default=d["max_body_bytes"] / 2**20,
                        help="largest request body in MiB; larger bodies get 413")
    parser.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                        help="largest image (width x height) decoded; larger images get 413")
    parser.add_argument("--max-inflight-pixels", type=int, default=d["max_inflight_pixels"],
                        help="decoded pixels an ingress replica holds at once; uploads beyond "
                        "it wait their turn, and get 503 after 30 s (default: %(default)s)")
    parser.add_argument("--api-keys-file", default=d["api_keys_file"],
                        help="file holding the accepted API keys, one per line (keep it mode "
                        "0600); default: RAYSKY_API_KEYS_FILE, else RAYSKY_API_KEYS")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve without API keys: anyone who can reach the port can use it")
    parser.add_argument("--enable-docs", action="store_true",
                        help="serve the OpenAPI schema and docs at /openapi.json and /docs")
    parser.add_argument("--access-log", default=d["access_log"],
                        help="also append the JSON access log to this local file")
    parser.add_argument("--address", default=d["ray_address"],
                        help="Ray address: 'local' starts a private Ray, 'auto' joins the "
                        "running cluster")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Deploy, print the URL, block until interrupted, shut down."""
    from raysky.serve import ServeSettings, run_server
    from raysky.serve.security import load_api_keys

    # Read here, so a missing or short key fails before Ray starts, and so the keys also
    # protect replicas on other nodes (--address auto), which only receive their digests.
    keys = load_api_keys(args.api_keys_file)
    settings = ServeSettings(
        segmenter=args.segmenter,
        classifier=args.classifier,
        host=args.host,
        port=args.port,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        num_cpus=args.num_cpus,
        torch_threads=args.threads,
        use_gpu=args.gpu,
        precision=args.precision,
        tta=args.tta,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
        max_inflight_pixels=args.max_inflight_pixels,
        api_keys=keys,
        allow_unauthenticated=args.allow_unauthenticated,
        enable_docs=args.enable_docs,
        access_log=os.path.abspath(args.access_log) if args.access_log else None,
        ray_address=args.address,
    )
    # So warnings, such as serving without authentication, reach this terminal with their level.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    auth = f"on ({len(keys)} keys)" if keys else "OFF"
    print(f"raysky serve: API-key auth {auth}; {settings.min_replicas}-"
          f"{settings.max_replicas} model replicas, batches of {settings.max_batch_size}",
          flush=True)
    run_server(settings, blocking=True)
    return 0
