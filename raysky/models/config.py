"""Model configurations as data, and the named presets built from them.

Every architectural choice of the two networks is a field here, so a checkpoint's JSON config
is enough to rebuild its model exactly, and presets are just named sets of values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from raysky.data.taxonomy import HAM10000_CLASSES, order_classes

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegmenterConfig:
    """Deep-UNet: timm encoder, ASPP bottleneck, Dual-Attention-Gated skips, 1-channel head."""

    encoder: str = "efficientnet_b3"
    encoder_kwargs: dict = field(default_factory=dict)
    input_size: int = 256
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    aspp_channels: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    gate_channels: int = 64
    channel_reduction: int = 8
    dropout: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ClassifierConfig:
    """Dual-stream DenseNet with bidirectional cross-attention and a metadata transformer."""

    encoder: str = "densenet201"
    encoder_kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    classes: tuple[str, ...] = HAM10000_CLASSES
    embed_dim: int = 256
    num_heads: int = 8
    fusion_layers: int = 1
    use_lesion_stream: bool = True
    use_metadata: bool = True
    metadata_layers: int = 2
    metadata_heads: int = 4
    dropout: float = 0.3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.classes)


@dataclass(frozen=True)
class Recipe:
    """How a preset fine-tunes one of its models; ``raysky train`` flags override each field.

    ``lr`` is the peak AdamW rate of the layers that start from scratch (decoder, fusion,
    heads); pretrained encoders train at ``lr * encoder_lr_scale``, so fine-tuning adapts
    ImageNet features instead of overwriting them in the first steps. The schedule is a
    linear warm-up over at most one epoch, then cosine decay.
    """

    pretrained_encoder: str = "imagenet"
    lr: float = 1e-3
    encoder_lr_scale: float = 0.2
    weight_decay: float = 1e-4
    batch_size: int = 16
    label_smoothing: float = 0.0
    class_weight_power: float = 0.5


@dataclass(frozen=True)
class Preset:
    """A named pair of segmenter and classifier configurations, and how to train each."""

    name: str
    segmenter: SegmenterConfig
    classifier: ClassifierConfig
    description: str = ""
    segmenter_recipe: Recipe = field(default_factory=Recipe)
    classifier_recipe: Recipe = field(default_factory=Recipe)

    def recipe(self, kind: str) -> Recipe:
        """The recipe for ``segmenter`` or ``classifier``."""
        if kind not in ("segmenter", "classifier"):
            raise ValueError(f"kind must be segmenter or classifier, got {kind!r}")
        return self.segmenter_recipe if kind == "segmenter" else self.classifier_recipe


def encoder_label(config: SegmenterConfig | ClassifierConfig) -> str:
    """The encoder's timm name, with its overrides when they change the architecture."""
    if not config.encoder_kwargs:
        return config.encoder
    family = config.encoder.rstrip("0123456789")
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(config.encoder_kwargs.items()))
    return f"custom {family}({overrides})"


# A DenseNet with thin, short blocks: the paper's DenseNet code path at a size tests can run.
_TINY_DENSENET = {"growth_rate": 8, "block_config": (2, 2, 2, 2)}
_RANDOM_INIT = Recipe(pretrained_encoder="none", lr=3e-4, encoder_lr_scale=1.0)

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        description="The paper's sizes: EfficientNet-B3 Deep-UNet at 256 px, DenseNet201 x2 at 224 px.",
        segmenter=SegmenterConfig(),
        classifier=ClassifierConfig(),
        segmenter_recipe=Recipe(lr=1e-3, encoder_lr_scale=0.2),
        classifier_recipe=Recipe(lr=3e-4, encoder_lr_scale=0.3, label_smoothing=0.1),
    ),
    "lite": Preset(
        name="lite",
        description="The paper's topology on ImageNet EfficientNet-Lite0 encoders at 128 px: "
        "fine-tunes on 2 CPU cores.",
        segmenter=SegmenterConfig(
            encoder="efficientnet_lite0",
            input_size=128,
            decoder_channels=(96, 48, 32, 24, 16),
            aspp_channels=96,
            aspp_rates=(2, 4, 6),
            gate_channels=32,
        ),
        classifier=ClassifierConfig(
            encoder="efficientnet_lite0",
            input_size=128,
            embed_dim=128,
            num_heads=4,
            metadata_heads=4,
        ),
        segmenter_recipe=Recipe(lr=1e-3, encoder_lr_scale=0.3),
        classifier_recipe=Recipe(lr=1e-3, encoder_lr_scale=0.2, label_smoothing=0.1),
    ),
    "tiny": Preset(
        name="tiny",
        description="Minimal widths at 64 px, random weights, for tests; the paper's code paths.",
        segmenter=SegmenterConfig(
            encoder="test_efficientnet",
            input_size=64,
            decoder_channels=(32, 16, 16, 8, 8),
            aspp_channels=32,
            aspp_rates=(1, 2, 3),
            gate_channels=8,
            channel_reduction=4,
            dropout=0.0,
        ),
        classifier=ClassifierConfig(
            encoder="densenet121",
            encoder_kwargs=_TINY_DENSENET,
            input_size=64,
            embed_dim=32,
            num_heads=4,
            metadata_layers=1,
            metadata_heads=2,
            dropout=0.0,
        ),
        segmenter_recipe=_RANDOM_INIT,
        classifier_recipe=_RANDOM_INIT,
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name; the error lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    return value


def config_to_dict(config: SegmenterConfig | ClassifierConfig) -> dict:
    """JSON-ready dict of a configuration."""
    return asdict(config)


def config_from_dict(cls: type, data: dict):
    """Rebuild a configuration from :func:`config_to_dict` output; unknown keys are an error."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    return cls(**{k: _tuplify(v) for k, v in data.items()})


def classifier_config_for(preset: str, classes, use_metadata: bool = True, **overrides) -> ClassifierConfig:
    """The preset's classifier config with the given classes (canonical order) and overrides."""
    base = get_preset(preset).classifier
    return replace(base, classes=order_classes(classes), use_metadata=use_metadata, **overrides)


def segmenter_config_for(preset: str, **overrides) -> SegmenterConfig:
    """The preset's segmenter config with overrides applied."""
    return replace(get_preset(preset).segmenter, **overrides)
