"""The live endpoint: a batched, autoscaled, API-key-secured Ray Serve application.

``run_server(ServeSettings(...))`` deploys it and returns its URL; ``shutdown()`` stops it;
``build_app`` is the builder Serve's own tools import (``infra/serve/raysky.yaml``). Public
names load on first use (:mod:`raysky.exports`), so ``raysky --help`` and code that only reads
settings stay fast.
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "AppConfig": "config", "ServeSettings": "config", "build_app": "app", "run_server": "server",
    "serve_forever": "server", "shutdown": "server",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
