"""The live endpoint: a batched, autoscaled, API-key-secured Ray Serve application.

``run_server(ServeSettings(...))`` deploys it and returns its URL; ``shutdown()`` stops it;
``build_app`` is the builder Serve's own tools import (``infra/serve/raysky.yaml``).
"""

from __future__ import annotations

from raysky.serve.app import build_app
from raysky.serve.config import AppConfig, ServeSettings
from raysky.serve.server import run_server, serve_forever, shutdown

__all__ = ["AppConfig", "ServeSettings", "build_app", "run_server", "serve_forever", "shutdown"]
