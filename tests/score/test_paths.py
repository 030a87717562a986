"""Nothing raysky writes can land outside its output: export masks, training masks, run names."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysky import storage
from raysky.cli.main import main
from raysky.data.records import LesionRecord
from raysky.results.columns import output_schema
from raysky.score.export import export_results
from raysky.train.masks import mask_uri, segmenter_masks

CLASSES = ("mel", "nv")
UNSAFE_IDS = ["../../escaped", "/tmp/escaped", "sub/../../escaped", "..", "a\\b"]


def _mask_png(width: int = 4, height: int = 3) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_results(uri: str, ids: list[str]) -> None:
    """A results file as `raysky score` writes it, one ok row per id."""
    schema = output_schema(CLASSES, heatmaps=False)
    n = len(ids)
    columns = {name: [None] * n for name in schema.names}
    columns.update({
        "image_id": ids, "source_uri": [f"s3://archive/{i}" for i in range(n)], "status": ["ok"] * n,
        "width": [4] * n, "height": [3] * n, "predicted_class": ["nv"] * n,
        "prob_mel": [0.25] * n, "prob_nv": [0.75] * n, "malignant_prob": [0.25] * n,
        "mask_png": [_mask_png()] * n, "scored_at": [dt.datetime.now(dt.timezone.utc)] * n,
    })
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=schema), sink)
    storage.write_bytes(storage.join(uri, "part-0.parquet"), sink.getvalue())


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_export_refuses_ids_that_leave_the_output_and_writes_nothing(tmp_path, bad_id):
    write_results(str(tmp_path / "results"), ["ISIC_1", bad_id])
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(ValueError, match="unsafe image id"):
        export_results("isic2019", str(tmp_path / "results"), str(out))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert not Path("/tmp/escaped_segmentation.png").exists()


def test_export_on_s3_cannot_reach_another_bucket(s3, capsys):
    bucket = s3.create_bucket("raysky-export-paths")
    victim = s3.create_bucket("raysky-export-victim")
    planted = f"../../../{victim.removeprefix('s3://')}/planted"
    write_results(f"{bucket}/results", ["ISIC_1", planted])
    assert main(["export", "isic2018", "--results", f"{bucket}/results",
                 "--out", f"{bucket}/out"]) == 2
    assert f"unsafe image id in {bucket}/results {planted!r}" in capsys.readouterr().err
    assert storage.list_files(victim) == []
    assert storage.list_files(f"{bucket}/out") == []


def test_export_writes_safe_ids_as_before(tmp_path):
    write_results(str(tmp_path / "results"), ["ISIC_1", "x.png", "photo (2).JPG"])
    summary = export_results("isic2018", str(tmp_path / "results"), str(tmp_path / "out"))
    assert summary.masks == 3
    names = sorted(p.name for p in (tmp_path / "out" / "ISIC2018_segmentation").iterdir())
    assert names == ["ISIC_1_segmentation.png", "photo (2).JPG_segmentation.png",
                     "x.png_segmentation.png"]


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_training_masks_refuse_ids_that_leave_their_folder(tmp_path, tiny_checkpoints, bad_id):
    out = str(tmp_path / "run" / "masks" / "seg-1")
    assert mask_uri(out, "ISIC_1") == str(tmp_path / "run" / "masks" / "seg-1" / "ISIC_1.png")
    with pytest.raises(ValueError, match="unsafe image id"):
        mask_uri(out, bad_id)
    records = [LesionRecord(image_id="ISIC_1", image_uri="x.jpg"),
               LesionRecord(image_id=bad_id, image_uri="y.jpg")]
    # Refused while listing, before any Ray job runs or any mask is written.
    with pytest.raises(ValueError, match="unsafe image id"):
        segmenter_masks(records, tiny_checkpoints["segmenter"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "../up", "run:1", "x\ny", ""])
def test_train_refuses_run_names_outside_the_storage(sample_dir, tmp_path, capsys, name):
    storage_dir = tmp_path / "runs"
    code = main(["train", "segmenter", "--data", str(sample_dir), "--preset", "tiny",
                 "--storage", str(storage_dir), "--name", name, "--epochs", "1"])
    assert code == 2
    assert "--name" in capsys.readouterr().err
    assert not storage_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
