"""benchmarks/robustness_pair.py on two hand-made robustness folders (the layout ``raysky
robustness`` writes: images.csv, robustness.json, Parquet results per folder), where the flips of
each run are known exactly; and the runs it must refuse to pair."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import load_benchmark

N = 20
IDS = [f"ISIC_{i:07d}" for i in range(N)]
LABELS = ["mel" if i % 2 else "nv" for i in range(N)]


def _results(folder, p_mel: np.ndarray, threshold: float = 0.5) -> None:
    folder.mkdir(parents=True)
    pd.DataFrame({"image_id": [f"{i}.png" for i in IDS], "status": "ok",
                  "prob_mel": p_mel, "prob_nv": 1 - p_mel, "malignant_prob": p_mel,
                  "predicted_class": np.where(p_mel > threshold, "mel", "nv")}
                 ).to_parquet(folder / "part-0.parquet")


def _robustness_run(root, flipped: int, near_flips: int = 0, ink_area: float = 0.1):
    """A folder whose ink artefact turns ``flipped`` answers round (argmax and decision), and
    moves ``near_flips`` more across a decision threshold of 0.4 but not across the argmax."""
    table = pd.DataFrame({"image_id": IDS, "file_id": [f"{i}.png" for i in IDS],
                          "label": LABELS, "lesion_id": [f"L{i // 2}" for i in range(N)],
                          "area_ink": ink_area})
    root.mkdir()
    table.to_csv(root / "images.csv", index=False)
    (root / "robustness.json").write_text(json.dumps({"by_artefact": {"ink": {}}}))
    clean = np.array([0.9 if label == "mel" else 0.1 for label in LABELS])
    clean[10:14] = 0.45  # decided mel by a 0.4 threshold, nv by the argmax
    altered = clean.copy()
    altered[:flipped] = 1 - altered[:flipped]
    altered[10:10 + near_flips] = 0.35
    _results(root / "results" / "clean", clean, threshold=0.4)
    _results(root / "results" / "ink", altered, threshold=0.4)
    return root


def test_paired_flips_and_their_difference(tmp_path, capsys):
    pair = load_benchmark("robustness_pair")
    baseline = _robustness_run(tmp_path / "a", flipped=4, near_flips=2)
    candidate = _robustness_run(tmp_path / "b", flipped=1)
    result = pair.compare_runs(str(baseline), str(candidate), replicates=200, seed=0)
    ink = result["by_artefact"]["ink"]
    assert ink["pairs"] == N
    assert ink["baseline_flip_rate"]["value"] == pytest.approx(6 / N)
    assert ink["baseline_argmax_flip_rate"]["value"] == pytest.approx(4 / N)
    assert ink["candidate_flip_rate"]["value"] == pytest.approx(1 / N)
    assert ink["difference_flip_rate"]["value"] == pytest.approx(-5 / N)
    assert ink["difference_argmax_flip_rate"]["value"] == pytest.approx(-3 / N)
    low, high = ink["difference_flip_rate"]["low"], ink["difference_flip_rate"]["high"]
    assert low < -5 / N < high <= 0
    # Turning answers round costs AUPRC; the candidate turns fewer.
    assert ink["baseline_delta_macro_auprc"]["value"] < ink["candidate_delta_macro_auprc"]["value"] < 0
    assert ink["difference_delta_macro_auprc"]["value"] == pytest.approx(
        ink["candidate_delta_macro_auprc"]["value"] - ink["baseline_delta_macro_auprc"]["value"])
    out = tmp_path / "pair.json"
    assert pair.main([str(baseline), str(candidate), "--replicates", "50",
                      "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ink (20 images)" in printed and "decision flips" in printed and "-0.250 [" in printed
    assert json.loads(out.read_text())["by_artefact"]["ink"]["pairs"] == N


def test_runs_on_different_images_or_artefacts_are_refused(tmp_path):
    pair = load_benchmark("robustness_pair")
    baseline = _robustness_run(tmp_path / "a", flipped=1)
    with pytest.raises(SystemExit, match="ISIC_0000000: area_ink differs between the runs"):
        pair.compare_runs(str(baseline), str(_robustness_run(tmp_path / "b", 1, ink_area=0.2)))
    other = _robustness_run(tmp_path / "c", flipped=1)
    table = pd.read_csv(other / "images.csv")
    table.loc[0, "image_id"] = "ISIC_9999999"
    table.to_csv(other / "images.csv", index=False)
    with pytest.raises(SystemExit, match="tested different images .*--limit and --seed"):
        pair.compare_runs(str(baseline), str(other))
    with pytest.raises(SystemExit, match="images.csv: not found; pass the --out folder"):
        pair.compare_runs(str(baseline), str(tmp_path / "missing"))
