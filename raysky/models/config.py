"""Model configurations as data, and the named presets built from them.

Every architectural choice of the two networks is a field here, so a checkpoint's JSON config
is enough to rebuild its model exactly, and presets are just named sets of values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TypeVar

from raysky.data.taxonomy import HAM10000_CLASSES, order_classes

ConfigT = TypeVar("ConfigT")
"""Any configuration dataclass, for :func:`config_from_dict`."""

LESION_BRANCHES: tuple[str, ...] = ("encoder", "shared")
"""Ways to build the classifier's lesion view: its own encoder on the background-suppressed
image (the paper), or the full image's feature map pooled with the lesion mask."""

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
    # None, or "shades_of_gray": see raysky.models.preprocess.COLOR_CONSTANCY
    color_constancy: str | None = None


@dataclass(frozen=True)
class ClassifierConfig:
    """Dual-stream DenseNet with bidirectional cross-attention and a metadata transformer."""

    encoder: str = "densenet201"
    encoder_kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    # The side scoring, serving and calibration run it at (None: input_size). Training's
    # random-resized crops show a lesion larger than a whole frame at the same side shows it,
    # so a somewhat larger side outside training matches what the model learned (FixRes,
    # Touvron et al. 2019). Its pooled features make the network indifferent to the side.
    inference_size: int | None = None
    classes: tuple[str, ...] = HAM10000_CLASSES
    embed_dim: int = 256
    num_heads: int = 8
    fusion_layers: int = 1
    use_lesion_stream: bool = True
    # "encoder": a second encoder on the background-suppressed image (the paper); "shared":
    # the full image's feature map pooled with the mask (see raysky.models.classifier)
    lesion_branch: str = "encoder"
    use_metadata: bool = True
    metadata_layers: int = 2
    metadata_heads: int = 4
    dropout: float = 0.3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_constancy: str | None = None

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.classes)


MIN_INPUT_SIZE = 32
"""The smallest side a classifier runs at: its encoders downsample by 32."""


def inference_size(config: SegmenterConfig | ClassifierConfig) -> int:
    """The side a model runs at outside training: a classifier's ``inference_size`` where
    set, else the ``input_size`` it trained at."""
    return getattr(config, "inference_size", None) or config.input_size


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentations (:mod:`raysky.train.augment`); ``none()`` turns
    them all off.

    Geometry is drawn once per image and applied to the image and its mask alike: a random
    rotation (any angle: dermoscopy has no canonical orientation), a random-resized crop,
    flips and the transpose (with the flips, the whole dihedral group), and with probability
    ``lesion_zoom`` a crop round the lesion's box instead, since archives hold tight crops as
    well as full frames. Colour jitter touches the image only. ``artefacts`` is the chance
    that an image gets one of :mod:`raysky.audit.artefacts`' rulers, ink, bubbles, hairs or
    dark corners, outside the lesion, on every class alike, so none becomes a class cue.
    """

    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (w / h)
    rotation: float = 180.0  # degrees either way
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # fraction of the hue circle either way
    lesion_zoom: float = 0.0  # chance of a crop round the lesion box instead of the image
    zoom_margin: tuple[float, float] = (0.05, 0.5)  # margin round the lesion, x its box side
    artefacts: float = 0.0  # chance of one drawn artefact outside the lesion

    @classmethod
    def none(cls) -> AugmentConfig:
        """A config that leaves images unchanged apart from the final resize."""
        return cls(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0.0, hflip=0.0, vflip=0.0,
                   transpose=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@dataclass(frozen=True)
class Recipe:
    """How a preset fine-tunes one of its models; ``raysky train`` flags override the fields
    in :data:`raysky.train.settings.RECIPE_FIELDS`, the rest is the preset's.

    ``lr`` is the peak AdamW rate of the layers that start from scratch (decoder, fusion,
    heads); pretrained encoders train at ``lr * encoder_lr_scale``, so fine-tuning adapts
    ImageNet features instead of overwriting them in the first steps. The schedule is a
    linear warm-up, then cosine decay. ``ema_decay`` keeps an exponential moving average of
    the weights, which validation and the checkpoints use (0: off).
    ``frozen_blocks`` freezes the encoder's stem and its first N blocks (None: none frozen):
    their ImageNet edges and colours need no fine-tuning, and on a CPU the backward pass
    through their large maps is the costliest part of a step. ``metadata_dropout`` is the
    chance that each of age, sex and site is shown as unknown, and ``metadata_drop_all`` that
    all three are, so the model also learns to classify archives without metadata (the ISIC
    2019 winners dropped fields with p=0.1). ``artefact_consistency`` weighs a loss that asks
    the classifier's prediction on an image with a drawn artefact to agree with its prediction
    on the same view without it (the Jensen-Shannon divergence of the two, as AugMix does;
    0: off): augmentation alone shows artefacts on every class, but does not ask that the
    answer for one image stay the same.
    """

    pretrained_encoder: str = "imagenet"
    epochs: int = 10
    lr: float = 1e-3
    encoder_lr_scale: float = 0.2
    weight_decay: float = 1e-4
    batch_size: int = 16
    label_smoothing: float = 0.0
    class_weight_power: float = 0.5
    ema_decay: float = 0.0
    frozen_blocks: int | None = None
    metadata_dropout: float = 0.0
    metadata_drop_all: float = 0.0
    artefact_consistency: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


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
_RANDOM_INIT = Recipe(pretrained_encoder="none", epochs=2, lr=3e-4, encoder_lr_scale=1.0)

# What every fine-tuning recipe augments with (see AugmentConfig): the dihedral group plus any
# rotation, crops down to a third of the image or round the lesion, mild colour jitter, and
# drawn artefacts outside the lesion.
_FINE_TUNE_AUGMENT = AugmentConfig(scale=(0.35, 1.0), transpose=0.5, hue=0.03,
                                   lesion_zoom=0.2, artefacts=0.4)
_SHADES_OF_GRAY = "shades_of_gray"

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        description="The paper's sizes: EfficientNet-B3 Deep-UNet at 256 px, DenseNet201 x2 at 224 px.",
        segmenter=SegmenterConfig(color_constancy=_SHADES_OF_GRAY),
        classifier=ClassifierConfig(color_constancy=_SHADES_OF_GRAY),
        segmenter_recipe=Recipe(epochs=20, lr=1e-3, encoder_lr_scale=0.2, ema_decay=0.999,
                                augment=_FINE_TUNE_AUGMENT),
        classifier_recipe=Recipe(epochs=30, lr=3e-4, encoder_lr_scale=0.3, label_smoothing=0.1,
                                 ema_decay=0.999, metadata_dropout=0.1, metadata_drop_all=0.3,
                                 augment=_FINE_TUNE_AUGMENT),
    ),
    "lite": Preset(
        name="lite",
        description="EfficientNet-Lite0 from ImageNet: Deep-UNet at 128 px, one encoder with a "
        "mask-pooled lesion view at 160 px; fine-tunes on 2 CPU cores.",
        segmenter=SegmenterConfig(
            encoder="efficientnet_lite0",
            input_size=128,
            decoder_channels=(96, 48, 32, 24, 16),
            aspp_channels=96,
            aspp_rates=(2, 4, 6),
            gate_channels=32,
            color_constancy=_SHADES_OF_GRAY,
        ),
        classifier=ClassifierConfig(
            encoder="efficientnet_lite0",
            input_size=160,
            embed_dim=128,
            num_heads=4,
            metadata_heads=4,
            lesion_branch="shared",
            color_constancy=_SHADES_OF_GRAY,
        ),
        segmenter_recipe=Recipe(epochs=3, lr=1e-3, encoder_lr_scale=0.3, ema_decay=0.995,
                                frozen_blocks=1, augment=_FINE_TUNE_AUGMENT),
        # Loss weights at frequency**-0.25 (at -0.5 the 59 df training images weigh 9x an nv);
        # the decision offsets fitted at calibration do the rest of the balancing. df's val AUC
        # peaks near 0.96 and ends at 0.71-0.75 in every arm and seed: that is one
        # of val's 7 df lesions (3 of its 10 images), which the model comes to call akiec;
        # without it the macro AUC is 0.03-0.04 higher (docs/benchmarks.md, "Quality").
        classifier_recipe=Recipe(epochs=10, lr=1.5e-3, encoder_lr_scale=0.33, batch_size=32,
                                 label_smoothing=0.1, class_weight_power=0.25,
                                 ema_decay=0.998, frozen_blocks=2,
                                 metadata_dropout=0.1, metadata_drop_all=0.3,
                                 augment=_FINE_TUNE_AUGMENT),
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


def config_from_dict(cls: type[ConfigT], data: dict) -> ConfigT:
    """Rebuild a configuration from :func:`config_to_dict` output; unknown keys are an error."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    return cls(**{k: _tuplify(v) for k, v in data.items()})


def recipe_to_dict(recipe: Recipe) -> dict:
    """JSON-ready dict of a recipe (its augmentation nested)."""
    return asdict(recipe)


def recipe_from_dict(data: dict | None) -> Recipe:
    """Rebuild a :class:`Recipe` from :func:`recipe_to_dict` output; ``None`` or ``{}`` is the
    default recipe, and unknown keys are an error."""
    data = dict(data or {})
    augment = config_from_dict(AugmentConfig, data.pop("augment", {}) or {})
    return replace(config_from_dict(Recipe, data), augment=augment)


def classifier_config_for(preset: str, classes, use_metadata: bool = True, **overrides) -> ClassifierConfig:
    """The preset's classifier config with the given classes (canonical order) and overrides."""
    base = get_preset(preset).classifier
    return replace(base, classes=order_classes(classes), use_metadata=use_metadata, **overrides)


def segmenter_config_for(preset: str, **overrides) -> SegmenterConfig:
    """The preset's segmenter config with overrides applied."""
    return replace(get_preset(preset).segmenter, **overrides)
