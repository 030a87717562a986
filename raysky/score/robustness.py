"""``raysky robustness``: how much pasted dermoscopic artefacts move the model's answers.

The images of a dataset (optionally one split, or a seeded sample of ``limit``) are written to
a local folder twice over: as they are ("clean") and, per artefact kind, with one seeded
artefact pasted outside the lesion (:mod:`raysky.audit.artefacts`). The lesion is the
ground-truth mask where the dataset has one, and the segmenter's otherwise; the output counts
which. Every folder is a plain archive (lossless PNGs, ``<image id>.png``, and one metadata
CSV so the metadata branch sees the same inputs) scored by :func:`raysky.score.score_archive`,
the pipeline of ``raysky score``, with heatmaps. Rows pair by image id, and per kind the run
reports the flip rate of the predicted class, the mean absolute change of ``malignant_prob``,
the change of macro AUPRC and of malignant AUC against the ground truth (each with a paired,
lesion-clustered bootstrap interval), and the artefact attention: the Grad-CAM share on the
artefact's own pixels, beside the share the clean image's heatmap had on the same pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib

import numpy as np
import pandas as pd
import torch
from PIL import Image

from raysky import storage
from raysky.audit.artefacts import add_artefact, parse_kinds
from raysky.audit.paired import ROBUSTNESS_FILE, compare, example_strip, read_scored
from raysky.data.ids import archive_image_id
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import load_mask, load_rgb
from raysky.data.records import LesionRecord
from raysky.data.skin_tone import fit_mask
from raysky.data.splits import read_split
from raysky.inference import binary_mask, segment_probabilities
from raysky.jsonable import write_json
from raysky.models.checkpoint import load_checkpoint
from raysky.progress import Progress
from raysky.score.pipeline import score_archive
from raysky.score.settings import RobustnessSettings, ScoreSettings
from raysky.settings import ParameterError

MARKER = "_raysky_robustness.json"
CLEAN = "clean"
_OWNED = ("images", "artefact_masks", "results", "examples", "metadata.csv", "images.csv",
          ROBUSTNESS_FILE)
EXAMPLES = 4


def _claim_output(settings: RobustnessSettings) -> None:
    """Make ``out`` ours: new, empty, or an earlier run's (whose files go if it differs)."""
    out = settings.out
    if storage.is_s3(out):
        raise ParameterError("out", out, "robustness writes its image folders locally; give a "
                             "local folder")
    marker = os.path.join(out, MARKER)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(marker):
        raise ParameterError("out", out, "holds files that raysky robustness did not write; give "
                             "a new or empty folder")
    if os.path.exists(marker):
        with open(marker) as fh:
            same = json.load(fh) == settings.identity()
        # Same identity: the images come out identical and scoring resumes. Otherwise the old
        # results would pair with new images, so everything the earlier run wrote goes.
        for name in () if same else _OWNED:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(marker, "w") as fh:
        json.dump(settings.identity(), fh, indent=2)


def _select(records: list[LesionRecord], limit: int | None, seed: int) -> list[LesionRecord]:
    records = sorted(records, key=lambda r: r.image_id)
    if limit is not None and limit < len(records):
        keep = np.random.default_rng(seed).choice(len(records), size=limit, replace=False)
        records = [records[i] for i in sorted(keep)]
    return records


def _segmenter_masks(settings: RobustnessSettings, images: list[np.ndarray], cache: dict
                     ) -> list[np.ndarray]:
    if "segmenter" not in cache:
        cache["segmenter"] = load_checkpoint(settings.segmenter, "segmenter")
    model = cache["segmenter"]
    probs = segment_probabilities(model.model, model.meta, images, torch.device("cpu"))
    return [binary_mask(p, *image.shape[:2]) for p, image in zip(probs, images, strict=True)]


def artefact_rng(seed: int, kind: str, image_id: str) -> np.random.Generator:
    """The generator of one image's artefact: fixed by the seed, the kind and the image id, so
    it does not change when other images join or leave the sample."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), zlib.crc32(image_id.encode())])


def prepare_folders(settings: RobustnessSettings, records: list[LesionRecord]
                    ) -> tuple[pd.DataFrame, list[dict]]:
    """Write the clean and altered archives, the artefact masks and the metadata CSV.

    Returns one row per image written (``image_id``, the record's; ``file_id``, the archive id
    its file gets; ``label``, ``lesion_id``, ``mask_source``, the metadata and per kind the
    artefact's area fraction) and the images that could not be read, with the reason.
    """
    out, kinds, cache = settings.out, settings.artefacts, {}
    for name in (CLEAN, *kinds):
        os.makedirs(os.path.join(out, "images", name), exist_ok=True)
    for kind in kinds:
        os.makedirs(os.path.join(out, "artefact_masks", kind), exist_ok=True)
    rows, skipped = [], []
    batch_size = settings.score.batch_size
    progress = Progress("artefacts", total=len(records)) if settings.score.progress else None
    for start in range(0, len(records), batch_size):
        batch, images, masks = [], [], []
        for record in records[start:start + batch_size]:
            storage.check_name(f"{record.image_id}.png", "image id", nested=False)
            try:
                image = np.asarray(load_rgb(record.image_uri))
                mask = (fit_mask(load_mask(record.mask_uri), image.shape[:2]).astype(np.uint8)
                        if record.mask_uri else None)
            except (ImageDecodeError, OSError) as exc:
                skipped.append({"image_id": record.image_id, "error": str(exc)})
                continue
            batch.append(record)
            images.append(image)
            masks.append(mask)
        todo = [i for i, m in enumerate(masks) if m is None]
        if todo:
            for i, m in zip(todo, _segmenter_masks(settings, [images[i] for i in todo], cache),
                            strict=True):
                masks[i] = m
        for i, (record, image, mask) in enumerate(zip(batch, images, masks, strict=True)):
            name = f"{record.image_id}.png"
            row = {"image_id": record.image_id, "file_id": archive_image_id(name),
                   "label": record.label, "lesion_id": record.lesion_id,
                   "mask_source": "segmenter" if i in todo else "ground_truth",
                   "age": record.age, "sex": record.sex, "localization": record.site}
            Image.fromarray(image).save(os.path.join(out, "images", CLEAN, name))
            for kind in kinds:
                altered, changed = add_artefact(image, mask, kind,
                                                artefact_rng(settings.seed, kind, record.image_id))
                Image.fromarray(altered).save(os.path.join(out, "images", kind, name))
                Image.fromarray(changed.astype(np.uint8) * 255).save(
                    os.path.join(out, "artefact_masks", kind, name))
                row[f"area_{kind}"] = float(changed.mean())
            rows.append(row)
        if progress:
            progress.update(len(records[start:start + batch_size]))
    table = pd.DataFrame(rows)
    if not len(table):
        raise ValueError(f"{settings.data}: no readable images to test")
    table[["file_id", "age", "sex", "localization"]].rename(columns={"file_id": "image_id"}).to_csv(
        os.path.join(out, "metadata.csv"), index=False)
    table.to_csv(os.path.join(out, "images.csv"), index=False)
    return table, skipped


def score_folders(settings: RobustnessSettings) -> dict[str, str]:
    """Score every folder with :func:`raysky.score.score_archive`; returns name -> results."""
    outputs = {}
    for name in (CLEAN, *settings.artefacts):
        outputs[name] = os.path.join(settings.out, "results", name)
        summary = score_archive(ScoreSettings(
            input=os.path.join(settings.out, "images", name), output=outputs[name],
            segmenter=settings.segmenter, classifier=settings.classifier,
            metadata=os.path.join(settings.out, "metadata.csv"), heatmaps=True,
            tta=settings.tta, **settings.score.resources()))
        if settings.score.progress:
            print(f"{name}: {summary.scored} scored, {summary.skipped} already there",
                  file=sys.stderr)
    return outputs


def run_robustness(settings: RobustnessSettings) -> dict:
    """Prepare, score and compare (see the module docstring); writes ``robustness.json`` in
    ``settings.out`` and returns the same dict."""
    settings.artefacts = parse_kinds(settings.artefacts)
    if settings.limit is not None and settings.limit < 1:
        raise ParameterError("limit", settings.limit, "must be at least 1")
    if settings.replicates < 1:
        raise ParameterError("replicates", settings.replicates, "must be at least 1")
    settings.score.validate()
    records = _select(read_split(settings.dataset()), settings.limit, settings.seed)
    if not records:
        raise ValueError(f"{settings.data}: no images to test")
    _claim_output(settings)
    table, skipped = prepare_folders(settings, records)
    outputs = score_folders(settings)
    clean = read_scored(outputs[CLEAN], table)
    sources = table["mask_source"].value_counts().to_dict()
    counts = {"ground_truth": int(sources.get("ground_truth", 0)),
              "segmenter": int(sources.get("segmenter", 0))}
    report = {
        "version": "raysky-robustness/1", **settings.identity(),
        "replicates": settings.replicates, "images": len(table), "skipped": skipped,
        "mask_source": counts,
        "masks": ("ground truth" if not counts["segmenter"] else
                  "segmenter (the data has no masks)" if not counts["ground_truth"] else
                  "ground truth where the data has one, the segmenter's otherwise"),
        "clean_scored_ok": len(clean), "results": outputs, "by_artefact": {}, "examples": {},
    }
    shown = sorted(clean.index)[:EXAMPLES]
    for kind in settings.artefacts:
        altered = read_scored(outputs[kind], table)
        report["by_artefact"][kind] = compare(clean, altered, table, kind, settings.out,
                                              settings.replicates, settings.seed)
        report["examples"][kind] = example_strip(settings.out, kind, altered, shown)
    write_json(report, os.path.join(settings.out, ROBUSTNESS_FILE))
    return report


def card_section(report: dict) -> dict:
    """The model-card section of a robustness report: the per-type figures and where they were
    measured, without the file lists and example strips."""
    keys = ("data", "format", "split", "images", "masks", "mask_source", "seed", "artefacts",
            "by_artefact")
    return {k: report[k] for k in keys if k in report}


def _fmt(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def format_report(report: dict) -> str:
    """The printed table: one line per artefact kind."""
    lines = [f"{report['images']} images; artefacts placed with {report['masks']} masks "
             f"({report['mask_source']['ground_truth']} ground truth, "
             f"{report['mask_source']['segmenter']} segmenter)"
             f"{'; scored with test-time augmentation' if report.get('tta') else ''}",
             f"{'artefact':<10}{'pairs':>6}{'flip':>8}{'argmax':>8}{'|dp_mal|':>10}{'dAUPRC':>9}"
             f"{'dAUC_mal':>10}{'attention':>11}{'clean':>8}{'area':>8}"]
    for kind, r in report["by_artefact"].items():
        lines.append(
            f"{kind:<10}{r['pairs']:>6}{_fmt(r['flip_rate']['value']):>8}"
            f"{_fmt(r.get('argmax_flip_rate', {}).get('value')):>8}"
            f"{_fmt(r['mean_abs_delta_malignant_prob']):>10}"
            f"{_fmt(r['macro_auprc']['delta'], True):>9}"
            f"{_fmt(r['malignant_auc']['delta'], True):>10}"
            f"{_fmt(r['artefact_attention']):>11}{_fmt(r['clean_attention_same_pixels']):>8}"
            f"{_fmt(r['artefact_area_frac']):>8}")
    lines.append("flip: share of images whose predicted class changed (argmax: whose most "
                 "probable class changed, before decision offsets); dAUPRC, dAUC_mal: altered "
                 "minus clean; attention: Grad-CAM share on the artefact's pixels (clean: the "
                 "clean image's share on the same pixels; area: their share of the image)")
    return "\n".join(lines)
