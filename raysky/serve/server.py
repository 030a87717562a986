"""Start and stop the endpoint from Python: what ``raysky serve`` and the demo call.

``run_server`` initialises Ray if needed (a private local instance by default), starts Serve
with the requested HTTP host and port, deploys the application and returns its base URL.
``shutdown`` undoes exactly what ``run_server`` started: its applications, then Serve and Ray
only if this process started them, so an embedding program's own Ray or Serve survives.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from raysky.cluster import ensure_ray
from raysky.serve.app import build_application, check_api_keys, check_checkpoints
from raysky.serve.config import ServeSettings

logger = logging.getLogger(__name__)


@dataclass
class _ServerState:
    apps: list[str] = field(default_factory=list)
    started_serve: bool = False
    started_ray: bool = False


_state = _ServerState()
_lock = threading.Lock()


def base_url(settings: ServeSettings) -> str:
    """The URL clients use; a wildcard bind address is reported as the loopback address."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"


def run_server(settings: ServeSettings, blocking: bool = False) -> str:
    """Deploy the endpoint and return its base URL (e.g. ``http://127.0.0.1:8000``).

    Returns once every replica is up and has loaded its models. With ``blocking=True`` it
    then prints the URL, waits for Ctrl-C or SIGTERM, calls :func:`shutdown` and returns.
    HTTP options only apply when this call starts Serve; a Serve already running on the
    cluster keeps its own host and port. Deploying under an existing application name
    replaces that application.
    """
    import ray
    from ray import serve

    # Before starting anything: a wrong path or missing keys should fail in a second, not
    # after Ray is up.
    check_checkpoints(settings)
    check_api_keys(settings)
    with _lock:
        if not ray.is_initialized():
            ensure_ray(settings.ray_address)
            _state.started_ray = True
        if not serve.status().proxies:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            _state.started_serve = True
        serve.run(build_application(settings), name=settings.app_name,
                  route_prefix=settings.route_prefix)
        if settings.app_name not in _state.apps:
            _state.apps.append(settings.app_name)
    url = base_url(settings)
    if blocking:
        docs = f" (OpenAPI at {url}/docs)" if settings.enable_docs else ""
        print(f"raysky: serving on {url}{docs}; Ctrl-C to stop", flush=True)
        serve_forever()
    return url


def serve_forever() -> None:
    """Block until Ctrl-C or SIGTERM, then :func:`shutdown`."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A container runtime stops processes with SIGTERM; treat it like Ctrl-C.
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("raysky: shutting down", file=sys.stderr, flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def shutdown(app_name: str | None = None) -> None:
    """Delete the application(s) ``run_server`` deployed; stop Serve and Ray if it started them.

    With ``app_name``, only that application is deleted, and Serve keeps running while other
    applications started here remain.
    """
    import ray
    from ray import serve

    with _lock:
        if not ray.is_initialized():
            _state.apps.clear()
            return
        names = [app_name] if app_name else list(_state.apps)
        for name in names:
            if name in _state.apps:
                serve.delete(name)
                _state.apps.remove(name)
        if not _state.apps:
            if _state.started_serve:
                serve.shutdown()
                _state.started_serve = False
            if _state.started_ray:
                ray.shutdown()
                _state.started_ray = False
