"""Small named building blocks shared by the segmenter and the classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnAct(nn.Sequential):
    """Conv2d, BatchNorm and ReLU: the unit every decoder and attention block is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: parallel dilated convs at several rates plus image pooling.

    It widens the bottleneck's receptive field so the decoder sees both the lesion and the
    surrounding skin, which is what separates a lesion border from a hair or a vignette.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...],
                 dropout: float = 0.1):
        super().__init__()
        if not rates:
            raise ValueError("ASPP needs at least one atrous rate, e.g. aspp_rates=(6, 12, 18)")
        self.branches = nn.ModuleList(
            [ConvBnAct(in_channels, out_channels, kernel_size=1)]
            + [ConvBnAct(in_channels, out_channels, kernel_size=3, dilation=r) for r in rates]
        )
        # BatchNorm is left out of the pooled branch: it sees a 1x1 map, whose batch statistics
        # are meaningless at batch size 1.
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            ConvBnAct(out_channels * (len(rates) + 2), out_channels, kernel_size=1),
            nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class ChannelAttention(nn.Module):
    """CBAM-style channel attention: a shared MLP over average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + peak)


class DualAttentionGate(nn.Module):
    """Gate a skip connection by decoder-driven spatial attention combined with channel attention.

    The spatial part is the additive attention gate of Attention U-Net: the decoder's gating
    signal ``g`` and the skip ``x`` are projected to ``gate_channels``, summed, and squeezed to a
    per-pixel weight in (0, 1). The channel part re-weights the skip's channels. Their product
    lets the decoder keep only lesion-relevant skip features, which suppresses hair, rulers and
    vignetting that a plain U-Net copies through.
    """

    def __init__(self, skip_channels: int, gating_channels: int, gate_channels: int,
                 reduction: int = 8):
        super().__init__()
        self.theta_skip = nn.Sequential(
            nn.Conv2d(skip_channels, gate_channels, 1, bias=False), nn.BatchNorm2d(gate_channels)
        )
        self.phi_gate = nn.Sequential(
            nn.Conv2d(gating_channels, gate_channels, 1, bias=False), nn.BatchNorm2d(gate_channels)
        )
        self.psi = nn.Sequential(nn.Conv2d(gate_channels, 1, 1), nn.Sigmoid())
        self.channel = ChannelAttention(skip_channels, reduction)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if gate.shape[-2:] != skip.shape[-2:]:
            gate = F.interpolate(gate, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        spatial = self.psi(F.relu(self.theta_skip(skip) + self.phi_gate(gate)))
        return skip * spatial * self.channel(skip)
