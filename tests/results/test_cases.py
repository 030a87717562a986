"""Results per lesion and per patient: ``raysky.results.cases`` and ``raysky results --by``."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysky import results
from raysky.cli.main import main
from raysky.results.columns import output_schema

CLASSES = ("mel", "nv")


def _row(image_id, lesion, patient, prob, refer=None, ood=None, status="ok"):
    ok = status == "ok"
    return {"image_id": image_id, "source_uri": f"s3://b/{image_id}.jpg", "status": status,
            "error": None if ok else "truncated image", "lesion_id": lesion, "patient_id": patient,
            "predicted_class": ("mel" if prob >= 0.5 else "nv") if ok else None,
            "prob_mel": prob if ok else None, "prob_nv": 1 - prob if ok else None,
            "malignant_prob": prob if ok else None, "refer": refer, "ood": ood}


ROWS = [
    _row("a1", "L1", "P1", 0.20, refer=False, ood=False),
    _row("a2", "L1", "P1", 0.70, refer=True, ood=False),
    _row("a3", "L1", "P1", 0.10, status="error"),
    _row("b1", "L2", "P1", 0.40, refer=False, ood=True),
    _row("c1", "L3", "P2", 0.05, refer=False, ood=False),
    _row("c2", "L3", "P2", 0.09, refer=False, ood=None),
    _row("d1", None, "P2", 0.95, refer=True, ood=False),   # no lesion id: a case of its own
    _row("e1", "L4", None, 0.30),                           # uncalibrated: refer/ood unknown
]


@pytest.fixture
def scored(tmp_path) -> str:
    out = tmp_path / "results"
    out.mkdir()
    table = pa.Table.from_pylist(ROWS, schema=output_schema(CLASSES, heatmaps=False))
    pq.write_table(table.slice(0, 4), out / "part-0.parquet")
    pq.write_table(table.slice(4), out / "part-1.parquet")
    return str(out)


def test_one_row_per_lesion_with_what_a_clinician_reviews(scored):
    table = results.cases(scored, by="lesion_id")
    assert table["lesion_id"].fillna("(none)").tolist() == ["(none)", "L1", "L2", "L4", "L3"]
    assert table["malignant_prob"].tolist() == pytest.approx([0.95, 0.70, 0.40, 0.30, 0.09])
    by = table.set_index(table["lesion_id"].fillna("(none)"))
    l1 = by.loc["L1"]
    assert (l1["images"], l1["errors"], l1["top_image_id"], l1["top_predicted_class"]) == (
        3, 1, "a2", "mel")
    assert (l1["refer"], l1["referred_images"], l1["ood"], l1["patient_id"]) == (
        True, 1, False, "P1")
    assert l1["image_ids"] == ["a1", "a2", "a3"]
    assert (by.loc["L2", "ood"], by.loc["L2", "ood_images"], by.loc["L2", "refer"]) == (True, 1, False)
    assert by.loc["L3", "ood"] == False  # noqa: E712 (one image unknown, one not flagged)
    assert by.loc["L4", "refer"] is None and by.loc["L4", "ood"] is None
    assert by.loc["(none)", "image_ids"] == ["d1"] and by.loc["(none)", "refer"] is True
    assert table["images"].sum() == len(ROWS), "no image is dropped"


def test_one_row_per_patient(scored):
    table = results.cases(scored, by="patient_id").set_index("patient_id", drop=False)
    p1 = table.loc["P1"]
    assert (p1["images"], p1["lesions"], p1["malignant_prob"], p1["top_image_id"]) == (
        4, 2, pytest.approx(0.70), "a2")
    assert (p1["refer"], p1["ood"], p1["ood_images"]) == (True, True, 1)
    assert table.loc["P2", "top_image_id"] == "d1"


def test_cases_refuse_other_columns_and_results_without_case_ids(scored, tmp_path):
    with pytest.raises(ValueError, match="cannot group results by 'site'"):
        results.cases(scored, by="site")
    old = tmp_path / "old"
    old.mkdir()
    pq.write_table(pa.table({"image_id": ["x"], "source_uri": ["x.jpg"], "status": ["ok"],
                             "prob_nv": [1.0], "malignant_prob": [0.0]}), old / "part-0.parquet")
    # Results from before lesion ids were recorded: the column reads as null.
    with pytest.raises(ValueError, match=r"no image in .* has a lesion_id: score with a manifest "
                                         "or a metadata CSV that has a lesion_id column"):
        results.cases(str(old))


def test_results_command_by_lesion_prints_and_writes_the_cases(scored, tmp_path, capsys):
    out_csv, out_parquet = tmp_path / "cases.csv", tmp_path / "cases.parquet"
    assert main(["results", scored, "--by", "lesion_id", "--top", "2", "--out", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "4 lesions from 8 images; 1 images without a lesion_id, each on its own" in text
    assert "referred: 2  out of distribution: 1  with errors: 1" in text
    assert "top 2 by malignant_prob:" in text and "top a2" in text
    written = pd.read_csv(out_csv)
    assert len(written) == 5 and written.loc[written["lesion_id"] == "L1", "image_ids"].item() == "a1;a2;a3"
    assert main(["results", scored, "--by", "patient_id", "--out", str(out_parquet), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3  # P2, P1, and e1 without a patient
    assert pd.read_parquet(out_parquet)["patient_id"].tolist()[:2] == ["P2", "P1"]
    assert main(["results", scored, "--out", str(out_csv)]) == 2
    assert "--out writes the per-case table" in capsys.readouterr().err
