"""benchmarks/decision_flips.py on a hand-made robustness folder: images whose argmax is stable
under an artefact but whose decision, raised towards a rare class by the prior offsets, tips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raysky.calibration.decision import prior_offsets
from raysky.models.checkpoint import read_checkpoint_meta, save_version
from tests.helpers import load_benchmark

N, TIPPED = 20, 6


def _probs(classes: list[str], nv: float, mel: float) -> dict[str, float]:
    rest = (1.0 - nv - mel) / (len(classes) - 2)
    return {c: nv if c == "nv" else mel if c == "mel" else rest for c in classes}


def _results(folder, classes, rows: list[dict[str, float]], ids: list[str]) -> None:
    folder.mkdir(parents=True)
    frame = pd.DataFrame({f"prob_{c}": [r[c] for r in rows] for c in classes})
    frame.insert(0, "image_id", [f"{i}.png" for i in ids])
    frame["status"] = "ok"
    frame["predicted_class"] = "nv"  # unused: the script re-decides from the probabilities
    frame.to_parquet(folder / "part-0.parquet")


@pytest.fixture
def robustness_run(tmp_path, tiny_checkpoints):
    """A calibrated tiny classifier (nv six times as frequent as each other class in training)
    and a robustness folder where ink tips the first TIPPED decisions made with tau = 1."""
    classifier = tmp_path / "cls"
    meta = read_checkpoint_meta(tiny_checkpoints["classifier"], "classifier")
    classes = list(meta["classes"])
    counts = {c: 60 if c == "nv" else 10 for c in classes}
    logp = np.log(np.array([counts[c] for c in classes], float) / sum(counts.values()))
    offsets = prior_offsets(logp, 1.0)
    extra = {**meta.get("extra", {}), "provenance": {"training_data": {"train_classes": counts}}}
    fitted = dict(zip(classes, offsets, strict=True))
    save_version(tiny_checkpoints["classifier"], str(classifier),
                 {"extra": extra, "calibration": {"decision_offsets": fitted}})
    ids = [f"ISIC_{i:07d}" for i in range(N)]
    labels = ["mel" if i < TIPPED else "nv" for i in range(N)]
    out = tmp_path / "rob"
    out.mkdir()
    pd.DataFrame({"image_id": ids, "file_id": [f"{i}.png" for i in ids], "label": labels,
                  "lesion_id": [f"L{i // 2}" for i in range(N)], "area_ink": 0.05}
                 ).to_csv(out / "images.csv", index=False)
    # Near the boundary: argmax nv both times; with offsets mel clean, nv inked.
    clean = [_probs(classes, 0.5, 0.1) if i < TIPPED else _probs(classes, 0.9, 0.02)
             for i in range(N)]
    inked = [_probs(classes, 0.6, 0.08) if i < TIPPED else _probs(classes, 0.9, 0.02)
             for i in range(N)]
    _results(out / "results" / "clean", classes, clean, ids)
    _results(out / "results" / "ink", classes, inked, ids)
    return str(out), str(classifier)


def test_flips_grow_with_the_offsets_strength(robustness_run, capsys):
    flips = load_benchmark("decision_flips")
    out, classifier = robustness_run
    classes, logp, fitted = flips.checkpoint_rule(classifier)
    table, scores = flips.load_run(out, classes)
    assert sorted(scores) == ["clean", "ink"] and len(table) == N
    argmax = flips.rule_figures(table, scores, classes, prior_offsets(logp, 0.0), 50, 0)
    adjusted = flips.rule_figures(table, scores, classes, fitted, 50, 0)
    assert argmax["flip_rate"]["ink"]["value"] == 0.0
    assert adjusted["flip_rate"]["ink"]["value"] == pytest.approx(TIPPED / N)
    # The argmax calls every melanoma nv (recall 0 and 1 over the two classes present); the
    # offsets find them all.
    assert argmax["balanced_accuracy"]["value"] == pytest.approx(0.5)
    assert adjusted["balanced_accuracy"]["value"] == pytest.approx(1.0)
    assert flips.main([out, "--classifier", classifier, "--taus", "0", "1",
                       "--replicates", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("tau 0 ") and lines[-3].endswith("0.000")
    assert lines[-1].startswith("fitted") and lines[-1].endswith(f"{TIPPED / N:.3f}")


def test_a_checkpoint_without_its_training_prior_is_named(tmp_path, tiny_checkpoints):
    flips = load_benchmark("decision_flips")
    with pytest.raises(SystemExit, match="records no training images for every class"):
        flips.checkpoint_rule(tiny_checkpoints["classifier"])
    with pytest.raises(SystemExit, match="images.csv: not found"):
        flips.load_run(str(tmp_path), ["nv"])
