"""Jobs run the way a cluster runs them: `ray start --head` plus `JobSubmissionClient`.

A real Ray head is started in its own process group (dashboard on 127.0.0.1, token auth on, a
private temp dir and free ports, so it never touches another Ray on this machine). The jobs are
submitted with the repository as working_dir and the S3 endpoint only in the job's runtime_env;
their results are then read back from the moto S3 bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from raysky import storage
from raysky.models import create_classifier, create_segmenter, load_checkpoint, save_checkpoint
from raysky.storage import upload_directory
from tests.helpers import REPO

pytestmark = pytest.mark.slow

VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
# What a job needs from the repository is the code (with its bundled sample) and the job
# entrypoints; the rest
# (virtualenvs, VCS data, build and run outputs) stays behind. Ray also honours .gitignore.
WORKING_DIR_EXCLUDES = [".venv*", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache",
                        ".ruff_cache", "build", "dist", "runs", "demo-output", "benchmarks",
                        "docs", "infra/terraform/.terraform", "tests"]
JOB_TIMEOUT_S = 600


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _processes_using(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (our head's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


class RayHead:
    """A `ray start --head --block` process group, and how to reach its job API."""

    def __init__(self, env_extra: dict[str, str] | None = None):
        self.token = secrets.token_hex(32)
        # Short path: Ray puts Unix sockets under the temp dir (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rsk-head-", dir="/tmp")
        (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc,
         runtime_env_agent, metrics) = _free_ports(9)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AWS_", "RAY_"))}  # S3 settings must come from the job
        env.update({
            # The cluster's token, as every node of a real cluster gets it; job drivers and
            # workers inherit it from the raylet.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # The job's `python` is this virtualenv's, as on a node set up from cluster.yaml.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            **(env_extra or {}),
        })
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
            "--num-cpus=4", "--num-gpus=0", f"--object-store-memory={512 * 1024 ** 2}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, headers: dict[str, str] | None = None):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=headers)

    def wait_ready(self, timeout: float = 180.0):
        """Return an authenticated JobSubmissionClient once the job API answers."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-4000:]}")
            try:
                client = self.client(self.auth_headers)
                client.list_jobs()
                return client
            except Exception as exc:  # the dashboard is still starting
                last_error = exc
                time.sleep(2)
        raise TimeoutError(f"Ray head not ready after {timeout}s: {last_error}")

    def stop(self) -> None:
        """Stop this head and everything it started, and nothing else on the machine."""
        if self.process.poll() is None:
            # `ray start --block` shuts its node down in order on SIGTERM; signalling the whole
            # group instead kills the processes it waits on and leaves it hanging.
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # Workers re-parented away from the group still name our private temp dir.
        for _ in range(10):
            leftovers = _processes_using(self.temp_dir)
            if not leftovers:
                break
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(s3):
    head = RayHead()
    try:
        client = head.wait_ready()
        yield head, client
    finally:
        head.stop()
        assert not _processes_using(head.temp_dir), "Ray head processes survived teardown"


def _runtime_env(s3) -> dict:
    return {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES,
            "env_vars": {**s3.env, "HF_HUB_OFFLINE": "1"}}


def _wait_for(client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        if not status.is_terminal():
            client.stop_job(job_id)
        logs = client.get_job_logs(job_id)
        pytest.fail(f"job {job_id} ended {status}:\n{logs[-6000:]}")
    return client.get_job_logs(job_id)


def test_job_api_rejects_requests_without_the_cluster_token(ray_head):
    head, _client = ray_head
    for headers in ({"Authorization": "Bearer not-the-token"}, {"X-Other": "1"}):
        with pytest.raises(Exception) as excinfo:
            head.client(headers).list_jobs()
        assert any(code in str(excinfo.value) for code in ("401", "403", "uthentic")), excinfo.value


def test_score_job_submitted_to_the_cluster_writes_results_to_s3(ray_head, s3, sample_dir):
    _head, client = ray_head
    bucket = s3.create_bucket("raysky-job-submission")
    archive = storage.join(bucket, "archive")
    images = sorted(p.stem for p in (sample_dir / "images").glob("*.jpg"))
    assert upload_directory(str(sample_dir / "images"), archive) == len(images)
    segmenter = storage.join(bucket, "models", "segmenter")
    classifier = storage.join(bucket, "models", "classifier")
    save_checkpoint(create_segmenter("tiny"), segmenter, "tiny")
    save_checkpoint(create_classifier("tiny"), classifier, "tiny")
    output = storage.join(bucket, "results", "screening")

    job_id = client.submit_job(
        entrypoint=f"python jobs/score_archive.py --input {archive} --output {output} "
                   f"--segmenter {segmenter} --classifier {classifier}",
        runtime_env=_runtime_env(s3),
    )
    _wait_for(client, job_id)

    from raysky import results

    frame = results.read(output)
    assert sorted(frame["image_id"]) == images
    assert (frame["status"] == "ok").all(), frame.loc[frame["status"] != "ok", "error"].tolist()
    probabilities = frame[results.class_columns(frame)].sum(axis=1)
    assert ((probabilities - 1.0).abs() < 1e-4).all()
    assert set(frame["segmenter_version"]) == {load_checkpoint(segmenter).version}
    assert set(frame["classifier_version"]) == {load_checkpoint(classifier).version}


def test_training_job_submitted_to_the_cluster_checkpoints_to_s3(ray_head, s3):
    _head, client = ray_head
    bucket = s3.create_bucket("raysky-job-submission")
    runs = storage.join(bucket, "runs")

    # The sample travels inside the working_dir (in the package), exactly as `ray job submit
    # --working-dir .`.
    job_id = client.submit_job(
        entrypoint=f"python jobs/train_segmenter.py --data raysky/sample_data/ham10000_sample --format ham10000 "
                   f"--preset tiny --epochs 1 --batch-size 8 --workers 1 "
                   f"--storage {runs} --name cluster-job",
        runtime_env=_runtime_env(s3),
    )
    _wait_for(client, job_id)

    # The run's summary names the best checkpoint, which loads back as a segmenter.
    run = storage.join(runs, "cluster-job")
    summary = json.loads(storage.read_bytes(storage.join(run, "result.json")))
    best = summary["best_checkpoint_uri"]
    assert best and best.startswith(run + "/"), summary
    assert storage.exists(storage.join(best, "model.safetensors"))
    loaded = load_checkpoint(best, expected_kind="segmenter")
    # One epoch: the best checkpoint is that epoch's, and its own metrics are the summary's.
    assert [h["epoch"] for h in summary["history"]] == [1] and loaded.meta["extra"]["epoch"] == 1
    in_checkpoint = json.loads(storage.read_bytes(storage.join(best, "metrics.json")))
    assert in_checkpoint["dice"] == pytest.approx(summary["metrics"]["dice"])
    assert 0.0 <= summary["metrics"]["jaccard"] <= summary["metrics"]["dice"] <= 1.0
