"""A small U-Net for dense prediction, up-sampling three ways (tests and benchmarks of issue 16).

Three encoder levels and a bottleneck, each halving the resolution; the decoder goes back up one level at a
time with a different up-sampler per level, and concatenates the encoder's feature map of that resolution
(the skip connection) before two convolutions::

    x (3, H)  -> enc0 (w, H) ----------------------------------------------- cat -> dec0 (w, H) -> head
              -> pool -> enc1 (2w, H/2) --------------------- cat -> dec1 (2w) --^ interpolate x2 (bilinear)
              -> pool -> enc2 (4w, H/4) ----- cat -> dec2 (4w) --^ conv 1x1 to 8w, pixel_shuffle(2)
              -> pool -> mid (8w, H/8) --^ ConvTranspose2d(8w, 4w, 2, stride 2)

The output is per-pixel logits ``(N, classes, H, W)``; ``H`` and ``W`` must be multiples of 8.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet"]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers (the U-Net block)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class UNet(nn.Module):
    """U-Net with ``ConvTranspose2d``, ``pixel_shuffle`` and bilinear ``interpolate`` up-sampling and
    concat skips (see the module docstring); ``width`` is the first level's channel count."""

    def __init__(self, in_channels: int = 3, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc0 = _double_conv(in_channels, w)
        self.enc1 = _double_conv(w, 2 * w)
        self.enc2 = _double_conv(2 * w, 4 * w)
        self.mid = _double_conv(4 * w, 8 * w)
        self.up2 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec2 = _double_conv(8 * w, 4 * w)
        self.up1 = nn.Conv2d(4 * w, 8 * w, 1)  # 4 blocks of r*r = 4 channels per output channel
        self.shuffle = nn.PixelShuffle(2)
        self.dec1 = _double_conv(4 * w, 2 * w)
        self.dec0 = _double_conv(3 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(F.max_pool2d(e0, 2))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([e2, self.up2(m)], 1))
        d1 = self.dec1(torch.cat([e1, self.shuffle(self.up1(d2))], 1))
        up0 = F.interpolate(d1, scale_factor=2, mode="bilinear", align_corners=False)
        d0 = self.dec0(torch.cat([e0, up0], 1))
        return self.head(d0)
