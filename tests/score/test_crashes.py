"""A worker that dies on one image (a segfault in a decoder, an out-of-memory kill) costs that
image an error row, not the run.

The crashes are real: the scoring run is a subprocess whose Ray workers load a
``sitecustomize`` that kills its own process with SIGSEGV when Pillow opens file bytes carrying
one marker (a decoder bug, in a decode task) or when the model stage unpacks pixels carrying
another (in a model actor). Nothing in raysky knows about it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysky import results
from raysky.results.columns import output_schema
from raysky.score import inputs as inputs_module
from raysky.score import pipeline, stages
from tests.helpers import REPO

DECODE_MARKER = "raysky-test-decode-crash"
MODEL_MARKER = "raysky-test-model-crash"

CRASHING_WORKERS = textwrap.dedent('''
    import os
    import signal

    if os.environ.get("RAYSKY_TEST_DECODE_MARKER"):
        import numpy
        import PIL.Image

        _decode_marker = os.environ["RAYSKY_TEST_DECODE_MARKER"].encode()
        _model_marker = os.environ["RAYSKY_TEST_MODEL_MARKER"].encode()
        _open, _frombuffer = PIL.Image.open, numpy.frombuffer

        def _crashing_open(fp, *args, **kwargs):
            if _decode_marker in (fp.getvalue() if hasattr(fp, "getvalue") else b""):
                os.kill(os.getpid(), signal.SIGSEGV)
            return _open(fp, *args, **kwargs)

        def _crashing_frombuffer(buffer, *args, **kwargs):
            # Only the model stage unpacks decoded pixels with frombuffer.
            if isinstance(buffer, bytes) and _model_marker in buffer:
                os.kill(os.getpid(), signal.SIGSEGV)
            return _frombuffer(buffer, *args, **kwargs)

        PIL.Image.open, numpy.frombuffer = _crashing_open, _crashing_frombuffer
''')


@pytest.mark.slow
def test_images_that_kill_their_worker_get_an_error_row_and_the_run_goes_on(
        sample_dir, tiny_checkpoints, tmp_path):
    archive, output, hooks = tmp_path / "archive", tmp_path / "results", tmp_path / "hooks"
    archive.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASHING_WORKERS)
    images = sorted((sample_dir / "images").glob("*.jpg"))[:7]
    for path in images:
        shutil.copy(path, archive / path.name)
    # Bytes after a JPEG's end marker are ignored by decoders: without the hook this is a fine image.
    (archive / "decoder_crasher.jpg").write_bytes(images[0].read_bytes() + DECODE_MARKER.encode())
    # A PNG whose first pixels spell the model marker (its compressed file bytes do not).
    pixels = np.full((40, 60, 3), 128, np.uint8)
    spelled = np.frombuffer(MODEL_MARKER.encode(), np.uint8)
    pixels.reshape(-1)[:len(spelled)] = spelled
    Image.fromarray(pixels).save(archive / "model_crasher.png")
    crashers = ("decoder_crasher", "model_crasher.png")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    env["RAYSKY_TEST_DECODE_MARKER"] = DECODE_MARKER
    env["RAYSKY_TEST_MODEL_MARKER"] = MODEL_MARKER
    command = [sys.executable, "-m", "raysky.cli.main", "score", "--input", str(archive),
               "--output", str(output), "--batch-size", "4", "--workers", "1",
               "--cpus-per-worker", "1", "--json",
               "--segmenter", tiny_checkpoints["segmenter"],
               "--classifier", tiny_checkpoints["classifier"]]
    job = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    # Ray's own logs may follow the summary on stdout.
    summary, _ = json.JSONDecoder().raw_decode(job.stdout[job.stdout.index("{"):])
    assert (summary["inputs"], summary["scored"], summary["scored_error"]) == (9, 9, 2)
    assert "scoring them one per task" in job.stderr

    frame = results.read(str(output), ["image_id", "status", "error", "error_kind",
                                       "segmenter_version"]).set_index("image_id")
    assert sorted(frame.index) == sorted([p.stem for p in images] + list(crashers))
    for crasher in crashers:
        crashed = frame.loc[crasher]
        assert (crashed["status"], crashed["error_kind"]) == ("error", "bad_input"), crasher
        assert "died 3 times" in crashed["error"] and crashed["segmenter_version"]
    # The images that shared the crashers' batches were scored alone and kept their own rows.
    assert (frame.drop(index=list(crashers))["status"] == "ok").all()
    assert (output / "_SUCCESS").exists()


def _lost(count: int) -> pa.Array:
    return pa.array([f"img{i}" for i in range(count)], pa.string())


def test_too_many_lost_inputs_stop_the_run_instead_of_being_marked_bad(tmp_path):
    # A broken worker loses every block: that must not turn a whole archive into error rows.
    inputs = inputs_module.Inputs(total=1000, todo=1000, table=None)
    settings = pipeline.ScoreSettings(input="in", output=str(tmp_path), segmenter="s",
                                      classifier="c")
    lost = _lost(pipeline.ISOLATE_AT_MOST + 1)
    with pytest.raises(RuntimeError, match=r"257 of 1000 inputs have no row.*run the same command"):
        pipeline._score_alone(lost, inputs, settings, {"classes": ["nv"]}, "run", None, None)


def test_lost_inputs_are_found_in_raw_tables_and_in_packed_shards(tmp_path):
    table = pa.table({"image_id": ["a", "b", "c"], "source_uri": ["s3://x/a.jpg", "s3://x/b.jpg",
                                                                   "s3://x/c.jpg"]})
    raw = inputs_module.Inputs(total=3, todo=3, table=table)
    assert inputs_module.lost_ids(raw, pa.array(["b"])).to_pylist() == ["a", "c"]
    assert inputs_module.input_rows(raw, pa.array(["c"]))["source_uri"].to_pylist() == ["s3://x/c.jpg"]

    shard = tmp_path / "part-0.parquet"
    pq.write_table(table.append_column("image", pa.array([b"A", b"B", b"C"])), shard)
    packed = inputs_module.Inputs(total=3, todo=3, shards=[str(shard)],
                             shard_columns=["image_id", "source_uri", "image"])
    assert inputs_module.lost_ids(packed, pa.array(["a", "c"])).to_pylist() == ["b"]
    rows = inputs_module.input_rows(packed, pa.array(["b"]))
    assert (rows["image_id"].to_pylist(), rows["image"].to_pylist()) == (["b"], [b"B"])


def test_failure_rows_are_error_rows_of_the_results_schema():
    schema = output_schema(("nv", "mel"), heatmaps=True)
    table = stages.failure_rows(["x"], ["s3://a/x.jpg"], "worker died", stages.BAD_INPUT, schema,
                                {"segmenter_version": "s1", "classifier_version": "c1"})
    assert table.schema == schema
    row = table.to_pylist()[0]
    assert (row["status"], row["error"], row["error_kind"]) == ("error", "worker died", "bad_input")
    assert (row["segmenter_version"], row["classifier_version"]) == ("s1", "c1")
    assert row["predicted_class"] is None and row["mask_png"] is None and row["scored_at"]
