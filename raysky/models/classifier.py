"""Dual-stream classifier: full image and segmented lesion, fused by cross-attention, plus metadata.

The lesion view comes in two forms (``ClassifierConfig.lesion_branch``):

* ``encoder`` (the paper): a second encoder with its own weights sees the image with the
  background suppressed by the mask. Twice the encoder compute, so half the epochs on a fixed
  budget.
* ``shared``: the lesion view reuses the full image's feature map, pooled with the mask as
  weights (one lesion token), so the two views cost one encoder. Background-suppressed input is
  what the literature finds harmful in distribution (Mahbod et al. 2020), while mask-weighted
  pooling keeps the lesion in the decision at almost no cost; ``benchmarks/quality.py``
  compares the two at equal wall time.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from torch import nn

from raysky.data.metadata import MetadataVocab
from raysky.models.config import LESION_BRANCHES, MIN_INPUT_SIZE, ClassifierConfig
from raysky.models.preprocess import metadata_to_tensors


class ClassifierOutput(NamedTuple):
    """Logits plus the feature maps Grad-CAM differentiates against.

    ``lesion_features`` is the lesion encoder's map for the paper's ``encoder`` branch; for
    the ``shared`` branch and the single-stream ablation it is ``None``: there, every
    gradient reaches the one full-image map.
    """

    logits: torch.Tensor
    full_features: torch.Tensor
    lesion_features: torch.Tensor | None


def lesion_weights(mask: torch.Tensor, size: tuple[int, int], min_area: float = 0.01) -> torch.Tensor:
    """The lesion mask as pooling weights ``[B, 1, h, w]`` at a feature map's resolution.

    Area interpolation gives each feature cell the share of its pixels inside the lesion, so
    a lesion smaller than a cell still counts. A mask covering under ``min_area`` of the image
    (the segmenter found nothing) becomes uniform weights: the lesion view is then the whole
    image, as :func:`suppress_background` does for the encoder branch.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.float()
    empty = mask.flatten(1).mean(1) < min_area
    weights = nn.functional.interpolate(mask, size=size, mode="area")
    return torch.where(empty[:, None, None, None], torch.ones_like(weights), weights)


def weighted_pool(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` ``[B, N, D]`` weighted by ``weights`` ``[B, 1, h, w]`` (N = h * w)."""
    w = weights.flatten(1).to(tokens.dtype)
    return (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)


def suppress_background(image: torch.Tensor, mask: torch.Tensor, min_area: float = 0.01) -> torch.Tensor:
    """The lesion stream's input: the normalised image with everything outside ``mask`` zeroed.

    Zero in normalised space is the dataset's mean colour, so the background carries no signal.
    A mask covering under ``min_area`` of the image (the segmenter found nothing) would leave
    the lesion stream blind, so such images pass through unmasked instead.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(image.dtype)
    if mask.shape[-2:] != image.shape[-2:]:
        mask = nn.functional.interpolate(mask, size=image.shape[-2:], mode="nearest")
    empty = mask.flatten(1).mean(1) < min_area
    mask = torch.where(empty[:, None, None, None], torch.ones_like(mask), mask)
    return image * mask


class CrossAttentionBlock(nn.Module):
    """Pre-norm multi-head cross-attention (queries from one stream, keys/values from the other)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim * 2, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        attended, _ = self.attn(self.norm_q(queries), kv, kv, need_weights=False)
        x = queries + attended
        return x + self.ff(self.norm_ff(x))


class BidirectionalFusion(nn.Module):
    """Each stream attends to the other, ``layers`` times, with separate weights per direction."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.full_to_lesion = nn.ModuleList(CrossAttentionBlock(dim, heads, dropout) for _ in range(layers))
        self.lesion_to_full = nn.ModuleList(CrossAttentionBlock(dim, heads, dropout) for _ in range(layers))

    def forward(self, full: torch.Tensor, lesion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for f2l, l2f in zip(self.full_to_lesion, self.lesion_to_full, strict=True):
            full, lesion = f2l(full, lesion), l2f(lesion, full)
        return full, lesion


class MetadataTransformer(nn.Module):
    """A small transformer encoder over [CLS, age, sex, site] tokens; returns the CLS embedding."""

    def __init__(self, vocab: MetadataVocab, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.age = nn.Linear(2, dim)  # normalised age and its missing flag
        self.sex = nn.Embedding(len(vocab.sex), dim)
        self.site = nn.Embedding(len(vocab.site), dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.field_embedding = nn.Parameter(torch.zeros(1, 4, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.field_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim * 2, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([self.age(age.float()), self.sex(sex), self.site(site)], dim=1)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        x = torch.cat([cls, tokens], dim=1) + self.field_embedding.to(tokens.dtype)
        return self.norm(self.encoder(x)[:, 0])


class DualStreamClassifier(nn.Module):
    """Full-image and lesion views fused by cross-attention, metadata, and a linear head.

    The lesion view is a second encoder (``lesion_branch="encoder"``, the paper) or the full
    image's own feature map pooled with the mask (``"shared"``); ``use_lesion_stream=False``
    is the single-stream ablation. ``forward`` returns logits so the model works with any
    tooling that expects a classifier; :meth:`forward_features` also returns the feature maps,
    so Grad-CAM can reuse the prediction's own forward pass.
    """

    def __init__(self, config: ClassifierConfig, vocab: MetadataVocab | None = None):
        super().__init__()
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim={config.embed_dim} must be divisible by num_heads={config.num_heads}")
        if config.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(config.classes)}")
        if config.lesion_branch not in LESION_BRANCHES:
            raise ValueError(f"lesion_branch={config.lesion_branch!r}; choose one of "
                             f"{', '.join(LESION_BRANCHES)}")
        if config.inference_size is not None and config.inference_size < MIN_INPUT_SIZE:
            raise ValueError(f"inference_size={config.inference_size} is too small for the "
                             f"encoder's {MIN_INPUT_SIZE}x downsampling; give at least "
                             f"{MIN_INPUT_SIZE}, or None to run at input_size")
        self.config = config
        self.vocab = vocab or MetadataVocab()
        self.full_encoder = self._make_encoder(config)
        channels = self.full_encoder.num_features
        dim = config.embed_dim
        self.full_proj = nn.Linear(channels, dim)
        self.stream_embedding = nn.Parameter(torch.zeros(2, dim))
        lesion = config.use_lesion_stream
        own_encoder = lesion and config.lesion_branch == "encoder"
        self.lesion_encoder = self._make_encoder(config) if own_encoder else None
        self.lesion_proj = nn.Linear(channels, dim) if own_encoder else None
        self.fusion = (BidirectionalFusion(dim, config.num_heads, config.fusion_layers,
                                           config.dropout) if lesion else None)
        self.metadata = (
            MetadataTransformer(self.vocab, dim, config.metadata_heads, config.metadata_layers,
                                config.dropout)
            if config.use_metadata
            else None
        )
        head_in = dim * (1 + int(lesion) + int(config.use_metadata))
        self.head = nn.Sequential(nn.LayerNorm(head_in), nn.Dropout(config.dropout),
                                  nn.Linear(head_in, config.num_classes))

    @staticmethod
    def _make_encoder(config: ClassifierConfig) -> nn.Module:
        return timm.create_model(config.encoder, pretrained=False, num_classes=0, global_pool="",
                                 **config.encoder_kwargs)

    @property
    def shares_encoder(self) -> bool:
        """Whether the lesion view is pooled from the full image's feature map."""
        return self.config.use_lesion_stream and self.config.lesion_branch == "shared"

    def _tokens(self, fmap: torch.Tensor, proj: nn.Linear, stream: int) -> torch.Tensor:
        return proj(fmap.flatten(2).transpose(1, 2)) + self.stream_embedding[stream].to(fmap.dtype)

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full image's feature map and what the lesion view is built from.

        The second item is the lesion encoder's map of the background-suppressed image
        (``encoder`` branch), the mask as pooling weights at the feature map's resolution
        (``shared`` branch; not a feature map, so Grad-CAM leaves it alone), or ``None`` for the
        single-stream ablation.
        """
        full_map = self.full_encoder.forward_features(image)
        if not self.config.use_lesion_stream:
            return full_map, None
        if self.shares_encoder:
            return full_map, lesion_weights(mask, tuple(full_map.shape[-2:]))
        lesion_map = self.lesion_encoder.forward_features(suppress_background(image, mask))
        return full_map, lesion_map

    def classify(self, full_map: torch.Tensor, lesion: torch.Tensor | None,
                 metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from :meth:`encode`'s output (cross-attention fusion, metadata, head)."""
        return self.classify_with_features(full_map, lesion, metadata)[0]

    def _lesion_tokens(self, full: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
        if self.shares_encoder:
            pooled = weighted_pool(full - self.stream_embedding[0].to(full.dtype), lesion)
            return pooled[:, None] + self.stream_embedding[1].to(full.dtype)
        return self._tokens(lesion, self.lesion_proj, 1)

    def classify_with_features(self, full_map: torch.Tensor, lesion: torch.Tensor | None,
                               metadata: dict[str, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the image feature: the full-image view's pooled tokens after fusion.

        The image feature (``[B, embed_dim]``) is what out-of-distribution detection measures
        (:mod:`raysky.calibration.ood`): it has seen the lesion view through cross-attention,
        but not the metadata, which says nothing about whether the picture is dermoscopy.
        """
        full = self._tokens(full_map, self.full_proj, 0)
        if self.fusion is None or lesion is None:
            pooled = [full.mean(1)]
        else:
            full, lesion_tokens = self.fusion(full, self._lesion_tokens(full, lesion))
            pooled = [full.mean(1), lesion_tokens.mean(1)]
        if self.metadata is not None:
            pooled.append(self._metadata_embedding(full_map, metadata).to(full.dtype))
        return self.head(torch.cat(pooled, dim=1)), pooled[0]

    def _metadata_embedding(self, full_map: torch.Tensor,
                            metadata: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if metadata is None:
            batch = full_map.shape[0]
            unknown = self.vocab.encode_batch([None] * batch, [None] * batch, [None] * batch)
            metadata = metadata_to_tensors(unknown, full_map.device)
        metadata = {k: v.to(full_map.device) for k, v in metadata.items()}
        return self.metadata(metadata["age"], metadata["sex"], metadata["site"])

    def forward_features(self, image: torch.Tensor, mask: torch.Tensor,
                         metadata: dict[str, torch.Tensor] | None = None) -> ClassifierOutput:
        """Logits plus the feature maps; ``metadata`` is :func:`metadata_to_tensors` output."""
        full_map, lesion = self.encode(image, mask)
        lesion_map = None if self.shares_encoder else lesion
        return ClassifierOutput(self.classify(full_map, lesion, metadata), full_map, lesion_map)

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward_features(image, mask, metadata).logits
