"""Batch scoring end to end: real Ray Data, moto S3 on 127.0.0.1, real Parquet, tiny models.

One mixed archive (the bundled real images plus every kind of bad input) is scored once from
s3:// to s3://; most tests check that one output. Resume, pack and export run their own jobs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysky import results, storage
from raysky.cli.exit_codes import EXIT_TEMPFAIL
from raysky.cli.main import main
from raysky.data.images import decode_image
from raysky.data.taxonomy import ISIC_COLUMN_NAMES, MALIGNANT_CLASSES
from raysky.results.columns import output_schema
from raysky.score import ScoreSettings, score_archive, stages
from raysky.score.output import check_run_config, split_table
from raysky.storage import upload_directory
from tests.helpers import REPO

SAMPLE_SIZE = (200, 150)

# id -> (expected status, a phrase the error must contain, original (width, height))
BAD_INPUTS = {
    "zero_byte": ("error", "empty file", None),
    "truncated": ("error", "truncated", None),
    "not_an_image": ("error", "not an image", None),
    "bomb.png": ("error", "image too large", None),  # ids keep every suffix but .jpg
    "bomb_huge.png": ("error", "image too large", None),
    "cmyk": ("ok", None, SAMPLE_SIZE),
    "grayscale": ("ok", None, SAMPLE_SIZE),
    "rgba.png": ("ok", None, (123, 77)),
    "gray16.png": ("ok", None, SAMPLE_SIZE),
}


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: kilobytes on disk, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def build_mixed_archive(sample_dir: Path, root: Path) -> dict[str, tuple]:
    """Copy the real sample images and add every bad-input kind; return the expectations."""
    images = sorted((sample_dir / "images").glob("*.jpg"))
    expected = {}
    for path in images:
        shutil.copy(path, root / path.name)
        expected[path.stem] = ("ok", None, SAMPLE_SIZE)
    bad = root / "bad"
    bad.mkdir()
    first = images[0].read_bytes()
    photo = Image.open(io.BytesIO(first)).convert("RGB")
    (bad / "zero_byte.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(first[: len(first) // 2])
    (bad / "not_an_image.jpg").write_text("patient notes, not a photograph\n")
    (bad / "bomb.png").write_bytes(bomb_png(10_000, 10_000))  # over raysky's 64 MP limit
    (bad / "bomb_huge.png").write_bytes(bomb_png(30_000, 30_000))  # over Pillow's own limit
    photo.convert("CMYK").save(bad / "cmyk.jpg", "JPEG")
    photo.convert("L").save(bad / "grayscale.jpg", "JPEG")
    rgba = photo.resize((123, 77)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((123, 77)))
    rgba.save(bad / "rgba.png")
    gray16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(bad / "gray16.png")
    assert Image.open(bad / "gray16.png").mode.startswith("I")
    assert Image.open(bad / "cmyk.jpg").mode == "CMYK"
    assert (bad / "bomb_huge.png").stat().st_size < 200_000
    expected.update(BAD_INPUTS)
    return expected


@pytest.fixture(scope="module")
def s3_checkpoints(s3, tiny_checkpoints) -> dict[str, str]:
    bucket = s3.create_bucket("score-models")
    for kind, path in tiny_checkpoints.items():
        upload_directory(path, f"{bucket}/{kind}")
    return {kind: f"{bucket}/{kind}" for kind in tiny_checkpoints}


@pytest.fixture(scope="module")
def mixed(s3, ray_local, sample_dir, s3_checkpoints, tmp_path_factory):
    """The mixed archive scored from s3:// to s3:// with metadata; returns what tests need."""
    local = tmp_path_factory.mktemp("mixed")
    expected = build_mixed_archive(sample_dir, local)
    bucket = s3.create_bucket("score-mixed")
    upload_directory(str(local), f"{bucket}/archive")
    storage.write_bytes(f"{bucket}/meta.csv", (sample_dir / "HAM10000_metadata.csv").read_bytes())
    settings = ScoreSettings(
        input=f"{bucket}/archive", output=f"{bucket}/results", metadata=f"{bucket}/meta.csv",
        batch_size=8, rows_per_file=8, workers=1, cpus_per_worker=1, progress=False,
        **s3_checkpoints,
    )
    summary = score_archive(settings)
    return {"expected": expected, "summary": summary, "settings": settings, "local": local,
            "frame": results.read(settings.output), "bucket": bucket}


def test_mixed_archive_one_row_per_object_with_right_status(mixed):
    frame, expected = mixed["frame"], mixed["expected"]
    assert sorted(frame["image_id"]) == sorted(expected)
    assert frame["image_id"].is_unique
    for row in frame.itertuples():
        status, phrase, _size = expected[row.image_id]
        assert row.status == status, (row.image_id, row.error)
        if status == "error":
            assert phrase in row.error, (row.image_id, row.error)
            assert row.error_kind == "bad_input", (row.image_id, row.error_kind)
            assert pd.isna(row.predicted_class) and row.mask_png is None
        else:
            assert pd.isna(row.error) and pd.isna(row.error_kind)
        assert row.source_uri.startswith(f"{mixed['bucket']}/archive/")
    summary = mixed["summary"]
    n_error = sum(1 for s, _p, _z in expected.values() if s == "error")
    assert (summary.inputs, summary.scored, summary.skipped) == (len(expected), len(expected), 0)
    assert (summary.scored_ok, summary.scored_error) == (len(expected) - n_error, n_error)
    assert summary.totals["error_reasons"]["image too large"] == 2
    assert len(summary.totals["top_malignant"]) == 10
    assert "top 10 by malignant_prob" in summary.format()


def test_masks_and_heatmaps_decode_at_original_size(mixed):
    frame, expected = mixed["frame"], mixed["expected"]
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 35 + 4
    for row in ok.itertuples():
        size = expected[row.image_id][2]
        assert (row.width, row.height) == size
        mask = Image.open(io.BytesIO(row.mask_png))
        assert mask.mode == "L" and mask.size == size
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) <= {0, 255}
        assert row.lesion_area_frac == pytest.approx((np.asarray(mask) == 255).mean(), abs=1e-6)
        heatmap = Image.open(io.BytesIO(row.heatmap_png))
        assert heatmap.mode == "L" and heatmap.size == size


def test_probabilities_sum_to_one_and_match_the_shared_pipeline(mixed, sample_dir, tiny_checkpoints):
    from raysky.inference import LesionPipeline

    frame = mixed["frame"]
    ok = frame[frame["status"] == "ok"].set_index("image_id")
    classes = [c[len("prob_"):] for c in results.class_columns(frame)]
    probs = ok[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    malignant = [f"prob_{c}" for c in classes if c in MALIGNANT_CLASSES]
    np.testing.assert_allclose(ok["malignant_prob"], ok[malignant].sum(axis=1), atol=1e-5)
    assert (ok["predicted_class"].to_numpy() == np.array(classes)[probs.argmax(axis=1)]).all()

    # The same images through LesionPipeline directly, with the metadata joined by hand, give
    # the same numbers: the scorer uses the shared pipeline and really joins the metadata.
    meta = pd.read_csv(sample_dir / "HAM10000_metadata.csv").set_index("image_id")
    pipeline = LesionPipeline.from_uris(tiny_checkpoints["segmenter"], tiny_checkpoints["classifier"])
    ids = list(meta.index[:4])
    images = [np.asarray(decode_image((sample_dir / "images" / f"{i}.jpg").read_bytes())) for i in ids]
    metadata = [{"age": None if pd.isna(meta.at[i, "age"]) else float(meta.at[i, "age"]),
                 "sex": meta.at[i, "sex"], "site": meta.at[i, "localization"]} for i in ids]
    direct = pipeline(images, metadata, explain=True)
    blind = pipeline(images, None, explain=False)
    scored = ok.loc[ids, [f"prob_{c}" for c in classes]].to_numpy(np.float64)
    np.testing.assert_allclose(scored, np.stack([p.probabilities for p in direct]), atol=1e-4)
    without_meta = np.stack([p.probabilities for p in blind])
    assert np.abs(scored - without_meta).max() > 1e-3, "metadata made no difference"


def test_output_is_plain_parquet_for_pandas_pyarrow_and_duckdb(mixed, tmp_path):
    settings = mixed["settings"]
    files = results.result_files(settings.output)
    assert len(files) >= 6
    local = tmp_path / "results"
    local.mkdir()
    for uri in files:
        (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
    classes = [c[len("prob_"):] for c in results.class_columns(mixed["frame"])]
    for path in local.glob("*.parquet"):
        schema = pq.read_schema(path)
        assert schema.remove_metadata() == output_schema(classes, heatmaps=True)
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
        assert pq.ParquetFile(path).metadata.num_rows <= settings.rows_per_file
    con = duckdb.connect()
    glob = str(local / "*.parquet")
    count, ids, total_prob, mask_bytes = con.execute(
        f"SELECT count(*), count(DISTINCT image_id), "
        f"sum({' + '.join(f'prob_{c}' for c in classes)}) FILTER (WHERE status = 'ok'), "
        f"min(octet_length(mask_png)) FROM read_parquet('{glob}')").fetchone()
    assert count == ids == len(mixed["expected"])
    assert total_prob == pytest.approx(39.0, abs=1e-3)
    assert mask_bytes > 8
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()
    types = {name: kind for name, kind, *_rest in described}
    assert types["mask_png"] == "BLOB" and types["width"] == "INTEGER"
    assert types["prob_mel"] == "FLOAT" and types["scored_at"].startswith("TIMESTAMP")


def test_results_command_prints_the_summary(mixed, capsys):
    assert main(["results", mixed["settings"].output, "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert f"rows: {len(mixed['expected'])}  ok: 39  error: 5" in text
    assert "top 3 by malignant_prob" in text and "not an image x1" in text


def test_a_finished_run_leaves_its_success_manifest_and_no_lock_or_pending_files(mixed):
    output = mixed["settings"].output
    success = json.loads(storage.read_bytes(f"{output}/_SUCCESS"))
    assert success["run_id"] == mixed["summary"].run_id
    assert success["rows"] == success["inputs"] == len(mixed["expected"])
    files = results.result_files(output)
    assert sorted(success["files"]) == sorted(f.rsplit("/", 1)[1] for f in files)
    assert len(files) == mixed["summary"].files
    assert not storage.exists(f"{output}/_raysky.lock")
    assert storage.list_files(f"{output}/_pending") == []


def test_second_run_into_same_output_scores_nothing(mixed):
    summary = score_archive(mixed["settings"])
    assert (summary.scored, summary.skipped) == (0, len(mixed["expected"]))
    assert len(results.read(mixed["settings"].output, ["image_id"])) == len(mixed["expected"])


def test_pack_then_score_matches_the_raw_prefix(mixed, s3_checkpoints):
    from raysky.score.pack import pack_archive

    bucket = mixed["bucket"]
    packed = pack_archive(f"{bucket}/archive", f"{bucket}/shards", rows_per_file=10,
                          progress=False)
    assert packed.packed == len(mixed["expected"])
    shard_files = results.result_files(f"{bucket}/shards")
    assert len(shard_files) == packed.files >= 5
    shards = [pq.read_table(io.BytesIO(storage.read_bytes(uri))) for uri in shard_files]
    assert max(shard.num_rows for shard in shards) <= 10
    assert {"image_id", "source_uri", "image", "age", "sex", "site"} <= set(shards[0].column_names)
    settings = ScoreSettings(**{**mixed["settings"].__dict__, "input": f"{bucket}/shards",
                                "output": f"{bucket}/results-from-shards"})
    summary = score_archive(settings)
    assert summary.scored == len(mixed["expected"])
    raw = mixed["frame"].set_index("image_id").sort_index()
    again = results.read(settings.output).set_index("image_id").sort_index()
    for column in ("source_uri", "status", "error", "width", "height", "predicted_class"):
        pd.testing.assert_series_equal(again[column], raw[column], check_dtype=False)
    for image_id, png in raw["mask_png"].dropna().items():
        # Batches are composed differently, so allow float noise to flip a rare border pixel.
        ours = np.asarray(Image.open(io.BytesIO(again.at[image_id, "mask_png"])))
        assert (ours != np.asarray(Image.open(io.BytesIO(png)))).mean() < 1e-3
    prob_columns = results.class_columns(raw)
    np.testing.assert_allclose(again[prob_columns].to_numpy(np.float64),
                               raw[prob_columns].to_numpy(np.float64), atol=1e-5)


@pytest.mark.parametrize("fmt", ["isic2018", "isic2019"])
def test_export_follows_the_isic_formats(mixed, fmt, tmp_path):
    out = tmp_path / fmt
    assert main(["export", fmt, "--results", mixed["settings"].output, "--out", str(out)]) == 0
    table = pd.read_csv(out / f"{fmt.upper()}_classification.csv")
    columns = list(ISIC_COLUMN_NAMES[fmt].values()) + (["UNK"] if fmt == "isic2019" else [])
    assert list(table.columns) == ["image", *columns]
    ok = mixed["frame"][mixed["frame"]["status"] == "ok"]
    assert sorted(table["image"]) == sorted(ok["image_id"])
    values = table[columns].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-4)
    masks = sorted((out / f"{fmt.upper()}_segmentation").iterdir())
    assert [m.name for m in masks] == sorted(f"{i}_segmentation.png" for i in ok["image_id"])
    sizes = dict(zip(ok["image_id"], zip(ok["width"], ok["height"], strict=True), strict=True))
    for path in masks:
        mask = Image.open(path)
        assert mask.mode == "L" and mask.getbands() == ("L",)
        assert mask.size == sizes[path.name[: -len("_segmentation.png")]]
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def _copies(sample_dir: Path, root: Path, copies: int) -> int:
    for copy in range(copies):
        target = root / f"batch{copy}"
        target.mkdir(parents=True)
        for path in sorted((sample_dir / "images").glob("*.jpg")):
            shutil.copy(path, target / f"{path.stem}_{copy}.jpg")
    return copies * len(list((sample_dir / "images").glob("*.jpg")))


@pytest.mark.slow
def test_resume_after_interrupted_run_has_no_duplicates_and_nothing_missing(
        ray_local, sample_dir, tiny_checkpoints, tmp_path):
    archive, output = tmp_path / "archive", tmp_path / "results"
    total = _copies(sample_dir, archive, 2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "raysky.cli.main", "score", "--input", str(archive),
               "--output", str(output), "--batch-size", "10", "--rows-per-file", "5",
               "--workers", "1", "--cpus-per-worker", "1",
               "--segmenter", tiny_checkpoints["segmenter"],
               "--classifier", tiny_checkpoints["classifier"]]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline:
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        job.send_signal(signal.SIGINT)  # what Ctrl-C or a job stop does
        log = job.communicate(timeout=120)[0].decode()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 130, log[-3000:]
    done = len(results.read(str(output), ["image_id"]))
    assert 0 < done < total, f"the run was not interrupted mid-way ({done} of {total})"

    summary = score_archive(ScoreSettings(
        input=str(archive), output=str(output), batch_size=10, rows_per_file=5, workers=1,
        cpus_per_worker=2, progress=False, **tiny_checkpoints))
    assert (summary.skipped, summary.scored) == (done, total - done)
    frame = results.read(str(output), ["image_id", "status"])
    assert len(frame) == total and (frame["status"] == "ok").all()
    on_disk = pa.concat_tables(pq.read_table(p, columns=["image_id"]) for p in output.glob("*.parquet"))
    assert on_disk.num_rows == total, "duplicate rows on disk"
    assert not [p for p in output.iterdir() if p.name.startswith(".tmp-")]


def test_split_table_caps_rows_and_bytes():
    table = pa.table({"image_id": [str(i) for i in range(10)],
                      "png": [b"x" * 100] * 10})
    pieces = split_table(table, max_rows=4, max_bytes=250)
    assert [p.num_rows for p in pieces] == [2, 2, 2, 2, 2]
    assert [p.num_rows for p in split_table(table, max_rows=3)] == [3, 3, 3, 1]
    assert [p.num_rows for p in split_table(table, max_rows=4, max_bytes=50)] == [1] * 10


def test_dedupe_keeps_ok_then_latest():
    t = pd.Timestamp
    frame = pd.DataFrame({
        "image_id": ["a", "a", "b", "b", "c"],
        "status": ["error", "ok", "ok", "ok", "error"],
        "scored_at": [t("2025-01-02"), t("2025-01-01"), t("2025-01-01"), t("2025-01-03"),
                      t("2025-01-01")],
        "tag": ["a-error", "a-ok", "b-old", "b-new", "c-error"],
    })
    assert results.dedupe(frame)["tag"].tolist() == ["a-ok", "b-new", "c-error"]


def test_resume_refuses_other_models_and_foreign_files(tmp_path):
    facts = {"segmenter_version": "seg-1", "classifier_version": "cla-1"}
    check_run_config(str(tmp_path / "out"), "_cfg.json", facts)
    check_run_config(str(tmp_path / "out"), "_cfg.json", facts)
    with pytest.raises(ValueError, match="classifier_version: 'cla-1' there, 'cla-2' now"):
        check_run_config(str(tmp_path / "out"), "_cfg.json", {**facts, "classifier_version": "cla-2"})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"x": [1]}), foreign / "data.parquet")
    with pytest.raises(ValueError, match="did not write"):
        check_run_config(str(foreign), "_cfg.json", facts)


def test_cli_reports_user_mistakes_in_one_line(tiny_checkpoints, sample_dir, tmp_path, capsys):
    base = ["score", "--input", str(sample_dir), "--output", str(tmp_path / "o")]
    swapped = ["--segmenter", tiny_checkpoints["classifier"],
               "--classifier", tiny_checkpoints["segmenter"]]
    assert main([*base, *swapped]) == 2
    assert "a segmenter was expected" in capsys.readouterr().err
    assert main([*base, "--segmenter", str(tmp_path / "nope"),
                 "--classifier", tiny_checkpoints["classifier"]]) == 2
    assert "not a raysky checkpoint" in capsys.readouterr().err
    assert main([*base, "--batch-size", "0", "--segmenter", tiny_checkpoints["segmenter"],
                 "--classifier", tiny_checkpoints["classifier"]]) == 2
    assert "error: --batch-size 0: must be at least 1" in capsys.readouterr().err
    assert main(["results", str(tmp_path / "empty")]) == 2
    assert "no result files" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Hardening: transient faults, one run at a time, no orphans, damaged checkpoints
# ------------------------------------------------------------------------------------------


class FlakyS3:
    """A real S3 endpoint on 127.0.0.1 that forwards to moto but answers ``503 SlowDown`` to
    the first ``failures[key]`` requests for an object, as throttled S3 does."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.failures: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        target = urlparse(upstream)
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.path.split("?", 1)[0].lstrip("/")
                flaky.requests[key] = flaky.requests.get(key, 0) + 1
                if flaky.failures.get(key, 0) > 0:
                    flaky.failures[key] -= 1
                    error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                             b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                upstream_conn.request(self.command, self.path, body=body or None,
                                      headers=dict(self.headers))
                answer = upstream_conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer's length is the object's size, which the client relies on.
                self.send_header("Content-Length", answer.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_HEAD = _handle  # the test writes through moto directly

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3):
    proxy = FlakyS3(s3.env["AWS_ENDPOINT_URL"])
    yield proxy
    proxy.close()


def test_reads_retry_throttling_and_flag_what_stays_unreadable_as_transient(
        s3, flaky_s3, sample_dir, monkeypatch):
    bucket = s3.create_bucket("score-flaky")
    image = (sample_dir / "images" / "ISIC_0025250.jpg").read_bytes()
    names = ("recovers.jpg", "throttled.jpg", "gone.jpg", "junk.jpg")
    for name in names[:2]:
        storage.write_bytes(f"{bucket}/in/{name}", image)
    storage.write_bytes(f"{bucket}/in/junk.jpg", b"not an image")
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky_s3.url)  # reads only from here on
    prefix = bucket.removeprefix("s3://")
    # More failures than the S3 client retries by itself, so raysky's own retries are needed.
    flaky_s3.failures = {f"{prefix}/in/recovers.jpg": 4, f"{prefix}/in/throttled.jpg": 10_000}
    uris = [f"{bucket}/in/{name}" for name in names]
    batch = pa.table({"image_id": [n[:-4] for n in names], "source_uri": uris,
                      "age": [None] * 4, "sex": [None] * 4, "site": [None] * 4},
                     schema=stages.INPUT_SCHEMA)
    decoded = stages.decode_batch(batch).drop_columns(["pixels"]).to_pylist()
    by_id = {row["image_id"]: row for row in decoded}
    assert by_id["recovers"]["status"] == "ok", by_id["recovers"]
    assert by_id["recovers"]["error_kind"] is None
    assert flaky_s3.requests[f"{prefix}/in/recovers.jpg"] > 4
    assert (by_id["throttled"]["status"], by_id["throttled"]["error_kind"]) == ("error", "transient")
    assert "503" in by_id["throttled"]["error"]
    assert (by_id["gone"]["error"], by_id["gone"]["error_kind"]) == ("file not found", "bad_input")
    assert (by_id["junk"]["status"], by_id["junk"]["error_kind"]) == ("error", "bad_input")
    # Training and every other reader go through the same retrying read.
    from raysky.data.images import load_rgb

    before = flaky_s3.requests[f"{prefix}/in/recovers.jpg"]
    flaky_s3.failures[f"{prefix}/in/recovers.jpg"] = 4
    assert load_rgb(uris[0]).size == (200, 150)
    assert flaky_s3.requests[f"{prefix}/in/recovers.jpg"] > before + 4


def _three_images(sample_dir: Path, root: Path) -> list[str]:
    root.mkdir(parents=True)
    paths = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    for path in paths:
        shutil.copy(path, root / path.name)
    return [p.stem for p in paths]


def _as_transient_error(output: Path, image_id: str) -> None:
    """Turn ``image_id``'s row into the error row a throttled read would have left."""
    for path in output.glob("part-*.parquet"):
        table = pq.read_table(path)
        ids = table["image_id"].to_pylist()
        if image_id not in ids:
            continue
        rows = table.to_pylist()
        row = rows[ids.index(image_id)]
        for name in row:
            if name not in ("image_id", "source_uri", "segmenter_version", "classifier_version",
                            "scored_at"):
                row[name] = None
        row.update(status="error", error="cannot read file (AWS Error SLOW_DOWN)",
                   error_kind="transient")
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
        return
    raise AssertionError(f"{image_id} not in {output}")


def test_rerun_retries_transient_errors_and_cleans_up_a_dead_run(
        ray_local, sample_dir, tiny_checkpoints, tmp_path):
    from raysky.score.lock import LOCK_NAME

    ids = _three_images(sample_dir, tmp_path / "archive")
    output = tmp_path / "results"
    settings = ScoreSettings(input=str(tmp_path / "archive"), output=str(output), batch_size=2,
                             rows_per_file=2, workers=1, cpus_per_worker=1, progress=False,
                             **tiny_checkpoints)
    first = score_archive(settings)
    assert first.scored == 3 and (output / "_SUCCESS").exists()
    _as_transient_error(output, ids[1])

    # Asked not to, a rerun leaves the transient row alone.
    kept = score_archive(ScoreSettings(**{**settings.__dict__, "retry_transient": False}))
    assert (kept.scored, kept.retried_transient) == (0, 0)
    assert results.read(str(output)).set_index("image_id").at[ids[1], "error_kind"] == "transient"

    # A run that died: its lock (no heartbeat for an hour) and an unpublished duplicate file.
    dead = output / "_pending" / "20000101T000000-dead00"
    dead.mkdir(parents=True)
    shutil.copy(next(output.glob("part-*.parquet")), dead / "part-20000101T000000-dead00-x.parquet")
    (output / LOCK_NAME).write_text(json.dumps({
        "run_id": "20000101T000000-dead00", "host": "elsewhere", "pid": 1,
        "heartbeat_at_s": time.time() - 3600}))
    con = duckdb.connect()
    glob = str(output / "*.parquet")
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0] == 3

    again = score_archive(settings)
    assert (again.scored, again.scored_ok, again.retried_transient) == (1, 1, 1)
    frame = results.read(str(output))
    assert (frame["status"] == "ok").all() and frame["error_kind"].isna().all()
    count, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT image_id) FROM read_parquet('{glob}')").fetchone()
    assert count == distinct == 3
    assert not (output / "_pending").exists() and not (output / LOCK_NAME).exists()
    success = json.loads((output / "_SUCCESS").read_text())
    assert success["run_id"] == again.run_id and success["rows"] == success["inputs"] == 3
    assert sorted(success["files"]) == sorted(p.name for p in output.glob("part-*.parquet"))


def test_a_second_run_into_a_locked_output_gets_a_clear_error(tiny_checkpoints, sample_dir,
                                                              tmp_path, capsys):
    from raysky.score.lock import locked

    output = tmp_path / "results"
    command = ["score", "--input", str(sample_dir / "images"), "--output", str(output),
               "--segmenter", tiny_checkpoints["segmenter"],
               "--classifier", tiny_checkpoints["classifier"]]
    with locked(str(output), "20250101T000000-first1"):
        assert main(command) == EXIT_TEMPFAIL  # busy, not a usage error: retry later
        error = capsys.readouterr().err
        assert f"{output} is in use by another raysky score (run 20250101T000000-first1" in error
        assert len(error.strip().splitlines()) == 1
        assert not list(output.glob("*.parquet")) and not (output / "_raysky_score.json").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lock_is_exclusive_refreshed_and_taken_over_when_stale(s3, tmp_path, where):
    from raysky.score.lock import LOCK_NAME, OutputLock, OutputLocked

    output = str(tmp_path / "out") if where == "local" else f"{s3.create_bucket('score-locks')}/out"
    first = OutputLock(output, "run-a")
    first.acquire()
    with pytest.raises(OutputLocked, match="in use by another raysky score .run run-a"):
        OutputLock(output, "run-b").acquire()
    first.refresh()
    # The owner stops heartbeating (it died): past the timeout the next run takes over.
    lock_uri = storage.join(output, LOCK_NAME)
    stale = json.loads(storage.read_bytes(lock_uri))
    stale.update(heartbeat_at_s=time.time() - 3600, host="elsewhere")
    if where == "s3":
        import boto3

        bucket, key = lock_uri.removeprefix("s3://").split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(stale).encode())
    else:
        storage.write_bytes(lock_uri, json.dumps(stale).encode())
    second = OutputLock(output, "run-c")
    second.acquire()
    assert second.took_over["run_id"] == "run-a"
    with pytest.raises(OutputLocked, match="lost the lock"):
        first.refresh()
    first.release()  # not its lock any more: nothing happens
    assert json.loads(storage.read_bytes(lock_uri))["run_id"] == "run-c"
    second.release()
    assert not storage.exists(lock_uri)


def test_results_written_before_error_kind_still_read(tmp_path):
    classes = ("mel", "nv")
    schema = output_schema(classes, heatmaps=False)
    old = pa.schema([f for f in schema if f.name != "error_kind"])
    rows = [{"image_id": "a", "source_uri": "a.jpg", "status": "ok", "predicted_class": "nv",
             "prob_mel": 0.2, "prob_nv": 0.8, "malignant_prob": 0.2},
            {"image_id": "b", "source_uri": "b.jpg", "status": "error", "error": "empty file"}]
    (tmp_path / "old").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "old" / "part-0.parquet")
    frame = results.read(str(tmp_path / "old"))
    assert list(frame.columns) == schema.names
    assert frame["error_kind"].isna().all()
    assert results.read(str(tmp_path / "old"), ["image_id", "error_kind"]).shape == (2, 2)
    assert results.summarize(str(tmp_path / "old"))["error"] == 1


def test_results_from_before_every_added_column_read_in_the_writers_layout(tmp_path):
    from raysky.results.columns import ADDED_COLUMNS

    schema = output_schema(("mel", "nv"), heatmaps=True)
    oldest = pa.schema([f for f in schema if f.name not in ADDED_COLUMNS])
    rows = [{"image_id": "a", "source_uri": "a.jpg", "status": "ok", "prob_mel": 0.1,
             "prob_nv": 0.9, "malignant_prob": 0.1}]
    (tmp_path / "old").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=oldest), tmp_path / "old" / "part-0.parquet")
    frame = results.read(str(tmp_path / "old"))
    assert list(frame.columns) == schema.names
    assert frame[list(ADDED_COLUMNS)].isna().all().all()
    assert (frame["ood_score"].dtype, frame["ita_deg"].dtype) == (np.float32, np.float32)


def test_results_refuse_two_inputs_under_one_id(tmp_path):
    schema = output_schema(("mel", "nv"), heatmaps=False)
    (tmp_path / "r").mkdir()
    rows = [{"image_id": "x", "source_uri": "a/x.jpg", "status": "ok"},
            {"image_id": "x", "source_uri": "b/x.jpg", "status": "ok"},
            {"image_id": "y", "source_uri": "y.jpg", "status": "ok"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "r" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"1 image ids name several different inputs \('x': a/x.jpg, b/x.jpg\)"):
        results.read(str(tmp_path / "r"))


def test_score_refuses_a_damaged_checkpoint_before_writing(tiny_checkpoints, sample_dir,
                                                           tmp_path, capsys):
    damaged = tmp_path / "segmenter"
    shutil.copytree(tiny_checkpoints["segmenter"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    output = tmp_path / "results"
    assert main(["score", "--input", str(sample_dir / "images"), "--output", str(output),
                 "--segmenter", str(damaged), "--classifier", tiny_checkpoints["classifier"]]) == 2
    assert f"{damaged}: model.safetensors does not match config.json" in capsys.readouterr().err
    assert not output.exists()


def test_shards_with_unsafe_or_repeated_ids_are_refused(tmp_path):
    from raysky.score.inputs import PACK_MARKER, list_inputs

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / PACK_MARKER).write_text("{}")
    table = pa.table({"image_id": ["ok", "../../x"], "source_uri": ["a", "b"], "image": [b"", b""]})
    pq.write_table(table, shards / "part-0.parquet")
    with pytest.raises(ValueError, match=r"unsafe image ids \('../../x'\)"):
        list_inputs(str(shards))
    pq.write_table(pa.table({"image_id": ["ok", "ok"], "source_uri": ["a", "b"],
                             "image": [b"", b""]}), shards / "part-0.parquet")
    with pytest.raises(ValueError, match=r"1 image ids appear in several shard rows \('ok'\)"):
        list_inputs(str(shards))
