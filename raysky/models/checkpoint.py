"""One self-describing checkpoint format for both models, on local disk or S3.

A checkpoint is a directory (or S3 prefix) holding ``model.safetensors`` and ``config.json``.
The JSON carries everything needed to rebuild and use the model without the code that trained
it guessing: kind, preset, full architecture config, classes, input size, normalisation,
metadata vocabulary, and a version id derived from the weights' bytes, so two checkpoints with
the same version are bit-identical. ``weights_sha256`` holds the weights' full SHA-256, and every
load checks the weights against it (or, for checkpoints written before it existed, against the
12 hex digits in ``version``), so a truncated or swapped weights file is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from raysky import __version__, storage
from raysky.data.metadata import MetadataVocab
from raysky.models.card import SECTIONS, write_card
from raysky.models.classifier import DualStreamClassifier
from raysky.models.config import (
    ClassifierConfig,
    SegmenterConfig,
    config_from_dict,
    config_to_dict,
    inference_size,
)
from raysky.models.runtime import unwrap_ddp
from raysky.models.segmenter import DeepUNet

FORMAT = "raysky-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, with its JSON description."""

    model: nn.Module
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``segmenter`` or ``classifier``."""
        return self.meta["kind"]

    @property
    def version(self) -> str:
        """Version id derived from the weights."""
        return self.meta["version"]

    @property
    def classes(self) -> tuple[str, ...]:
        """Class codes in logit order (classifiers only; empty for segmenters)."""
        return tuple(self.meta.get("classes", ()))


def model_kind(model: nn.Module) -> str:
    """Name the kind of a raysky model; anything else is a ``TypeError``."""
    model = unwrap_ddp(model)
    if isinstance(model, DeepUNet):
        return "segmenter"
    if isinstance(model, DualStreamClassifier):
        return "classifier"
    raise TypeError(f"not a raysky model: {type(model).__name__}")


def serialize_weights(model: nn.Module) -> bytes:
    """Weights as safetensors bytes (contiguous CPU tensors, so channels_last models work too)."""
    model = unwrap_ddp(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(state)


def weights_version(weights: bytes, kind: str) -> str:
    """A short content hash of the weights, prefixed by kind (e.g. ``seg-3fa2c1d09e4b``)."""
    return f"{kind[:3]}-{hashlib.sha256(weights).hexdigest()[:12]}"


def describe(model: nn.Module, preset: str, weights: bytes, extra: dict | None = None) -> dict:
    """Build the checkpoint's JSON description for ``model`` and its serialized weights."""
    inner = unwrap_ddp(model)
    kind = model_kind(inner)
    config = inner.config
    meta = {
        "format": FORMAT,
        "kind": kind,
        "preset": preset,
        "config": config_to_dict(config),
        # What scoring, serving and calibration resize to; training's side is the config's.
        "input_size": inference_size(config),
        "normalization": {"mean": list(config.mean), "std": list(config.std),
                          "color_constancy": config.color_constancy},
        "version": weights_version(weights, kind),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "raysky_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Recorded here, where the model is at hand, so the card never rebuilds one to count it.
    meta["parameters"] = count_parameters(inner)
    if kind == "classifier":
        meta["classes"] = list(config.classes)
        meta["metadata_vocab"] = inner.vocab.to_dict()
    if extra:
        meta["extra"] = extra
    return meta


def save_checkpoint(model: nn.Module, uri: str, preset: str, extra: dict | None = None) -> dict:
    """Write ``model`` as a checkpoint directory at ``uri`` and return its JSON description."""
    weights = serialize_weights(model)
    meta = describe(model, preset, weights, extra)
    storage.makedirs(uri)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(meta, indent=2).encode())
    write_card(uri, meta)
    return meta


def read_checkpoint_meta(uri: str, expected_kind: str | None = None) -> dict:
    """Read only a checkpoint's ``config.json``; errors name the URI and what is wrong.

    ``expected_kind`` (``segmenter`` or ``classifier``) guards against swapped arguments: a
    checkpoint of the other kind is a ``ValueError`` that says which it is.
    """
    config_uri = storage.join(uri, CONFIG_FILE)
    try:
        meta = json.loads(storage.read_bytes(config_uri))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: not a raysky checkpoint (no {CONFIG_FILE})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_uri}: invalid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_uri}: unsupported checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    if expected_kind and meta.get("kind") != expected_kind:
        raise ValueError(f"{uri}: is a {meta.get('kind')} checkpoint, but a {expected_kind} was "
                         "expected")
    return meta


def build_from_meta(meta: dict) -> nn.Module:
    """Construct an untrained model with the architecture a checkpoint describes."""
    if meta["kind"] == "segmenter":
        return DeepUNet(config_from_dict(SegmenterConfig, meta["config"]))
    if meta["kind"] == "classifier":
        vocab = MetadataVocab.from_dict(meta["metadata_vocab"])
        return DualStreamClassifier(config_from_dict(ClassifierConfig, meta["config"]), vocab)
    raise ValueError(f"unknown checkpoint kind {meta['kind']!r}")


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters."""
    return sum(p.numel() for p in model.parameters())


def with_parameters(meta: dict, model: nn.Module | None = None) -> dict:
    """``meta`` with its ``parameters`` count: checkpoints saved before it was recorded get it
    from ``model`` or, without one, from the architecture they describe (no weights are read);
    None where that cannot be built. Their cards then read as they always have."""
    if "parameters" in meta:
        return meta
    try:
        count = count_parameters(model if model is not None else build_from_meta(meta))
    except (KeyError, TypeError, ValueError):
        count = None
    return {**meta, "parameters": count}


class CheckpointIntegrityError(ValueError):
    """The weights of a checkpoint do not match the hash its ``config.json`` records."""


def verify_weights(uri: str, meta: dict, weights: bytes) -> None:
    """Raise :class:`CheckpointIntegrityError` naming ``uri`` unless ``weights`` match ``meta``.

    The full ``weights_sha256`` is compared when the checkpoint has it; older checkpoints only
    carry the 12-hex-digit prefix inside ``version`` (``seg-3fa2c1d09e4b``), which is compared
    instead. A checkpoint with neither cannot be verified and is refused too.
    """
    digest = hashlib.sha256(weights).hexdigest()
    expected = meta.get("weights_sha256")
    if expected is None:
        _kind, _, expected = str(meta.get("version", "")).rpartition("-")
        if len(expected) != 12:
            raise CheckpointIntegrityError(
                f"{uri}: cannot verify the weights: {CONFIG_FILE} has no weights_sha256 and no "
                f"hash in its version {meta.get('version')!r}")
    if not digest.startswith(str(expected).lower()):
        raise CheckpointIntegrityError(
            f"{uri}: {WEIGHTS_FILE} does not match {CONFIG_FILE} (sha256 {digest[:12]}..., "
            f"expected {str(expected)[:12]}..., {len(weights)} bytes): the weights file is "
            "truncated, damaged or from another checkpoint")


def load_checkpoint(uri: str, expected_kind: str | None = None) -> LoadedModel:
    """Load a checkpoint from a local path or ``s3://`` URI, in eval mode on the CPU.

    ``expected_kind`` guards against swapped ``--segmenter``/``--classifier`` arguments. The
    weights are verified against the hash in ``config.json`` before they are used (see
    :func:`verify_weights`); a mismatch is a :class:`CheckpointIntegrityError`.
    """
    meta = read_checkpoint_meta(uri, expected_kind)
    model = build_from_meta(meta)
    weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    verify_weights(uri, meta, weights)
    model.load_state_dict(load_safetensors(weights))
    return LoadedModel(model=model.eval(), meta=with_parameters(meta, model))


def save_version(source_uri: str, target_uri: str, updates: dict) -> dict:
    """Write a new version of the checkpoint at ``source_uri`` to ``target_uri``.

    The weights are copied byte for byte (verified first), so ``version`` and
    ``weights_sha256`` stay those of the weights; ``config.json`` gains ``updates`` (a
    calibration, card sections) and ``derived_from``/``derived_at``, and the model card is
    written for the new description. ``target_uri`` must differ from ``source_uri``, which is
    left as it was. Returns the new description.
    """
    if storage.join(str(target_uri), "") == storage.join(str(source_uri), ""):
        raise ValueError(f"{target_uri}: a new checkpoint version needs its own location; give "
                         "an output that differs from the checkpoint it comes from")
    meta = with_parameters(read_checkpoint_meta(source_uri))
    weights = storage.read_bytes(storage.join(source_uri, WEIGHTS_FILE))
    verify_weights(source_uri, meta, weights)
    meta = {**meta, **updates, "derived_from": str(source_uri),
            "derived_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.makedirs(target_uri)
    storage.write_bytes(storage.join(target_uri, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(target_uri, CONFIG_FILE), json.dumps(meta, indent=2).encode())
    write_card(target_uri, meta)
    return meta


def save_calibrated(source_uri: str, target_uri: str, calibration: dict) -> dict:
    """Write a new version of the checkpoint at ``source_uri`` to ``target_uri``, calibrated.

    See :func:`save_version`: ``config.json`` gains ``calibration`` (whose own ``version``
    identifies it, see :mod:`raysky.calibration`) and ``calibrated_from``, and the card its
    calibration section. Returns the new description.
    """
    read_checkpoint_meta(source_uri, "classifier")
    return save_version(source_uri, target_uri, {
        "calibration": calibration, "calibrated_from": str(source_uri),
        "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def update_card(source_uri: str, target_uri: str, sections: dict[str, dict]) -> dict:
    """Write a new version of the checkpoint at ``source_uri`` to ``target_uri`` whose card
    gains (or replaces) ``sections`` (names from :data:`SECTIONS`); returns the new
    ``config.json``.

    The weights are copied byte for byte after their sha256 is verified, so the new version
    has the same ``version`` and ``weights_sha256``; ``target_uri`` must differ from
    ``source_uri``, which is left unchanged.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown card section(s) {', '.join(unknown)}; expected "
                         f"{', '.join(SECTIONS)}")
    card = {**read_checkpoint_meta(source_uri).get("card", {}), **sections}
    return save_version(source_uri, target_uri, {"card": card})
