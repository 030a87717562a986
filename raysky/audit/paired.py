"""Paired figures of one artefact kind: clean and altered results of the same images.

Rows pair by image id. The flip rates and the mean absolute change of ``malignant_prob`` are
over every pair, the flip rates with a Wilson interval by lesion: ``flip_rate`` of
``predicted_class``, the decision a clinic sees (with a calibration's decision offsets), and
``argmax_flip_rate`` of the most probable class (the network's own answer, which temperature
leaves alone; offsets move decisions near a class boundary, so the first is usually the
larger). Macro AUPRC (the mean over classes of average precision, as
:func:`raysky.metrics.isic.average_precision` computes it) and malignant AUC over the labelled
pairs, as altered minus clean, each with a paired bootstrap interval (one resample of lesions,
or of images without lesion ids, scores both sides); see :mod:`raysky.metrics.intervals`.
Artefact attention is the Grad-CAM share on the artefact's known pixels
(:func:`raysky.audit.attention.artefact_attention`), beside the clean image's share on the same
pixels and the pixels' share of the image.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
from PIL import Image

from raysky.audit.attention import artefact_attention, decode_heatmap, resize_heatmap
from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.intervals import bootstrap_intervals, proportion_interval
from raysky.metrics.isic import average_precision, rank_auc
from raysky.results.reader import read

ROBUSTNESS_FILE = "robustness.json"
"""The report of a ``raysky robustness`` run (:mod:`raysky.score.robustness`) in its ``out``
folder: these figures, per artefact kind, which ``raysky report --robustness`` reads back."""


def read_scored(uri: str, table: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` results under ``uri``, indexed by the record's image id."""
    frame = read(uri)
    frame = frame[frame["status"] == "ok"]
    ids = dict(zip(table["file_id"], table["image_id"], strict=True))
    return frame.assign(record_id=frame["image_id"].map(ids)).dropna(
        subset=["record_id"]).set_index("record_id")


def macro_auprc(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> float:
    """Mean over the classes with a positive among ``labels`` of the average precision of
    ``probs[:, i]`` (:func:`raysky.metrics.isic.average_precision`); NaN when none has one."""
    values = [average_precision(labels == c, probs[:, i]) for i, c in enumerate(classes)
              if (labels == c).any()]
    return float(np.mean(values)) if values else math.nan


def _interval(entry: dict, name: str = "value") -> dict:
    return {name: entry["value"], "low": entry["low"], "high": entry["high"]}


def compare(clean: pd.DataFrame, altered: pd.DataFrame, table: pd.DataFrame, kind: str,
            out: str, replicates: int, seed: int) -> dict:
    """The figures of one artefact kind, over the images scored ok in both folders.

    ``clean`` and ``altered`` are :func:`read_scored` frames, ``table`` the rows
    :func:`raysky.score.robustness.prepare_folders` wrote (labels, lesion ids), ``out`` the
    folder holding ``artefact_masks/<kind>/``. ``not_scored`` counts images without an ok row
    on both sides, ``not_placed`` those where the artefact found no skin (left out of the
    attention means, which are over the ``explained`` images).
    """
    ids = sorted(set(clean.index) & set(altered.index))
    meta = table.set_index("image_id").loc[ids]
    classes = [c[len("prob_"):] for c in clean.columns if c.startswith("prob_")]
    cols = [f"prob_{c}" for c in classes]
    c, a = clean.loc[ids], altered.loc[ids]
    flips = (c["predicted_class"].to_numpy() != a["predicted_class"].to_numpy()).astype(float)
    delta_p = np.abs(a["malignant_prob"].to_numpy() - c["malignant_prob"].to_numpy())
    labels = meta["label"].to_numpy(object)
    known = pd.notna(labels)
    truth = np.isin(labels, list(MALIGNANT_CLASSES))
    pc_, pa_ = c[cols].to_numpy(np.float64), a[cols].to_numpy(np.float64)
    mc, ma = c["malignant_prob"].to_numpy(np.float64), a["malignant_prob"].to_numpy(np.float64)
    argmax_flips = pc_.argmax(axis=1) != pa_.argmax(axis=1)

    def paired(fn):  # a metric on (clean, altered) rows of a resample, as altered - clean
        return lambda i: fn(i, pa_, ma) - fn(i, pc_, mc)

    def auprc(i, probs, _mal):
        i = i[known[i]]
        return macro_auprc(labels[i], probs[i], classes)

    def auc(i, _probs, mal):
        i = i[known[i]]
        return rank_auc(truth[i], mal[i])

    lesions = meta["lesion_id"].to_numpy(object)
    clusters = None if pd.isna(lesions).all() else lesions
    stats = bootstrap_intervals(
        {"delta_macro_auprc": paired(auprc), "delta_malignant_auc": paired(auc)},
        np.arange(len(ids)), clusters=clusters, replicates=replicates, seed=seed)
    stats["flip_rate"] = proportion_interval(flips.astype(bool), clusters)
    stats["argmax_flip_rate"] = proportion_interval(argmax_flips, clusters)
    every = np.arange(len(ids))
    attention, before, areas, not_placed = _attention_on_artefacts(ids, c, a, out, kind)
    return {
        "pairs": len(ids), "labelled": int(known.sum()),
        "not_scored": int(len(table) - len(ids)),
        "flip_rate": _interval(stats["flip_rate"]),
        "argmax_flip_rate": _interval(stats["argmax_flip_rate"]),
        "mean_abs_delta_malignant_prob": float(delta_p.mean()) if len(ids) else None,
        "macro_auprc": {"clean": _nan_none(auprc(every, pc_, mc)),
                        "altered": _nan_none(auprc(every, pa_, ma)),
                        **_interval(stats["delta_macro_auprc"], "delta")},
        "malignant_auc": {"clean": _nan_none(auc(every, pc_, mc)),
                          "altered": _nan_none(auc(every, pa_, ma)),
                          **_interval(stats["delta_malignant_auc"], "delta")},
        "artefact_attention": _mean(attention), "clean_attention_same_pixels": _mean(before),
        "artefact_area_frac": _mean(areas), "explained": len(attention),
        "not_placed": not_placed,
    }


def _attention_on_artefacts(ids: list[str], clean: pd.DataFrame, altered: pd.DataFrame,
                            out: str, kind: str) -> tuple[list[float], list[float], list[float], int]:
    """Per image with an artefact and both heatmaps: the altered heatmap's share on the artefact's
    pixels, the clean heatmap's share on the same pixels, and the artefact's area; then how many
    images had no artefact placed (a lesion filling the frame leaves no skin to put it on)."""
    attention, before, areas, not_placed = [], [], [], 0
    for image_id in ids:
        mask = np.asarray(Image.open(os.path.join(out, "artefact_masks", kind, f"{image_id}.png"))) > 0
        if not mask.any():
            not_placed += 1
            continue
        maps = [frame.at[image_id, "heatmap_png"] for frame in (altered, clean)]
        if any(m is None for m in maps):
            continue
        attention.append(artefact_attention(decode_heatmap(maps[0]), mask))
        before.append(artefact_attention(decode_heatmap(maps[1]), mask))
        areas.append(float(mask.mean()))
    return attention, before, areas, not_placed


def _nan_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _tile(image: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heatmap over the image on a blue-green-red ramp, half transparent."""
    h = resize_heatmap(heat, rgb.shape[:2])[..., None]
    ramp = np.concatenate([h, 1 - np.abs(2 * h - 1), 1 - h], axis=2) * 255
    return np.rint(0.5 * rgb + 0.5 * ramp).astype(np.uint8)


def example_strip(out: str, kind: str, altered: pd.DataFrame, ids: list[str],
                  height: int = 150) -> str:
    """A PNG of up to ``len(ids)`` examples, one column each: the clean image, the altered
    one, and the altered image's Grad-CAM over it. Written to ``examples/<kind>.png`` in
    ``out``; returns its path."""
    columns = []
    for image_id in ids:
        clean = np.asarray(Image.open(os.path.join(out, "images", "clean", f"{image_id}.png")))
        changed = np.asarray(Image.open(os.path.join(out, "images", kind, f"{image_id}.png")))
        data = altered.at[image_id, "heatmap_png"] if image_id in altered.index else None
        tiles = [clean, changed] + ([_overlay(changed, decode_heatmap(data))] if data else [])
        columns.append(np.concatenate([_tile(t, height) for t in tiles], axis=0))
    rows = max(c.shape[0] for c in columns)
    columns = [np.pad(c, ((0, rows - c.shape[0]), (0, 4), (0, 0)), constant_values=255)
               for c in columns]
    path = os.path.join(out, "examples", f"{kind}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.concatenate(columns, axis=1)).save(path)
    return path
