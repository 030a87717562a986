"""Run a classifier over labelled images and write its calibrated checkpoint version.

This is the in-process, plain PyTorch side of ``raysky calibrate`` and of the calibration at the
end of classifier training: calibration sets are val-split sized, so Ray is not needed. The
classifier sees its inputs exactly as in scoring (:func:`raysky.inference.classifier_outputs`):
images squashed to its input size, lesion masks from the segmenter
(:func:`raysky.inference.segment_probabilities`) or from ``mask_uri`` (ground truth, or the
segmenter masks a training run saved).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from raysky import storage
from raysky.calibration.fit import check_counts, fit_calibration
from raysky.calibration.gate import GateEncoder
from raysky.calibration.ood import DEFAULT_METHOD, IMAGE_METHODS
from raysky.calibration.referral import DEFAULT_SENSITIVITY
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import load_mask, load_rgb
from raysky.data.records import LesionRecord
from raysky.inference import classifier_outputs, lesion_mask_input, segment_probabilities
from raysky.models.checkpoint import LoadedModel, load_checkpoint, save_calibrated
from raysky.models.preprocess import masks_to_tensor, metadata_to_tensors, model_input
from raysky.models.runtime import select_device

BATCH_SIZE = 16


@dataclass
class LabelledOutputs:
    """Raw logits, image features and label indices of the images that could be read.

    ``groups`` are the lesion ids (image ids where a record has none), for lesion-disjoint
    cross-fitting; ``gate_features`` the OOD gate encoder's features, when asked for.
    """

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    gate_features: np.ndarray | None = None


def labelled_records(records: Sequence[LesionRecord], classes: Sequence[str]) -> list[LesionRecord]:
    """The records whose label is one of the classifier's ``classes``."""
    return [r for r in records if r.label in set(classes)]


def _read(record: LesionRecord, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    image = np.asarray(load_rgb(record.image_uri))
    if not with_mask:
        return image, None
    # No mask reads as an empty one, which the lesion stream treats as "no lesion found".
    mask = load_mask(record.mask_uri) if record.mask_uri else np.zeros(image.shape[:2], np.uint8)
    return image, mask


def collect_outputs(classifier: LoadedModel, records: Sequence[LesionRecord],
                    segmenter: LoadedModel | None = None, batch_size: int = BATCH_SIZE,
                    use_gpu: bool = False, gate=None) -> LabelledOutputs:
    """The classifier's raw logits and image features on ``records`` that carry a label.

    Masks come from ``segmenter`` when given, else from each record's ``mask_uri``. Images that
    cannot be read are skipped and listed in ``skipped`` with the reason. With ``gate`` (a
    :class:`raysky.calibration.gate.GateEncoder`) its features of the same images are
    collected too.
    """
    device = select_device(use_gpu)
    model = classifier.model.eval().to(device)
    seg_model = segmenter.model.eval().to(device) if segmenter is not None else None
    meta, classes = classifier.meta, classifier.classes
    index = {code: i for i, code in enumerate(classes)}
    size = meta["input_size"]
    logits, features, labels, ids, skipped, groups, gated = [], [], [], [], {}, [], []
    todo = labelled_records(records, classes)
    for start in range(0, len(todo), batch_size):
        batch, images, masks = [], [], []
        for record in todo[start:start + batch_size]:
            try:
                image, mask = _read(record, with_mask=seg_model is None)
            except (ImageDecodeError, FileNotFoundError, OSError) as exc:
                skipped[record.image_id] = str(exc)
                continue
            batch.append(record)
            images.append(image)
            masks.append(mask)
        if not batch:
            continue
        if seg_model is not None:
            lesion = segment_probabilities(seg_model, segmenter.meta, images, device)
        else:
            lesion = masks_to_tensor(masks, size)[:, 0].to(device)
        image_t = model_input(images, meta).to(device)
        mask_t = lesion_mask_input(lesion, image_t.shape[-2:])
        metadata = metadata_to_tensors(model.vocab.encode_batch(
            [r.age for r in batch], [r.sex for r in batch], [r.site for r in batch]), device)
        with torch.no_grad():
            out_logits, out_features = classifier_outputs(model, image_t, mask_t, metadata, device)
        if gate is not None:
            gated.append(gate.features(images))
        logits.append(out_logits.cpu().numpy())
        features.append(out_features.cpu().numpy())
        labels.extend(index[r.label] for r in batch)
        ids.extend(r.image_id for r in batch)
        groups.extend(r.lesion_id or r.image_id for r in batch)
    if not ids:
        raise ValueError(f"none of the {len(todo)} labelled images could be read")
    return LabelledOutputs(np.concatenate(logits), np.concatenate(features),
                           np.asarray(labels, dtype=np.int64), ids, skipped, groups,
                           np.concatenate(gated) if gated else None)


def calibrate_checkpoint(classifier_uri: str, records: Sequence[LesionRecord], out_uri: str,
                         fitted_on: dict, target_sensitivity: float = DEFAULT_SENSITIVITY,
                         segmenter_uri: str | None = None, ood_method: str = DEFAULT_METHOD,
                         use_gpu: bool = False) -> dict:
    """Fit a calibration of ``classifier_uri`` on ``records`` and write it to ``out_uri``.

    The labelled counts are checked before any image is read (fewer than 20 malignant or 20
    benign raise :class:`~raysky.calibration.fit.NotEnoughCalibrationData` naming them), and
    again after unreadable images are dropped. Returns the new checkpoint's description;
    ``out_uri`` must differ from ``classifier_uri``, which is left as it was.
    """
    if storage.join(str(out_uri), "") == storage.join(str(classifier_uri), ""):
        raise ValueError("out_uri must differ from classifier_uri: calibration writes a new "
                         "checkpoint version and leaves the original unchanged")
    classifier = load_checkpoint(classifier_uri, "classifier")
    source = str(fitted_on.get("data", "the data"))
    index = {code: i for i, code in enumerate(classifier.classes)}
    check_counts([index[r.label] for r in labelled_records(records, classifier.classes)],
                 classifier.classes, source)
    segmenter = load_checkpoint(segmenter_uri, "segmenter") if segmenter_uri else None
    gate = None
    if ood_method in IMAGE_METHODS:
        gate = GateEncoder(device=select_device(use_gpu))
    outputs = collect_outputs(classifier, records, segmenter, use_gpu=use_gpu, gate=gate)
    if outputs.skipped:
        shown = "; ".join(f"{k}: {v}" for k, v in list(outputs.skipped.items())[:5])
        print(f"calibrate: skipped {len(outputs.skipped)} unreadable image(s): {shown}", flush=True)
    masks = f"segmenter {segmenter.version}" if segmenter else "mask_uri"
    training = classifier.meta.get("extra", {}).get("provenance", {}).get("training_data") or {}
    record = fit_calibration(
        outputs.logits, outputs.features, outputs.labels, classifier.classes,
        {**fitted_on, "masks": masks}, target_sensitivity, ood_method, groups=outputs.groups,
        training_counts=training.get("train_classes"),
        gate=None if gate is None else {"encoder": gate.record, "features": outputs.gate_features})
    return save_calibrated(classifier_uri, out_uri, record)
