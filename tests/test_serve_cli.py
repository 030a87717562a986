"""``raysky serve`` end to end: a real process with its own local Ray, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from raysky.cli.main import main
from raysky.net import free_port

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
    env = dict(os.environ, RAYSKY_API_KEYS="cli-key", RAY_USAGE_STATS_ENABLED="0")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _raysky("serve", "--segmenter", tiny_checkpoints["segmenter"], "--classifier",
                    tiny_checkpoints["classifier"], "--port", str(port), "--num-cpus", "0.5",
                    "--threads", "1"),
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
            ok = _predict(http, jpeg, {"Authorization": "Bearer cli-key"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["predicted_class"] in ok.json()["classes"]
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
