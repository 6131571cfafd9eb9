"""An anisotropic residual 3D U-Net: the supervised baseline and a production segmenter.

In the tradition of PyTorch Connectomics' ``UNet3D`` and lsd/funlib's U-Net:

- **levels** with their own channel counts (``channels``, or a named ``size``), each a stack of
  residual blocks (conv3-norm-act-conv3-norm + residual, act);
- **per-level downsampling factors** (``downsample``): max-pooling by (1, 2, 2) first keeps thin
  sections (50 nm EM, LM stacks) from being pooled in z before y and x catch up;
- **normalisation** by name (group norm by default: it does not care about batch size, so
  training on 2-4 crops and blockwise inference behave the same);
- a decoder of transposed convolutions by the same factors, skip concatenation, residual blocks,
  and a 1x1x1 head of ``out_channels`` logits (affinities or a foreground mask: the task decides).

The network is fully convolutional; its ``window`` is the crop it is trained and run on (each axis
a multiple of the total downsampling). Sizes by name (channels per level; parameters with one
residual block per level and three outputs): ``tiny`` 8-24-72 (0.3 M), ``small`` 12-36-108
(0.6 M), ``base`` 12-36-108-324 (5.7 M), ``large`` 16-48-144-432 (10.1 M). Channels grow 3x per
level as in lsd's U-Nets: full-resolution 3D convolutions dominate the cost on a CPU, coarse levels
are cheap.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from neuroray.config import StrictModel

#: Channels per level by size name (finest level first).
UNET_SIZES: dict[str, tuple[int, ...]] = {
    "tiny": (8, 24, 72),
    "small": (12, 36, 108),
    "base": (12, 36, 108, 324),
    "large": (16, 48, 144, 432),
}

Norm = Literal["group", "instance", "batch", "none"]


class UNetConfig(StrictModel):
    """The U-Net of a segmenter config (``model.unet``): levels, factors, normalisation, window."""

    size: Literal["tiny", "small", "base", "large"] | None = "small"
    """A named set of channels per level; ``channels`` overrides it."""
    channels: tuple[int, ...] | None = None
    """Channels per level, finest first (e.g. [16, 32, 64]: three levels)."""
    downsample: tuple[tuple[int, int, int], ...] | None = None
    """(z, y, x) pooling factor between consecutive levels; default (1, 2, 2) first, then
    (2, 2, 2): thin sections are not pooled in z at full resolution."""
    blocks: int = Field(1, ge=1)
    """Residual blocks per level (encoder and decoder)."""
    norm: Norm = "group"
    window: tuple[int, int, int] | None = None
    """The crop the network trains and runs on; a fine-tuning job fills it from
    ``data.sampler.crop_shape`` when unset."""

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        if self.channels is None and self.size is None:
            raise ValueError("model.unet needs a size (tiny | small | base | large) or channels")
        levels = len(self.level_channels)
        if levels < 2:
            raise ValueError("model.unet.channels needs at least two levels")
        if self.downsample is not None and len(self.downsample) != levels - 1:
            raise ValueError(
                f"model.unet.downsample needs {levels - 1} factors (one between each pair of "
                f"{levels} levels), got {len(self.downsample)}"
            )
        if self.window is not None:
            total = self.total_downsample
            if any(w % t for w, t in zip(self.window, total, strict=True)):
                raise ValueError(
                    f"the U-Net window {tuple(self.window)} must be a multiple of its total "
                    f"downsampling {total} on every axis (data.sampler.crop_shape)"
                )
        return self

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.channels or UNET_SIZES[self.size or "small"])

    @property
    def factors(self) -> tuple[tuple[int, int, int], ...]:
        if self.downsample is not None:
            return tuple(tuple(f) for f in self.downsample)  # type: ignore[misc]
        levels = len(self.level_channels)
        return ((1, 2, 2),) + ((2, 2, 2),) * (levels - 2)

    @property
    def total_downsample(self) -> tuple[int, int, int]:
        return tuple(math.prod(f[axis] for f in self.factors) for axis in range(3))  # type: ignore[return-value]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """conv3-norm-act-conv3-norm plus a (1x1 projected) residual, then act."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=norm == "none"),
            _norm(norm, out_ch),
            nn.ELU(inplace=True),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=norm == "none"),
            _norm(norm, out_ch),
        )
        self.residual = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.ELU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.residual(x))


def _stack(in_ch: int, out_ch: int, blocks: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        ResidualBlock(in_ch, out_ch, norm),
        *(ResidualBlock(out_ch, out_ch, norm) for _ in range(blocks - 1)),
    )


class UNet3D(nn.Module):
    """[B, 1, Z, Y, X] -> [B, out_channels, Z, Y, X] logits; Z, Y, X multiples of the total
    downsampling."""

    def __init__(self, cfg: UNetConfig, out_channels: int, in_channels: int = 1) -> None:
        super().__init__()
        channels, factors = cfg.level_channels, cfg.factors
        self.total_downsample = cfg.total_downsample
        self.down = nn.ModuleList()
        previous = in_channels
        for ch in channels:
            self.down.append(_stack(previous, ch, cfg.blocks, cfg.norm))
            previous = ch
        self.pool = nn.ModuleList(nn.MaxPool3d(f, stride=f) for f in factors)
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], factors[i], stride=factors[i])
            for i in range(len(factors))
        )
        self.merge = nn.ModuleList(
            _stack(2 * channels[i], channels[i], cfg.blocks, cfg.norm) for i in range(len(factors))
        )
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if any(s % t for s, t in zip(x.shape[2:], self.total_downsample, strict=True)):
            raise ValueError(
                f"U-Net input {tuple(x.shape[2:])} is not a multiple of its downsampling "
                f"{self.total_downsample}"
            )
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.pool):
                skips.append(x)
                x = self.pool[level](x)
        for level in reversed(range(len(self.up))):
            x = self.merge[level](torch.cat([self.up[level](x), skips[level]], dim=1))
        return self.head(x)
