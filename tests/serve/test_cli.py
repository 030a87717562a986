"""``raysky serve`` end to end: a real process with its own local Ray, stopped with Ctrl-C."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from raysky.cli.main import main
from raysky.local.net import free_port

pytestmark = pytest.mark.slow


def _raysky(*args: str) -> list[str]:
    return [sys.executable, "-m", "raysky.cli.main", *args]


def _predict(http: httpx.Client, jpeg: bytes, headers: dict) -> httpx.Response:
    return http.post("/v1/predict", files={"image": ("a.jpg", jpeg, "image/jpeg")},
                     headers=headers)


def test_cli_serves_until_ctrl_c_then_shuts_down(tiny_checkpoints, sample_dir: Path, tmp_path):
    jpeg = next((sample_dir / "images").glob("*.jpg")).read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "cli.log"
    key = secrets.token_urlsafe(32)
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{key}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYSKY_API_KEYS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _raysky("serve", "--segmenter", tiny_checkpoints["segmenter"], "--classifier",
                    tiny_checkpoints["classifier"], "--port", str(port), "--num-cpus", "0.5",
                    "--threads", "1", "--api-keys-file", str(keys_file)),
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while f"serving on {url}" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=180) as http:
            assert http.get("/readyz").status_code == 200
            assert _predict(http, jpeg, {}).status_code == 401
            ok = _predict(http, jpeg, {"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["predicted_class"] in ok.json()["classes"]
            assert http.get("/docs").status_code == 404  # off without --enable-docs
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutting down" in log_path.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=5)


def test_cli_rejects_a_missing_checkpoint_before_starting_ray(tiny_checkpoints, tmp_path,
                                                             capsys):
    import ray

    was_running = ray.is_initialized()
    assert main(["serve", "--segmenter", str(tmp_path / "nope"), "--classifier",
                 tiny_checkpoints["classifier"]]) == 2
    assert "nope" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


@pytest.mark.parametrize("args, message", [
    (["--max-batch-size", "8", "--max-ongoing-requests", "4"],
     "max_ongoing_requests (4) must be at least max_batch_size (8)"),
    (["--min-replicas", "3", "--max-replicas", "2"], "min_replicas <= max_replicas"),
    (["--port", "0"], "port must be in 1..65535"),
])
def test_cli_rejects_inconsistent_settings(tiny_checkpoints, capsys, args, message):
    ckpts = ["--segmenter", tiny_checkpoints["segmenter"],
             "--classifier", tiny_checkpoints["classifier"]]
    assert main(["serve", *ckpts, *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_swapped_checkpoints(tiny_checkpoints, capsys):
    assert main(["serve", "--segmenter", tiny_checkpoints["classifier"], "--classifier",
                 tiny_checkpoints["segmenter"]]) == 2
    assert "is a classifier checkpoint, but a segmenter was expected" in capsys.readouterr().err


@pytest.mark.parametrize("env, extra, message", [
    ({}, [], "no API keys"),
    ({"RAYSKY_API_KEYS": "short-key"}, [], "keys need at least 32"),
    ({}, ["--api-keys-file", "/nonexistent/raysky-keys"], "cannot read the API key file"),
], ids=["no-keys", "short-key", "missing-file"])
def test_cli_refuses_to_start_without_usable_keys_before_starting_ray(
        tiny_checkpoints, capsys, monkeypatch, env, extra, message):
    import ray

    for name in ("RAYSKY_API_KEYS", "RAYSKY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    was_running = ray.is_initialized()
    assert main(["serve", "--segmenter", tiny_checkpoints["segmenter"], "--classifier",
                 tiny_checkpoints["classifier"], *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "short-key" not in err
    assert ray.is_initialized() == was_running
