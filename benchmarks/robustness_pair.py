"""Paired artefact robustness of two classifiers: does a candidate flip less than a baseline on the
very same images and artefacts?

    python benchmarks/robustness_pair.py BASELINE_DIR CANDIDATE_DIR [--replicates 1000]

Each folder is the ``--out`` of one ``raysky robustness`` run. The two runs must have written
the same images with the same artefacts (the same data, ``--limit``, ``--seed`` and masks), which
this checks from their ``images.csv`` (ids, lesions, labels and each artefact's area) before it
compares anything. Per artefact kind, over the images scored ok in all four folders (clean and
altered, both runs), it prints each run's flip rate of the decision (``predicted_class``, with a
calibration's decision offsets) and of the argmax, each run's macro AUPRC change (altered minus
clean), and the candidate minus the baseline of each, with a percentile bootstrap interval that
resamples lesions (one resample scores both runs: the figures are paired). Unpaired runs on
different samples would carry the sampling noise of both; pairing leaves the models' difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysky.audit.paired import ROBUSTNESS_FILE, macro_auprc, read_scored  # noqa: E402
from raysky.metrics.intervals import bootstrap_intervals, format_interval  # noqa: E402
from raysky.score.robustness import CLEAN  # noqa: E402

SAME_COLUMNS = ("file_id", "lesion_id", "label")


def _run_file(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found; pass the --out folder of a finished raysky "
                         f"robustness run")
    return path


def read_images(folder: str) -> pd.DataFrame:
    """A robustness folder's image table (``images.csv``: ids, labels, lesions, areas)."""
    return pd.read_csv(_run_file(folder, "images.csv"), dtype={"image_id": str, "file_id": str})


def load_run(folder: str) -> tuple[pd.DataFrame, dict]:
    """A robustness folder's image table and report (``robustness.json``)."""
    table = read_images(folder)
    with open(_run_file(folder, ROBUSTNESS_FILE)) as f:
        return table, json.load(f)


def check_same_images(baseline: pd.DataFrame, candidate: pd.DataFrame, kinds: list[str]) -> None:
    """Stop unless both tables hold the same images, lesions, labels and artefact areas: only
    then do the two runs' altered images match pixel for pixel (the artefacts are seeded by the
    run's seed, the kind and the image id, and placed outside the same lesion mask)."""
    a, b = baseline.set_index("image_id"), candidate.set_index("image_id")
    if set(a.index) != set(b.index):
        only = sorted(set(a.index) ^ set(b.index))
        raise SystemExit(f"the runs tested different images ({len(only)} in one only, e.g. "
                         f"{only[0]}); rerun both with the same --data, --split, --limit and "
                         f"--seed")
    b = b.loc[a.index]
    columns = [*SAME_COLUMNS, *(f"area_{kind}" for kind in kinds)]
    for column in columns:
        left, right = a[column], b[column]
        same = (left == right) | (left.isna() & right.isna())
        if column.startswith("area_"):
            same = np.isclose(left.to_numpy(float), right.to_numpy(float), atol=1e-9)
        if not np.all(same):
            image = a.index[~np.asarray(same)][0]
            raise SystemExit(f"image {image}: {column} differs between the runs, so their "
                             f"artefacts differ; rerun both with the same --seed and masks")


def _scored(folder: str, table: pd.DataFrame, name: str) -> pd.DataFrame:
    """One results folder of a run (``clean`` or a kind), from its folder's fixed layout."""
    return read_scored(os.path.join(folder, "results", name), table)


def compare_kind(runs: list[tuple[str, pd.DataFrame, pd.DataFrame]], kind: str, replicates: int,
                 seed: int) -> dict:
    """The paired figures of one artefact kind for ``runs`` = [baseline, candidate], each as
    (folder, image table, clean results)."""
    frames = [(clean, _scored(folder, table, kind)) for folder, table, clean in runs]
    ids = sorted(set.intersection(*(set(f.index) for pair in frames for f in pair)))
    if not ids:
        raise SystemExit(f"{kind}: no image was scored ok in all four folders")
    table = runs[0][1].set_index("image_id").loc[ids]
    classes = [c[len("prob_"):] for c in frames[0][0].columns if c.startswith("prob_")]
    cols = [f"prob_{c}" for c in classes]
    labels = table["label"].to_numpy(object)
    known = pd.notna(labels)
    arrays = {}
    for name, (clean, altered) in zip(("baseline", "candidate"), frames, strict=True):
        clean, altered = clean.loc[ids], altered.loc[ids]
        pc, pa = clean[cols].to_numpy(np.float64), altered[cols].to_numpy(np.float64)
        arrays[name] = {
            "flip_rate": (clean["predicted_class"].to_numpy() !=
                          altered["predicted_class"].to_numpy()).astype(float),
            "argmax_flip_rate": (pc.argmax(axis=1) != pa.argmax(axis=1)).astype(float),
            "probs": (pc, pa)}

    def auprc_delta(name):
        pc, pa = arrays[name]["probs"]

        def delta(i):
            i = i[known[i]]
            return macro_auprc(labels[i], pa[i], classes) - macro_auprc(labels[i], pc[i], classes)
        return delta

    metrics = {}
    for key in ("flip_rate", "argmax_flip_rate"):
        base, cand = arrays["baseline"][key], arrays["candidate"][key]
        metrics[f"baseline_{key}"] = lambda i, v=base: float(v[i].mean())
        metrics[f"candidate_{key}"] = lambda i, v=cand: float(v[i].mean())
        metrics[f"difference_{key}"] = lambda i, a=base, b=cand: float(b[i].mean() - a[i].mean())
    base_auprc, cand_auprc = auprc_delta("baseline"), auprc_delta("candidate")
    metrics["baseline_delta_macro_auprc"] = base_auprc
    metrics["candidate_delta_macro_auprc"] = cand_auprc
    metrics["difference_delta_macro_auprc"] = lambda i: cand_auprc(i) - base_auprc(i)
    lesions = table["lesion_id"].to_numpy(object)
    clusters = None if pd.isna(lesions).all() else np.where(pd.isna(lesions), ids, lesions)
    stats = bootstrap_intervals(metrics, np.arange(len(ids)), clusters=clusters,
                                replicates=replicates, seed=seed)
    return {"pairs": len(ids), **stats}


def compare_runs(baseline: str, candidate: str, replicates: int = 1000, seed: int = 0) -> dict:
    """Every artefact kind both runs measured, paired (see the module docstring)."""
    loaded = [(folder, *load_run(folder)) for folder in (baseline, candidate)]
    (_, table_a, report_a), (_, table_b, report_b) = loaded
    kinds = [k for k in report_a["by_artefact"] if k in report_b["by_artefact"]]
    if not kinds:
        raise SystemExit("the two runs measured no artefact kind in common")
    check_same_images(table_a, table_b, kinds)
    # The clean results are read once per run, not once per kind.
    runs = [(folder, table, _scored(folder, table, CLEAN)) for folder, table, _report in loaded]
    return {"baseline": baseline, "candidate": candidate, "replicates": replicates, "seed": seed,
            "by_artefact": {kind: compare_kind(runs, kind, replicates, seed) for kind in kinds}}


def format_comparison(result: dict) -> str:
    """One line per artefact kind: both runs' figures and the paired difference."""
    lines = [f"baseline  {result['baseline']}", f"candidate {result['candidate']}",
             "per kind: baseline, candidate, candidate minus baseline [95% interval, lesions "
             "resampled]"]
    for kind, r in result["by_artefact"].items():
        lines.append(f"{kind} ({r['pairs']} images)")
        for key, label in (("flip_rate", "decision flips"), ("argmax_flip_rate", "argmax flips"),
                           ("delta_macro_auprc", "d macro AUPRC")):
            lines.append(f"  {label:<15}{r['baseline_' + key]['value']:8.3f}"
                         f"{r['candidate_' + key]['value']:8.3f}   "
                         f"{format_interval(r['difference_' + key])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="--out folder of the baseline's raysky robustness run")
    parser.add_argument("candidate", help="--out folder of the candidate's run")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.replicates < 1:
        parser.error(f"--replicates {args.replicates}: must be at least 1")
    result = compare_runs(args.baseline, args.candidate, args.replicates, args.seed)
    print(format_comparison(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
