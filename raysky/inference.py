"""The full per-image pipeline shared by batch scoring and the live endpoint.

segment -> suppress background -> classify -> Grad-CAM, on a batch of decoded images of any
sizes, returning masks and heatmaps at each image's original resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raysky.calibration.decision import decide, describe_decision, offsets_vector
from raysky.calibration.ood import OODScorer
from raysky.calibration.referral import refer
from raysky.data.skin_tone import ita_degrees, skin_tone_category
from raysky.data.taxonomy import malignant_indices
from raysky.explain.gradcam import GradCAMExplainer, lesion_focus
from raysky.models.checkpoint import LoadedModel, load_checkpoint
from raysky.models.preprocess import metadata_to_tensors, model_input, resize_map
from raysky.models.runtime import autocast, prepare_for_device, select_device
from raysky.models.segmenter import MASK_THRESHOLD


@dataclass(frozen=True)
class DihedralView:
    """One symmetry of the square: transpose H and W if ``transpose``, then flip ``flips``.

    The dims count from the end, so a view addresses H and W of an NCHW image and of an
    ``[B, h, w]`` map alike. Both models see square inputs, so every view of one is valid.
    """

    transpose: bool
    flips: tuple[int, ...]

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """The view of ``tensor``."""
        if self.transpose:
            tensor = tensor.transpose(-2, -1)
        return tensor.flip(self.flips) if self.flips else tensor

    def undo(self, tensor: torch.Tensor) -> torch.Tensor:
        """Map a view's output back onto the original's pixels (the inverse of :meth:`apply`)."""
        if self.flips:
            tensor = tensor.flip(self.flips)
        return tensor.transpose(-2, -1) if self.transpose else tensor


TTA_VIEWS: tuple[DihedralView, ...] = tuple(
    DihedralView(transpose, flips) for transpose in (False, True)
    for flips in ((), (-1,), (-2,), (-2, -1)))[1:]
"""Test-time views besides the image itself: the other seven elements of the dihedral group.

Dermoscopy has no canonical orientation, and training augments with the same group (flips and
the transpose), so each view is as valid an input as the original. The eight views form a
group, so the averaged answer is the same for an image and any flip or transpose of it."""

logger = logging.getLogger(__name__)


def segment_probabilities(segmenter: torch.nn.Module, meta: dict, images: Sequence[np.ndarray],
                          device: torch.device, precision: str = "fp32",
                          tta: bool = False) -> torch.Tensor:
    """Lesion probabilities at the segmenter's input size, ``[B, h, w]`` float32.

    ``meta`` is the segmenter checkpoint's metadata (input size and normalisation). With
    ``tta`` the other dihedral views (:data:`TTA_VIEWS`) run in the same batch and their maps,
    mapped back, are averaged.
    """
    tensor = model_input(images, meta).to(device)
    views = TTA_VIEWS if tta else ()
    with torch.inference_mode(), autocast(device, precision):
        logits = segmenter(torch.cat([tensor, *(view.apply(tensor) for view in views)]))
    prob = torch.sigmoid(logits.float())[:, 0].split(len(tensor))
    restored = [prob[0], *(view.undo(p) for p, view in zip(prob[1:], views, strict=True))]
    return torch.stack(restored).mean(0)


def lesion_mask_input(probabilities: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[B, h, w]`` lesion probabilities as the classifier's ``[B, 1, *size]`` 0/1 mask."""
    mask = torch.nn.functional.interpolate(probabilities[:, None].float(), size=tuple(size),
                                           mode="bilinear", align_corners=False)
    return (mask > MASK_THRESHOLD).float()


def classifier_outputs(classifier: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor,
                       metadata: dict[str, torch.Tensor], device: torch.device,
                       precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw float32 logits ``[B, C]`` and image features ``[B, D]`` without Grad-CAM.

    The inputs are the classifier's normalised images and 0/1 masks (see
    :func:`lesion_mask_input`); scoring and ``raysky calibrate`` both come through here.
    """
    with torch.inference_mode(), autocast(device, precision):
        full_map, lesion = classifier.encode(image, mask)
        logits, features = classifier.classify_with_features(full_map, lesion, metadata)
    return logits.float(), features.float()


def binary_mask(probabilities: torch.Tensor, height: int, width: int) -> np.ndarray:
    """One ``[h, w]`` probability map resized to ``height x width`` and thresholded, uint8 0/1."""
    return (resize_map(probabilities, height, width) > MASK_THRESHOLD).astype(np.uint8)


@dataclass
class LesionPrediction:
    """Everything raysky says about one image; masks and heatmaps are at the original size."""

    probabilities: np.ndarray  # float32 [C], sums to 1
    # argmax(logits / T + decision offsets) with a calibration that has offsets (balanced
    # accuracy), else the argmax of the probabilities
    predicted_class: str
    malignant_prob: float
    mask: np.ndarray  # uint8 HxW, 0/1
    lesion_area_frac: float
    heatmap: np.ndarray | None  # float32 HxW in [0, 1], None when not explained
    lesion_focus: float  # NaN when not explained or the heatmap is empty
    # None when the classifier checkpoint has no calibration (raysky calibrate adds one)
    refer: bool | None = None  # malignant_prob at or above the referral threshold
    ood_score: float | None = None  # higher: less like the calibration images
    ood: bool | None = None  # ood_score above the threshold (advice, not an error)
    # Skin tone of the skin outside the predicted lesion (raysky.data.skin_tone); None when
    # too little skin is usable or a colour cast makes the angle implausible
    ita_deg: float | None = None
    skin_tone: str | None = None


class LesionPipeline:
    """Segmenter plus classifier plus explainer, on one device, in one precision."""

    def __init__(self, segmenter: LoadedModel, classifier: LoadedModel, use_gpu: bool = False,
                 precision: str = "fp32", tta: bool = False):
        if segmenter.kind != "segmenter" or classifier.kind != "classifier":
            raise ValueError(
                f"expected a segmenter and a classifier checkpoint, got {segmenter.kind} and "
                f"{classifier.kind}; check the order of the segmenter and the classifier"
            )
        self.device = select_device(use_gpu)
        self.precision = precision
        self.tta = tta
        self.segmenter_meta = segmenter.meta
        self.classifier_meta = classifier.meta
        self.segmenter = prepare_for_device(segmenter.model.eval(), self.device)
        self.classifier = prepare_for_device(classifier.model.eval(), self.device)
        self.explainer = GradCAMExplainer(self.classifier)
        self.classes: tuple[str, ...] = classifier.classes
        self.malignant = malignant_indices(self.classes)
        self.vocab = self.classifier.vocab
        self.calibration: dict | None = classifier.meta.get("calibration")
        self.temperature, self.referral_threshold, self.ood_scorer = 1.0, None, None
        self.decision_offsets: np.ndarray | None = None
        if self.calibration:
            self.temperature = float(self.calibration["temperature"])
            self.referral_threshold = float(self.calibration["referral"]["threshold"])
            self.ood_scorer = OODScorer(self.calibration["ood"], self.device)
            self.decision_offsets = offsets_vector(self.calibration.get("decision_offsets"),
                                                   self.classes)
            # Calibrations from before decision offsets score exactly as they did; say so.
            log = logger.info if self.decision_offsets is not None else logger.warning
            log("classifier %s, calibration %s: %s", self.classifier_version,
                self.calibration_version, describe_decision(self.calibration))
        else:
            logger.warning("classifier %s has no calibration: probabilities are uncalibrated and "
                           "refer, ood_score and ood stay null (run raysky calibrate to add one)",
                           self.classifier_version)

    @classmethod
    def from_uris(cls, segmenter_uri: str, classifier_uri: str, use_gpu: bool = False,
                  precision: str = "fp32", tta: bool = False) -> LesionPipeline:
        """Load both checkpoints (local or ``s3://``) and build the pipeline."""
        return cls(load_checkpoint(segmenter_uri, "segmenter"),
                   load_checkpoint(classifier_uri, "classifier"), use_gpu, precision, tta)

    @property
    def segmenter_version(self) -> str:
        """Version id of the segmenter's weights."""
        return self.segmenter_meta["version"]

    @property
    def classifier_version(self) -> str:
        """Version id of the classifier's weights."""
        return self.classifier_meta["version"]

    @property
    def calibration_version(self) -> str | None:
        """Version id of the classifier's calibration, None without one."""
        return self.calibration["version"] if self.calibration else None

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _input(self, images: Sequence[np.ndarray], meta: dict) -> torch.Tensor:
        return model_input(images, meta).to(self.device)

    def segment(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Lesion probabilities at the segmenter's input size, ``[B, h, w]`` float32."""
        return segment_probabilities(self.segmenter, self.segmenter_meta, images, self.device,
                                     self.precision, self.tta)

    def _view_probabilities(self, image: torch.Tensor, mask: torch.Tensor,
                            metadata: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # Grad-CAM explains the original view; the other views only refine the probabilities.
        views = [(view.apply(image), view.apply(mask)) for view in TTA_VIEWS]
        with torch.inference_mode(), self._autocast():
            return [torch.softmax(self.classifier(x, m, metadata).float() / self.temperature,
                                  dim=1) for x, m in views]

    def __call__(self, images: Sequence[np.ndarray], metadata: Sequence[dict] | None = None,
                 explain: bool = True) -> list[LesionPrediction]:
        """Score a batch of RGB uint8 arrays; ``metadata`` holds ``age``/``sex``/``site`` dicts."""
        if not images:
            return []
        seg_prob = self.segment(images)
        cls_input = self._input(images, self.classifier_meta)
        cls_mask = lesion_mask_input(seg_prob, cls_input.shape[-2:])
        meta_tensors = self._metadata_tensors(metadata or [{}] * len(images))
        probs, heatmaps, logits, features = self._classify(cls_input, cls_mask, meta_tensors,
                                                           explain)
        ood_scores = ood_flags = None
        if self.ood_scorer is not None:
            # Scored on the original view, the one Grad-CAM explains.
            ood_scores = self.ood_scorer(features.cpu().numpy(), logits.cpu().numpy(),
                                         images=images)
            ood_flags = self.ood_scorer.flag(ood_scores)
        if self.tta:
            other_views = self._view_probabilities(cls_input, cls_mask, meta_tensors)
            probs = torch.stack([probs.detach().float(), *other_views]).mean(0)
        probs = probs.cpu()
        return [self._prediction(
            image, seg_prob[i], probs[i],
            None if heatmaps is None else heatmaps[i],
            None if ood_scores is None else float(ood_scores[i]),
            None if ood_flags is None else bool(ood_flags[i]),
        ) for i, image in enumerate(images)]

    def _metadata_tensors(self, metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The classifier's metadata inputs; a missing field is encoded as unknown."""
        return metadata_to_tensors(self.vocab.encode_batch(
            [m.get("age") for m in metadata], [m.get("sex") for m in metadata],
            [m.get("site") for m in metadata],
        ), self.device)

    def _classify(self, image: torch.Tensor, mask: torch.Tensor,
                  metadata: dict[str, torch.Tensor], explain: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Calibrated probabilities, Grad-CAM maps (None unless ``explain``), logits, features.

        Grad-CAM needs gradients, so the explaining path must not run under ``no_grad``.
        """
        if explain:
            offsets = (None if self.decision_offsets is None
                       else torch.as_tensor(self.decision_offsets, dtype=torch.float32))
            (probs, heatmaps), logits, features = self.explainer.explain(
                image, mask, metadata, autocast=self._autocast,
                temperature=self.temperature, offsets=offsets)
            return probs, heatmaps, logits, features
        logits, features = classifier_outputs(self.classifier, image, mask, metadata,
                                              self.device, self.precision)
        return torch.softmax(logits / self.temperature, dim=1), None, logits, features

    def _prediction(self, image: np.ndarray, seg_prob: torch.Tensor, probs: torch.Tensor,
                    heatmap_small: torch.Tensor | None, ood_score: float | None,
                    ood: bool | None) -> LesionPrediction:
        """One image's prediction at its own size, from the batch's outputs for it."""
        height, width = image.shape[:2]
        mask = binary_mask(seg_prob, height, width)
        heatmap, focus = None, float("nan")
        if heatmap_small is not None:
            heatmap = np.clip(resize_map(heatmap_small, height, width), 0.0, 1.0)
            focus = float(lesion_focus(torch.from_numpy(heatmap)[None],
                                       torch.from_numpy(mask)[None])[0])
        ita = ita_degrees(image, mask)
        p = probs.numpy().astype(np.float32)
        p = p / p.sum()
        malignant = float(p[self.malignant].sum()) if self.malignant else 0.0
        return LesionPrediction(
            probabilities=p,
            predicted_class=self.classes[self._decide(p)],
            malignant_prob=malignant,
            mask=mask,
            lesion_area_frac=float(mask.mean()),
            heatmap=heatmap,
            lesion_focus=focus,
            refer=(None if self.referral_threshold is None
                   else refer(malignant, self.referral_threshold)),
            ood_score=ood_score,
            ood=ood,
            ita_deg=ita,
            skin_tone=skin_tone_category(ita),
        )

    def _decide(self, probabilities: np.ndarray) -> int:
        """The predicted class index of one calibrated probability row (see :mod:`decision`).

        ``log p`` is ``logits / T`` up to a per-row constant, so this is
        ``argmax(logits / T + offsets)``, and for TTA the same rule on the averaged
        probabilities. Without offsets it is the plain argmax, as before offsets existed.
        """
        if self.decision_offsets is None:
            return int(probabilities.argmax())
        logp = np.log(np.clip(probabilities.astype(np.float64), 1e-30, None))
        return int(decide(logp[None], self.decision_offsets)[0])
