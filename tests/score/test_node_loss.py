"""Node loss: a two-node local Ray cluster loses its worker node mid-run; the output is complete.

The cluster must be the only Ray in its process, so the scenario runs in a subprocess (this
module, run with ``python -m`` from the checkout so that ``tests.helpers`` imports) and never
touches the session's ``ray_local``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import REPO


def _rows_written(output: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in output.glob("part-*.parquet"))


def run_scenario(archive: str, output: str, segmenter: str, classifier: str, report: str) -> None:
    """Score ``archive`` on a head + worker cluster and remove the worker once files appear."""
    import ray
    from ray.cluster_utils import Cluster

    from raysky.score import ScoreSettings, score_archive

    # The surviving head must fit the fixed pool of 2 model workers (1 CPU each) plus a CPU for
    # the decode/encode/write tasks; with less, the pool would hold every CPU and wait forever.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    facts: dict = {}

    def lose_worker() -> None:
        deadline = time.monotonic() + 300
        while not list(Path(output).glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        facts["rows_before_loss"] = _rows_written(Path(output))
        cluster.remove_node(worker, allow_graceful=False)

    thread = threading.Thread(target=lose_worker, daemon=True)
    thread.start()
    try:
        summary = score_archive(ScoreSettings(
            input=archive, output=output, segmenter=segmenter, classifier=classifier,
            batch_size=5, rows_per_file=5, workers=2, cpus_per_worker=1, progress=False))
        thread.join(timeout=60)
        facts["worker_alive_at_end"] = any(
            node["NodeID"] == worker.node_id and node["Alive"] for node in ray.nodes())
        facts.update(scored=summary.scored, inputs=summary.inputs, ok=summary.scored_ok)
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(report).write_text(json.dumps(facts))


@pytest.mark.slow
def test_losing_a_worker_node_mid_run_leaves_complete_output(sample_dir, tiny_checkpoints, tmp_path):
    from raysky import results

    archive, output, report = tmp_path / "archive", tmp_path / "results", tmp_path / "report.json"
    for copy in range(2):
        target = archive / f"copy{copy}"
        target.mkdir(parents=True)
        for path in sorted((sample_dir / "images").glob("*.jpg")):
            shutil.copy(path, target / f"{path.stem}_{copy}.jpg")
    total = len(list(archive.rglob("*.jpg")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", __name__, str(archive), str(output), tiny_checkpoints["segmenter"],
         tiny_checkpoints["classifier"], str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    facts = json.loads(report.read_text())
    assert facts["rows_before_loss"] < total, f"the worker was lost only after the run: {facts}"
    assert facts["worker_alive_at_end"] is False, facts
    assert facts["scored"] == facts["inputs"] == facts["ok"] == total
    frame = results.read(str(output), ["image_id", "status"])
    assert len(frame) == total and frame["image_id"].is_unique
    on_disk = pa.concat_tables(pq.read_table(p, columns=["image_id"]) for p in output.glob("*.parquet"))
    assert on_disk.num_rows == total, "duplicate rows left on disk"


if __name__ == "__main__":
    run_scenario(*sys.argv[1:6])
