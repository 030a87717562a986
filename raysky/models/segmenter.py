"""Deep-UNet lesion segmenter: timm encoder, ASPP bottleneck, Dual-Attention-Gated decoder."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from raysky.models.blocks import ASPP, ConvBnAct, DualAttentionGate
from raysky.models.config import SegmenterConfig

MASK_THRESHOLD = 0.5
"""A pixel is lesion where the segmenter's sigmoid probability exceeds this: in training's
validation, scoring, serving and the classifier's lesion stream alike."""


class DecoderBlock(nn.Module):
    """Upsample x2, gate the skip with the upsampled decoder state, concatenate and convolve."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 gate_channels: int, reduction: int):
        super().__init__()
        self.gate = (
            DualAttentionGate(skip_channels, in_channels, gate_channels, reduction)
            if skip_channels
            else None
        )
        self.conv = nn.Sequential(
            ConvBnAct(in_channels + skip_channels, out_channels),
            ConvBnAct(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None and self.gate is not None:
            x = torch.cat([x, self.gate(skip, x)], dim=1)
        return self.conv(x)


class DeepUNet(nn.Module):
    """The paper's segmenter; returns a 1-channel logit map at the input resolution.

    Channel bookkeeping: the encoder yields ``len(decoder_channels)`` feature maps at strides
    2..32; the deepest goes through ASPP, and each decoder stage consumes the next-shallower map
    as its gated skip. The last stage has no skip and restores full resolution.
    """

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        self.encoder = timm.create_model(
            config.encoder, pretrained=False, features_only=True, **config.encoder_kwargs
        )
        enc_channels = list(self.encoder.feature_info.channels())
        depth = len(enc_channels)
        if len(config.decoder_channels) != depth:
            raise ValueError(
                f"decoder_channels has {len(config.decoder_channels)} entries but encoder "
                f"{config.encoder!r} yields {depth} feature maps; give one width per stage"
            )
        self.bottleneck = ASPP(enc_channels[-1], config.aspp_channels, config.aspp_rates,
                               config.dropout)
        # Skips, deepest first, excluding the bottleneck's own input; the final stage has none.
        skip_channels = enc_channels[-2::-1] + [0]
        in_channels = [config.aspp_channels, *config.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(cin, cskip, cout, config.gate_channels, config.channel_reduction)
            for cin, cskip, cout in zip(in_channels, skip_channels, config.decoder_channels,
                                        strict=True)
        )
        self.head = nn.Conv2d(config.decoder_channels[-1], 1, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.encoder(image)
        x = self.bottleneck(features[-1])
        skips = features[-2::-1] + [None]
        for block, skip in zip(self.decoder, skips, strict=True):
            x = block(x, skip)
        logits = self.head(x)
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear",
                                   align_corners=False)
        return logits


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE plus soft Dice, the paper's segmentation loss; ``target`` is a 0/1 mask like logits."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    prob = torch.sigmoid(logits.float()).flatten(1)
    flat = target.float().flatten(1)
    dice = (2 * (prob * flat).sum(1) + smooth) / (prob.sum(1) + flat.sum(1) + smooth)
    return bce + (1 - dice).mean()
