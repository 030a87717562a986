"""Dual-stream classifier: full image and segmented lesion, fused by cross-attention, plus metadata."""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from torch import nn

from raysky.data.metadata import MetadataVocab
from raysky.models.config import ClassifierConfig
from raysky.models.preprocess import metadata_to_tensors


class ClassifierOutput(NamedTuple):
    """Logits plus each stream's last feature map, which Grad-CAM differentiates against."""

    logits: torch.Tensor
    full_features: torch.Tensor
    lesion_features: torch.Tensor | None


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
    """Two DenseNet encoders (full image, segmented lesion), cross-attention fusion, metadata, head.

    ``forward`` returns logits so the model works with any tooling that expects a classifier;
    :meth:`forward_features` also returns both streams' last feature maps, so Grad-CAM can reuse
    the prediction's own forward pass.
    """

    def __init__(self, config: ClassifierConfig, vocab: MetadataVocab | None = None):
        super().__init__()
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim={config.embed_dim} must be divisible by num_heads={config.num_heads}")
        if config.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(config.classes)}")
        self.config = config
        self.vocab = vocab or MetadataVocab()
        self.full_encoder = self._make_encoder(config)
        channels = self.full_encoder.num_features
        dim = config.embed_dim
        self.full_proj = nn.Linear(channels, dim)
        self.stream_embedding = nn.Parameter(torch.zeros(2, dim))
        # The single-stream variant exists for the paper's ablation: same head, no lesion view.
        self.lesion_encoder = self._make_encoder(config) if config.use_lesion_stream else None
        self.lesion_proj = nn.Linear(channels, dim) if config.use_lesion_stream else None
        self.fusion = (
            BidirectionalFusion(dim, config.num_heads, config.fusion_layers, config.dropout)
            if config.use_lesion_stream
            else None
        )
        self.metadata = (
            MetadataTransformer(self.vocab, dim, config.metadata_heads, config.metadata_layers,
                                config.dropout)
            if config.use_metadata
            else None
        )
        head_in = dim * (1 + int(config.use_lesion_stream) + int(config.use_metadata))
        self.head = nn.Sequential(nn.LayerNorm(head_in), nn.Dropout(config.dropout),
                                  nn.Linear(head_in, config.num_classes))

    @staticmethod
    def _make_encoder(config: ClassifierConfig) -> nn.Module:
        return timm.create_model(config.encoder, pretrained=False, num_classes=0, global_pool="",
                                 **config.encoder_kwargs)

    def _tokens(self, fmap: torch.Tensor, proj: nn.Linear, stream: int) -> torch.Tensor:
        return proj(fmap.flatten(2).transpose(1, 2)) + self.stream_embedding[stream].to(fmap.dtype)

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both streams' last feature maps: the full image and the background-suppressed lesion.

        The lesion map is ``None`` for the single-stream ablation.
        """
        full_map = self.full_encoder.forward_features(image)
        if self.lesion_encoder is None:
            return full_map, None
        lesion_map = self.lesion_encoder.forward_features(suppress_background(image, mask))
        return full_map, lesion_map

    def classify(self, full_map: torch.Tensor, lesion_map: torch.Tensor | None,
                 metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from the feature maps (cross-attention fusion, metadata, head)."""
        return self.classify_with_features(full_map, lesion_map, metadata)[0]

    def classify_with_features(self, full_map: torch.Tensor, lesion_map: torch.Tensor | None,
                               metadata: dict[str, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the image feature: the full-image stream's pooled tokens after fusion.

        The image feature (``[B, embed_dim]``) is what out-of-distribution detection measures
        (:mod:`raysky.calibration.ood`): it has seen the lesion stream through cross-attention,
        but not the metadata, which says nothing about whether the picture is dermoscopy.
        """
        full = self._tokens(full_map, self.full_proj, 0)
        if self.fusion is None or lesion_map is None:
            pooled = [full.mean(1)]
        else:
            full, lesion = self.fusion(full, self._tokens(lesion_map, self.lesion_proj, 1))
            pooled = [full.mean(1), lesion.mean(1)]
        if self.metadata is not None:
            batch = full_map.shape[0]
            if metadata is None:
                unknown = self.vocab.encode_batch([None] * batch, [None] * batch, [None] * batch)
                metadata = metadata_to_tensors(unknown, full_map.device)
            metadata = {k: v.to(full_map.device) for k, v in metadata.items()}
            meta = self.metadata(metadata["age"], metadata["sex"], metadata["site"])
            pooled.append(meta.to(full.dtype))
        return self.head(torch.cat(pooled, dim=1)), pooled[0]

    def forward_features(self, image: torch.Tensor, mask: torch.Tensor,
                         metadata: dict[str, torch.Tensor] | None = None) -> ClassifierOutput:
        """Logits plus both feature maps; ``metadata`` is :func:`metadata_to_tensors` output."""
        full_map, lesion_map = self.encode(image, mask)
        return ClassifierOutput(self.classify(full_map, lesion_map, metadata), full_map, lesion_map)

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward_features(image, mask, metadata).logits
