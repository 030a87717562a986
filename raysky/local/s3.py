"""An embedded S3 endpoint (the moto server) on 127.0.0.1, for tests and the demo.

raysky itself only ever talks to S3 through the standard AWS variables; this module starts a
real S3-compatible HTTP server on loopback and points those variables at it, so every code
path that runs against AWS runs unchanged against it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from raysky.local.net import free_port

S3_ENV_DEFAULTS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class LocalS3:
    """A running embedded S3 endpoint and the environment that reaches it."""

    endpoint_url: str
    env: dict[str, str]

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (idempotent) and return its ``s3://`` URI."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@contextmanager
def local_s3(port: int = 0, set_environ: bool = True) -> Iterator[LocalS3]:
    """Run the moto S3 server on 127.0.0.1 for the duration of the block.

    With ``set_environ`` the process environment gets ``AWS_ENDPOINT_URL`` and dummy
    credentials (restored afterwards), so Ray workers started later inherit them too.
    """
    import logging

    from moto.server import ThreadedMotoServer

    # The server logs every request through werkzeug; on a screening job that is one line per
    # object and buries the progress output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV_DEFAULTS, "AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in env}
    if set_environ:
        os.environ.update(env)
    try:
        yield LocalS3(endpoint_url=endpoint, env=env)
    finally:
        if set_environ:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        server.stop()

