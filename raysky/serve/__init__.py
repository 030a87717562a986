"""The live endpoint: a batched, autoscaled, API-key-secured Ray Serve application.

``run_server(ServeSettings(...))`` deploys it and returns its URL; ``shutdown()`` stops it;
``build_app`` is the builder Serve's own tools import (``infra/serve/raysky.yaml``).
"""

from __future__ import annotations

from raysky.serve.config import AppConfig, ServeSettings

__all__ = ["AppConfig", "ServeSettings", "build_app", "run_server", "serve_forever", "shutdown"]

_LAZY = {"build_app": "raysky.serve.app", "run_server": "raysky.serve.server",
         "serve_forever": "raysky.serve.server", "shutdown": "raysky.serve.server"}


def __getattr__(name: str):
    # Ray Serve, torch and the models load on first use, so `raysky --help` and code that
    # only reads settings stay fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raysky.serve' has no attribute {name!r}")
