"""Manifest input: a table of image URIs and metadata, CSV or Parquet, local or on S3.

The reader's rules are unit-tested on real files; the end-to-end tests score a local CSV
manifest and a Parquet manifest on the embedded S3 with real Ray and tiny models.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysky import results, storage
from raysky.cli.main import main
from raysky.data.manifest import read_manifest
from raysky.data.records import DatasetError
from raysky.score import ScoreSettings, score_archive
from raysky.score.inputs import list_inputs


def _images(sample_dir: Path, root: Path, names: list[str]) -> list[Path]:
    sources = sorted((sample_dir / "images").glob("*.jpg"))
    out = []
    for i, name in enumerate(names):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[i % len(sources)], target)
        out.append(target)
    return out


def _rows(manifest) -> list[dict]:
    return manifest.table.to_pylist()


def test_csv_manifest_resolves_uris_and_keeps_every_row(tmp_path, sample_dir):
    root = tmp_path / "export"
    a, b, c = _images(sample_dir, root, ["clinic-a/IMG_0001.jpg", "clinic-b/IMG_0001.jpg",
                                          "other.jpg"])
    (root / "manifest.csv").write_text(
        "Image_URI,age,sex,localization,lesion_id,patient_id,clinic,mrn\n"
        "clinic-a/IMG_0001.jpg,55,male,back,L1,P1,north,0001\n"          # relative
        f"{b},,female,,L1,P1,south,0002\n"                              # absolute path
        f"file://{c},70,,face,,P2,south,\n"                             # file:// URI
        ",40,male,back,L9,P9,north,0004\n"                              # no URI
        "../outside.jpg,,,,,,north,0005\n"                              # escapes the folder
        "http://example.org/x.jpg,,,,,,north,0006\n"                    # another scheme
        "clinic-a/./IMG_0001.jpg,,,,,,north,0007\n"                     # the same image again
        "missing.jpg,,,,,,north,0008\n")                                # read later: no file
    manifest = read_manifest(str(root / "manifest.csv"))
    rows = _rows(manifest)
    assert len(rows) == 8 and manifest.columns["uri"] == "Image_URI"
    assert manifest.extra.names == ["clinic", "mrn"]
    assert [r["source_uri"] for r in rows[:3]] == [str(a), str(b), str(c)]
    # Two files named IMG_0001.jpg: their paths tell them apart.
    assert rows[0]["image_id"] == "clinic-a~IMG_0001" and rows[2]["image_id"] == "other"
    assert rows[1]["image_id"] == str(b)[1:-4].replace("/", "~")  # its whole path
    assert (rows[0]["age"], rows[0]["sex"], rows[0]["site"], rows[0]["lesion_id"]) == (
        55.0, "male", "back", "L1")
    assert rows[1]["mrn"] == "0002", "text stays text"
    assert rows[0]["problem"] is None and rows[7]["problem"] is None
    assert rows[3]["problem"] == "no image URI in this row"
    assert "leads outside the manifest's folder" in rows[4]["problem"]
    assert "unsupported URI scheme http://" in rows[5]["problem"]
    assert rows[6]["problem"] == "the same image as row 2"
    ids = [r["image_id"] for r in rows]
    assert len(set(ids)) == 8 and not any(storage.name_problem(i, nested=False) for i in ids)


def test_manifest_ids_given_are_checked_and_errors_name_the_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("uri,image_id\na.jpg,x\nb.jpg,x\nc.jpg,../../etc\nd.jpg,\n")
    rows = _rows(read_manifest(str(path)))
    assert [r["image_id"] for r in rows][:1] == ["x"]
    assert rows[1]["problem"] == "image id 'x' repeats row 2"
    assert rows[2]["problem"].startswith("unsafe image id '../../etc' in 'image_id'")
    assert rows[3]["image_id"] == "d" and rows[3]["problem"] is None
    assert len({r["image_id"] for r in rows}) == 4

    (tmp_path / "no_uri.csv").write_text("image_id,age\nx,3\n")
    with pytest.raises(DatasetError, match=r"no_uri.csv: no image URI column: expected one of "
                                           r"'uri', 'image_uri'.*\(columns: image_id, age\)"):
        read_manifest(str(tmp_path / "no_uri.csv"))
    pq.write_table(pa.table({"uri": ["a.jpg"], "age": [True]}), tmp_path / "bool_age.parquet")
    with pytest.raises(DatasetError, match=r"column 'age' holds bool: expected numbers of years"):
        read_manifest(str(tmp_path / "bool_age.parquet"))
    pq.write_table(pa.table({"uri": ["a.jpg"], "tags": [["a", "b"]]}), tmp_path / "list.parquet")
    with pytest.raises(DatasetError, match=r"column 'tags' holds list<element: string>: expected "
                                           "text, numbers, booleans, dates or times"):
        read_manifest(str(tmp_path / "list.parquet"))
    pq.write_table(pa.table({"uri": [1, 2]}), tmp_path / "int_uri.parquet")
    with pytest.raises(DatasetError, match=r"column 'uri' holds int64: expected text"):
        read_manifest(str(tmp_path / "int_uri.parquet"))
    with pytest.raises(DatasetError, match="file not found"):
        read_manifest(str(tmp_path / "nope.csv"))
    (tmp_path / "extra_status.csv").write_text("uri,status\na.jpg,done\n")
    with pytest.raises(ValueError, match=r"column\(s\) 'status' would pass through .* rename"):
        list_inputs(str(tmp_path / "extra_status.csv"))


def test_a_manifest_on_s3_names_only_s3_objects(s3):
    bucket = s3.create_bucket("manifest-rules")
    table = pa.table({
        "uri": ["images/a.jpg", f"{bucket}/elsewhere/b.jpg", "file:///etc/passwd",
                "/etc/passwd", "../up.jpg", "s3://nobucketkey"],
        "visit": pa.array([dt.date(2024, 1, 2)] * 6), "score": pa.array([1.5] * 6)})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(f"{bucket}/exports/m.parquet", sink.getvalue())
    manifest = read_manifest(f"{bucket}/exports/m.parquet")
    rows = _rows(manifest)
    assert rows[0]["source_uri"] == f"{bucket}/exports/images/a.jpg" and rows[0]["problem"] is None
    assert rows[1]["source_uri"] == f"{bucket}/elsewhere/b.jpg" and rows[1]["problem"] is None
    for row in rows[2:4]:
        assert "in a manifest on S3" in row["problem"], row
    assert "leads outside the manifest's folder" in rows[4]["problem"]
    assert "not an s3://bucket/key URI" in rows[5]["problem"]
    assert manifest.extra.field("visit").type == pa.date32() and rows[0]["score"] == 1.5


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scoring_a_local_csv_manifest_passes_its_columns_through(ray_local, sample_dir,
                                                                 tiny_checkpoints, tmp_path):
    root = tmp_path / "export"
    _images(sample_dir, root, ["a/IMG_0001.jpg", "b/IMG_0001.jpg", "c.jpg"])
    (root / "manifest.csv").write_text(
        "uri,image_id,age,sex,site,lesion_id,patient_id,mrn,visit\n"
        "a/IMG_0001.jpg,,55,male,back,L1,P1,0001,2024-03-01\n"
        "b/IMG_0001.jpg,,,,,L1,P1,0002,2024-03-08\n"
        "c.jpg,case-7,70,female,face,L2,P2,0003,2024-04-01\n"
        "gone.jpg,,,,,L3,P2,0004,2024-04-02\n"
        "../escape.jpg,,,,,,P3,0005,2024-04-03\n")
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,sex\nb~IMG_0001,44,female\ncase-7,99,male\n")
    output = tmp_path / "results"
    settings = ScoreSettings(input=str(root / "manifest.csv"), output=str(output),
                             metadata=str(meta), batch_size=2, rows_per_file=2, workers=1,
                             cpus_per_worker=1, heatmaps=False, progress=False, **tiny_checkpoints)
    summary = score_archive(settings)
    assert (summary.inputs, summary.scored, summary.scored_error) == (5, 5, 2)
    frame = results.read(str(output)).set_index("image_id")
    assert list(frame.columns[-2:]) == ["mrn", "visit"], "manifest columns come last"
    assert sorted(frame["mrn"]) == ["0001", "0002", "0003", "0004", "0005"]
    a, b, c = frame.loc["a~IMG_0001"], frame.loc["b~IMG_0001"], frame.loc["case-7"]
    assert (a["status"], a["age"], a["age_source"], a["lesion_id"], a["patient_id"]) == (
        "ok", 55.0, "manifest", "L1", "P1")
    # The metadata CSV fills what the manifest left empty, and never overrides it.
    assert (b["age"], b["age_source"], b["sex"], b["sex_source"]) == (44.0, "metadata", "female",
                                                                      "metadata")
    assert (c["age"], c["age_source"], c["sex"]) == (70.0, "manifest", "female")
    gone = frame[frame["mrn"] == "0004"].iloc[0]
    assert (gone["status"], gone["error"], gone["error_kind"]) == ("error", "file not found",
                                                                    "bad_input")
    escape = frame[frame["mrn"] == "0005"].iloc[0]
    assert escape["status"] == "error" and "outside the manifest's folder" in escape["error"]
    assert (output / "_SUCCESS").exists()
    config = json.loads((output / "_raysky_score.json").read_text())
    assert config["extra_columns"] == [["mrn", "string"], ["visit", "string"]]

    again = score_archive(settings)
    assert (again.scored, again.skipped) == (0, 5)
    # The same output with other pass-through columns would mix layouts: refused.
    (root / "other.csv").write_text("uri,ward\nc.jpg,7\n")
    with pytest.raises(ValueError, match="extra_columns"):
        score_archive(ScoreSettings(**{**settings.__dict__, "input": str(root / "other.csv")}))
    assert main(["results", str(output), "--by", "patient_id"]) == 0


@pytest.mark.slow
def test_scoring_a_parquet_manifest_on_s3(ray_local, s3, sample_dir, tiny_checkpoints):
    bucket = s3.create_bucket("manifest-s3")
    images = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    for path in images:
        storage.write_bytes(f"{bucket}/export/img/{path.name}", path.read_bytes())
    table = pa.table({
        "image_uri": [f"img/{images[0].name}", f"{bucket}/export/img/{images[1].name}",
                      f"img/{images[2].name}", "file:///etc/hostname"],
        "age": pa.array([30, None, 60, 20], pa.int64()),
        "lesion_id": ["L1", "L1", "L2", "L3"], "ward": pa.array([3, 3, 4, 5], pa.int32()),
        "seen": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)] * 4)})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(f"{bucket}/export/manifest.parquet", sink.getvalue())
    settings = ScoreSettings(input=f"{bucket}/export/manifest.parquet",
                             output=f"{bucket}/results", batch_size=2, rows_per_file=2,
                             workers=1, cpus_per_worker=1, heatmaps=False, progress=False,
                             **tiny_checkpoints)
    summary = score_archive(settings)
    assert (summary.scored, summary.scored_ok, summary.scored_error) == (4, 3, 1)
    frame = results.read(settings.output).set_index("image_id")
    assert {p.stem for p in images} <= set(frame.index)
    assert frame.loc[images[0].stem, "age"] == 30.0 and frame.loc[images[0].stem, "ward"] == 3
    assert str(frame["ward"].dtype) == "int32" and str(frame["seen"].dtype).startswith("datetime64")
    local = frame[frame["ward"] == 5].iloc[0]
    assert local["status"] == "error" and "in a manifest on S3" in local["error"]
    assert storage.exists(f"{settings.output}/_SUCCESS")
    cases = results.cases(settings.output, by="lesion_id").set_index("lesion_id")
    assert cases.loc["L1", "images"] == 2 and cases.loc["L3", "errors"] == 1
