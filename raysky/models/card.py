"""Model cards: what a checkpoint is, what it was trained on, how well it did for whom, and
what it must not be used for, as ``model_card.json`` and ``model_card.md`` beside the weights.

A card is built from the checkpoint's own ``config.json`` and never stored apart from it, so it
cannot disagree with the checkpoint: training records its provenance there (data, split-file
hash, recipe, machine, wall time), ``raysky calibrate`` its calibration, and ``raysky
evaluate --update-card`` / ``raysky robustness --update-card`` add their sections under
``card``. Adding a section writes a new checkpoint version (the weights copied byte for byte,
so ``version`` and ``weights_sha256`` stay the same) and leaves the original as it was.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

from raysky import storage
from raysky.metrics.intervals import format_interval, group_rows

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "model_card.md"
CARD_FORMAT = "raysky-model-card/1"
SECTIONS: tuple[str, ...] = ("evaluation", "subgroups", "robustness")
"""Sections that ``update_card`` adds; the others come from training and calibration."""

INTENDED_USE = (
    "Decision support for clinicians trained in dermoscopy: a second opinion on dermoscopic "
    "images of a single skin lesion, with the lesion mask and a Grad-CAM heatmap to check what "
    "the prediction rests on. It is not a diagnosis, it does not replace histopathology or a "
    "clinician's examination, and it must not be used to rule out malignancy on its own.")
DATASETS = {"ham10000": ("HAM10000", "cc-by-nc-4.0"), "isic2018": ("ISIC 2018", "cc-by-nc-4.0"),
            "isic2019": ("ISIC 2019", "cc-by-nc-4.0")}
"""Name and licence of each dataset layout: a model trained on CC BY-NC data inherits the
non-commercial term; weights trained on anything else are ``other`` until their data says."""
INDEX_METRICS = {"classifier": (("balanced_accuracy", "Balanced accuracy"), ("auc", "Macro AUC"),
                                ("malignant_auc", "Malignant vs benign AUC"),
                                ("accuracy", "Accuracy"), ("ece_after", "ECE (calibrated)")),
                 "segmenter": (("dice", "Dice"), ("jaccard", "Jaccard"),
                               ("threshold_jaccard", "Thresholded Jaccard (ISIC)"))}
"""The figures a card's ``model-index`` reports, by model kind, with their display names."""
VAL_METRICS = ("balanced_accuracy", "auc", "accuracy", "auc_per_class", "val_loss",
               "dice", "jaccard", "threshold_jaccard", "val_images")


def machine_description() -> dict[str, Any]:
    """The machine a model was trained on: CPU model and cores, GPU, and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # the card is also built where only torch is installed
        ray_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version}


def build_card(meta: dict) -> dict[str, Any]:
    """The card of the checkpoint described by ``meta`` (its ``config.json``), as JSON data.

    Missing facts (a checkpoint saved outside ``raysky train``, sections not yet added) are
    ``None`` with ``"not recorded"``/``"not measured"`` notes in the markdown, never guessed.
    """
    extra = meta.get("extra", {})
    config = meta.get("config", {})
    settings = extra.get("settings", {})
    provenance = extra.get("provenance", {})
    metrics = dict(extra.get("metrics", {}))
    if "macro_auc" in metrics and "auc" not in metrics:  # checkpoints trained before the rename
        metrics["auc"] = metrics["macro_auc"]
    classes = meta.get("classes")
    calibration = meta.get("calibration")
    card = {
        "format": CARD_FORMAT,
        "model": {
            "kind": meta.get("kind"), "preset": meta.get("preset"),
            "version": meta.get("version"), "weights_sha256": meta.get("weights_sha256"),
            "calibration_version": (calibration or {}).get("version"),
            "raysky_version": meta.get("raysky_version"), "created_at": meta.get("created_at"),
            "encoder": config.get("encoder"), "input_size": meta.get("input_size"),
            "trained_input_size": config.get("input_size"),
            "parameters": meta.get("parameters"), "classes": classes,
            "lesion_stream": config.get("use_lesion_stream"),
            "metadata": config.get("use_metadata"),
            "architecture": ("Deep-UNet with dual attention gates on the skips and an ASPP "
                             "bottleneck" if meta.get("kind") == "segmenter" else
                             "full-image and lesion streams fused by cross-attention, plus a "
                             "metadata transformer (age, sex, site)"
                             if meta.get("kind") == "classifier" else None),
        },
        "initial_weights": extra.get("initial_weights"),
        "training_data": provenance.get("training_data"),
        "recipe": {
            "epochs": settings.get("epochs"), "batch_size": settings.get("batch_size"),
            "workers": settings.get("workers"), "lr": settings.get("lr"),
            "encoder_lr_scale": settings.get("encoder_lr_scale"),
            "weight_decay": settings.get("weight_decay"),
            "label_smoothing": settings.get("label_smoothing"),
            "class_weight_power": settings.get("class_weight_power"),
            "artefact_consistency": settings.get("artefact_consistency"),
            "schedule": provenance.get("schedule"), "augmentation": provenance.get("augmentation"),
            "precision": metrics.get("precision", settings.get("precision")),
            "training_seconds": extra.get("training_seconds"),
            "machine": extra.get("machine"),
        } if settings else None,
        "validation": ({"epoch": extra.get("epoch"),
                        **{k: metrics[k] for k in VAL_METRICS if k in metrics}}
                       if metrics else None),
        "calibration": _calibration_section(calibration) if calibration else None,
        **{section: meta.get("card", {}).get(section) for section in SECTIONS},
        "intended_use": INTENDED_USE,
        "limitations": _limitations(meta, provenance.get("training_data")),
    }
    return card


def _calibration_section(calibration: dict) -> dict[str, Any]:
    """The card's calibration facts: temperature, decision offsets, referral and OOD.

    The OOD statistics themselves (means, covariance) stay in ``config.json``; the card keeps
    what a reader checks: the method, its threshold, and for the gate its encoder's weight
    source and sha256 and the per-class thresholds.
    """
    ood = calibration.get("ood", {})
    summary = {k: v for k, v in ood.items()
               if k in ("method", "threshold", "quantile", "dim", "components", "encoder")}
    if "class_thresholds" in ood:
        summary["class_thresholds"] = ood["class_thresholds"]
    return {"temperature": calibration.get("temperature"),
            # None: a calibration from before decision offsets (argmax of the probabilities)
            "decision_offsets": calibration.get("decision_offsets"),
            "decision_rule": calibration.get("decision_rule"),
            "referral": calibration.get("referral"), "ood": summary,
            "fitted_on": calibration.get("fitted_on")}


def _decision_lines(calibration: dict) -> list[str]:
    offsets = calibration.get("decision_offsets")
    if not offsets:
        return ["- Decision: no decision offsets are set; predicted_class is the argmax of the "
                "calibrated probabilities (`raysky calibrate` fits offsets for balanced "
                "accuracy)"]
    rule = calibration.get("decision_rule") or {}
    ba = rule.get("balanced_accuracy") or {}
    crossed = ba.get("cross_fitted") or {}
    lines = [f"- Decision: predicted_class = argmax(logits / T + offset), offsets by "
             f"{_value(rule.get('method'))} (tau {_value(rule.get('tau'), 2)}, prior from the "
             f"{_value(rule.get('prior_source'))}); probabilities are not changed by them",
             "- Decision offsets: " + ", ".join(f"{k} {v:+.3f}" for k, v in offsets.items())]
    if ba:
        lines.append(f"- Balanced accuracy on the calibration data: {_value(ba.get('before'))} "
                     f"without offsets, {_value(ba.get('after'))} with (in-sample); "
                     f"cross-fitted on lesion-disjoint halves: none "
                     f"{_value(crossed.get('none'))}, prior {_value(crossed.get('prior'))}, "
                     f"prior+classwise {_value(crossed.get('prior+classwise'))}")
    for name, why in (rule.get("classes_not_fitted") or {}).items():
        lines.append(f"- Offset of {name} not fitted: {why}")
    return lines


def _ood_line(ood: dict) -> str:
    if ood.get("method") == "imagenet-gate":
        encoder = ood.get("encoder") or {}
        return (f"- Out of distribution: dermoscopy gate on a frozen {encoder.get('architecture')} "
                f"({encoder.get('source')}, sha256 `{encoder.get('sha256')}`) at "
                f"{encoder.get('input_size')} px; flagged when ood_score > "
                f"{_value(ood.get('threshold'))}; per-class thresholds "
                f"{_value(ood.get('class_thresholds'))}")
    return f"- Out of distribution: {_value(ood)}"


def _limitations(meta: dict, data: dict | None) -> list[str]:
    classes = meta.get("classes")
    limits = []
    if classes:
        limits.append(f"It recognises only {', '.join(classes)}; any other lesion (for "
                      "example squamous cell carcinoma in a HAM10000 model, or a melanoma "
                      "subtype not in training) is forced into one of these classes.")
    limits.append("Skin tone: HAM10000 and ISIC archives are predominantly light skin "
                  "(Fitzpatrick I-III) and training did not measure the tones it saw; per-tone "
                  "performance is only known where the subgroup section reports it (`raysky "
                  "evaluate` groups by the ITA skin tone of each image).")
    limits.append("Image types: trained on dermoscopy only. Clinical (macroscopic) photos, "
                  "histology, screenshots and scans of documents were never shown; the "
                  "out-of-distribution flag is advice, not a guarantee that such images are "
                  "caught.")
    if data and data.get("format"):
        limits.append(f"Trained on one {data['format']} dataset; performance on other "
                      "dermoscopes, clinics and populations is unknown until measured there.")
    return limits


def _value(value: Any, digits: int = 3) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v, digits)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v, digits) for v in value) + "]"
    return str(value)


def _table(intro: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table under a one-line ``intro``: the ``header`` row, its separator (one
    ``---`` a column) and a line for each of ``rows``, whose cells are already formatted."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [intro, "", line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def _index_result(kind: str, figures: dict | None, data: dict | None, split: str | None) -> dict | None:
    """One ``model-index`` result: the :data:`INDEX_METRICS` present in ``figures``."""
    metrics = [{"type": key, "name": name, "value": round(float(figures[key]), 4)}
               for key, name in INDEX_METRICS.get(kind, ())
               if isinstance((figures or {}).get(key), int | float)
               and figures[key] == figures[key]]  # NaN is no figure
    if not metrics:
        return None
    layout = (data or {}).get("format")
    dataset = {"type": layout or "unknown", "name": DATASETS.get(layout, (layout or "unknown",))[0]}
    if split:
        dataset["split"] = split
    task = ({"type": "image-classification", "name": "Skin lesion classification"}
            if kind == "classifier" else
            {"type": "image-segmentation", "name": "Skin lesion segmentation"})
    return {"task": task, "dataset": dataset, "metrics": metrics}


def front_matter(card: dict) -> dict[str, Any]:
    """Hugging Face model-card metadata for ``card``: licence, tags, datasets and the measured
    figures as ``model-index`` (validation, and the evaluation section where measured)."""
    model = card["model"]
    kind = model["kind"] or "model"
    data = card["training_data"] or {}
    layout = data.get("format")
    pipeline = {"classifier": "image-classification", "segmenter": "image-segmentation"}.get(kind)
    tags = ["raysky", "dermatology", "dermoscopy", "skin-lesion", "medical-imaging",
            *([pipeline] if pipeline else []), f"preset-{model['preset']}"]
    if card["calibration"]:
        tags.append("calibrated")
    evaluation = card.get("evaluation") or {}
    results = [r for r in (
        _index_result(kind, card["validation"], data, "validation"),
        _index_result(kind, evaluation, {"format": evaluation.get("format") or layout},
                      evaluation.get("split") or "evaluation")) if r]
    meta: dict[str, Any] = {
        "license": DATASETS[layout][1] if layout in DATASETS else "other",
        "library_name": "pytorch", "pipeline_tag": pipeline, "tags": tags,
        "datasets": [layout] if layout else None,
        "metrics": sorted({m["type"] for r in results for m in r["metrics"]}) or None,
        "model-index": [{"name": f"raysky-{kind}-{model['version']}", "results": results}]
        if results else None,
    }
    return {k: v for k, v in meta.items() if v is not None}


def _referral_line(referral: dict) -> str:
    """The evaluated referral, each rate as ``value [low, high]``: printed as evaluate, the
    report and the subgroup table's overall row print the same figure."""
    def rate(name: str) -> str:
        low, high = referral.get(f"{name}_ci95") or (None, None)
        return format_interval({"value": referral.get(name), "low": low, "high": high})

    return (f"- Referral at malignant_prob >= {_value(referral.get('threshold'), 4)}: "
            f"sensitivity {rate('sensitivity')} on {_value(referral.get('n_malignant'))} "
            f"malignant, specificity {rate('specificity')} on "
            f"{_value(referral.get('n_benign'))} benign (95%, "
            f"{referral.get('interval', 'bootstrap')})")


def _yaml_scalar(value: Any) -> str:
    # Double-quoted YAML strings are JSON strings, so json.dumps quotes and escapes them.
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value) if isinstance(value, int | float) else json.dumps(str(value))


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines for nested dicts, lists and scalars (enough for front matter,
    without making PyYAML a dependency of every checkpoint write)."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines += [f"{pad}{key}:", *to_yaml(item, indent + 2)]
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item) if item != [] else '[]'}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            nested = to_yaml(item, indent + 2) if isinstance(item, dict | list) else None
            if nested:
                lines += [f"{pad}- {nested[0].lstrip()}", *nested[1:]]
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
        return lines
    return [f"{pad}{_yaml_scalar(value)}"]


def _trained_at(model: dict) -> str:
    """Where a model runs at another side than it trained at (FixRes), the side it trained at."""
    trained = model.get("trained_input_size")
    return "" if trained in (None, model["input_size"]) else f" (trained at {trained} px)"


def _model_lines(card: dict) -> list[str]:
    model = card["model"]
    lines = [f"- Kind: {model['kind']}, preset `{model['preset']}`: {model['architecture']}",
             f"- Encoder: {_value(model['encoder'])} at {_value(model['input_size'])} px"
             f"{_trained_at(model)}; {_value(model['parameters'])} parameters",
             f"- Version {model['version']}, weights sha256 `{model['weights_sha256']}`"
             + (f", calibration {model['calibration_version']}"
                if model["calibration_version"] else ""),
             f"- raysky {model['raysky_version']}, created {model['created_at']}"]
    if model["classes"]:
        lines.append(f"- Classes: {', '.join(model['classes'])}; lesion stream "
                     f"{_value(model['lesion_stream'])}, metadata {_value(model['metadata'])}")
    return lines


def _initial_weights_lines(card: dict) -> list[str]:
    weights = card["initial_weights"]
    if not weights:
        return ["- not recorded"]
    return [f"- {name}: {record.get('source')} (sha256 `{record.get('sha256')}`, "
            f"{record.get('tensors_loaded')}/{record.get('tensors_total')} tensors)"
            for name, record in weights.items()]


def _training_data_lines(card: dict) -> list[str]:
    data = card["training_data"]
    if not data:
        return ["- not recorded"]
    lines = [f"- {data.get('data')} ({data.get('format')}); split {data.get('split')}"
             + (f" (sha256 `{data['split_sha256']}`)" if data.get("split_sha256") else ""),
             "- Image ids per side: sha256 " + (
                 f"`{data['split_ids_sha256']}`" if data.get("split_ids_sha256")
                 else "not recorded"),
             f"- {data.get('train_images')} training and {data.get('val_images')} "
             "validation images"]
    for part in ("train_classes", "val_classes"):
        if data.get(part):
            lines.append(f"- {part.replace('_', ' ')}: {_value(data[part])}")
    return lines


def _recipe_lines(card: dict) -> list[str]:
    recipe = card["recipe"]
    if not recipe:
        return ["- not recorded"]
    return [f"- {_value(recipe['epochs'])} epochs, batch {_value(recipe['batch_size'])} "
            f"per worker on {_value(recipe['workers'])} worker(s), precision "
            f"{_value(recipe['precision'])}",
            f"- AdamW, lr {_value(recipe['lr'], 6)} (encoders x"
            f"{_value(recipe['encoder_lr_scale'], 2)}), weight decay "
            f"{_value(recipe['weight_decay'], 6)}, label smoothing "
            f"{_value(recipe['label_smoothing'], 2)}, class weight power "
            f"{_value(recipe['class_weight_power'], 2)}"
            + (f", artefact consistency {_value(recipe['artefact_consistency'], 2)}"
               if recipe.get("artefact_consistency") else ""),
            f"- Schedule: {_value(recipe['schedule'])}",
            f"- Augmentation: {_value(recipe['augmentation'])}",
            "- Training time: " + (
                f"{recipe['training_seconds']:.0f} s" if recipe["training_seconds"]
                is not None else "not recorded")
            + (f" on {_value(recipe['machine'])}" if recipe["machine"] else "")]


def _validation_lines(card: dict) -> list[str]:
    validation = card["validation"]
    return ([f"- {k}: {_value(v)}" for k, v in validation.items()] if validation
            else ["- not recorded"])


def _calibration_lines(card: dict) -> list[str]:
    calibration = card["calibration"]
    if not calibration:
        return ["- not calibrated (`raysky calibrate` adds it)"]
    ref = calibration["referral"] or {}
    return [f"- Temperature {_value(calibration['temperature'])}; fitted on "
            f"{_value(calibration['fitted_on'])}",
            f"- Refer at malignant_prob >= {_value(ref.get('threshold'), 4)}: sensitivity "
            f"{_value(ref.get('sensitivity'))} (target {_value(ref.get('target_sensitivity'), 2)}), "
            f"specificity {_value(ref.get('specificity'))}",
            *_decision_lines(calibration),
            _ood_line(calibration["ood"])]


def _evaluation_lines(card: dict) -> list[str]:
    evaluation = card["evaluation"]
    if not evaluation:
        return ["- not measured (`raysky evaluate --update-card`)"]
    lines = [f"- {_value({k: v for k, v in evaluation.items() if k != 'referral'})}"]
    if evaluation.get("referral"):
        lines.append(_referral_line(evaluation["referral"]))
    return lines


def _subgroup_lines(card: dict) -> list[str]:
    subgroups = card["subgroups"]
    if not subgroups:
        return ["- not measured (`raysky evaluate --classifier CKPT --update-card OUT`)"]
    rows = []
    for name, g in group_rows({"groupings": {}, **subgroups}):
        notes = ", ".join(n for n, on in (("too few", g.get("too_few")),
                                          ("flagged", g.get("flagged"))) if on)
        rows.append([name, f"{g['n']}", f"{g['malignant_n']}",
                     *(format_interval(g.get(k), 3) for k in (
                         "balanced_accuracy", "malignant_auc", "sensitivity", "specificity")),
                     notes])
    return _table(f"Resampled by {subgroups.get('resampled_by')}; referral threshold "
                  f"{_value(subgroups.get('threshold'), 4)}.",
                  ("group", "n", "malignant", "balanced accuracy", "malignant AUC",
                   "sensitivity", "specificity", "notes"), rows)


def _robustness_lines(card: dict) -> list[str]:
    robustness = card["robustness"]
    if not robustness:
        return ["- not measured (`raysky robustness --update-card OUT`)"]
    return _table(
        f"{robustness.get('images')} images, artefacts placed with "
        f"{robustness.get('masks')} masks.",
        ("artefact", "flip rate", "mean abs. change malignant_prob", "change macro AUPRC",
         "change malignant AUC", "artefact attention", "its area"),
        ([kind, _value(r["flip_rate"]["value"]), _value(r["mean_abs_delta_malignant_prob"]),
          _value(r["macro_auprc"]["delta"]), _value(r["malignant_auc"]["delta"]),
          _value(r["artefact_attention"]), _value(r["artefact_area_frac"])]
         for kind, r in robustness.get("by_artefact", {}).items()))


_MARKDOWN_SECTIONS = (
    ("Model", _model_lines), ("Initial weights", _initial_weights_lines),
    ("Training data", _training_data_lines), ("Recipe", _recipe_lines),
    ("Validation", _validation_lines), ("Calibration and referral", _calibration_lines),
    ("Evaluation", _evaluation_lines), ("Subgroups", _subgroup_lines),
    ("Robustness to dermoscopic artefacts", _robustness_lines),
)
"""The card's Markdown sections in order, each rendered by its own function."""


def render_markdown(card: dict) -> str:
    """The card as Markdown, for people: the same facts as the JSON, nothing more, under
    Hugging Face-style YAML front matter (:func:`front_matter`) for model hubs."""
    model = card["model"]
    lines = ["---", *to_yaml(front_matter(card)), "---", "",
             f"# Model card: raysky {model['kind']} {model['version']}"]
    for title, section in _MARKDOWN_SECTIONS:
        lines += ["", f"## {title}", "", *section(card)]
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Known limits", ""]
    lines += [f"- {limit}" for limit in card["limitations"]]
    return "\n".join(lines) + "\n"


def write_card(uri: str, meta: dict) -> dict:
    """Write ``model_card.json`` and ``model_card.md`` for ``meta`` into the checkpoint at
    ``uri`` (local or ``s3://``); returns the card."""
    card = build_card(meta)
    storage.write_bytes(storage.join(uri, CARD_JSON),
                        json.dumps(card, indent=2, default=str).encode())
    storage.write_bytes(storage.join(uri, CARD_MARKDOWN), render_markdown(card).encode())
    return card
