"""Anisotropic 3D ViT encoder built from timm transformer blocks.

Why this shape:

- EM voxels are anisotropic, so the patch is too: the default patch is 4x16x16 (z, y, x) on
  32x160x160 crops, giving an 8x10x10 token grid (800 tokens). Any patch and crop are allowed
  as long as the crop is a multiple of the patch.
- Blocks and norms are timm's own ``Block`` / ``LayerNorm(eps=1e-6)`` with ``qkv_bias=True``,
  named exactly as in timm's ``VisionTransformer`` (``blocks.{i}.*``, ``norm.*``), so a 2D timm
  ViT's transformer weights copy into this encoder by key (METHODS.md section 3). Attention goes
  through ``F.scaled_dot_product_attention`` (timm's fused path, forced on here).
- Position embeddings are stored on their token grid: ``pos_embed`` is ``[1, Nz, Ny, Nx, D]``, so a
  checkpoint says which grid it was trained on and a loader can resize it without side
  information. Three kinds (``pos_embed=``):

  ``"sincos"``   fixed 3D sin-cos (MAE's choice), a persistent buffer (in the state dict, never
                 trained); regenerated exactly for another grid.
  ``"learned"``  a parameter, trilinearly interpolated when the token grid changes.
  ``"yx_depth"`` the 2D->3D transfer layout: ``pos_embed`` is ``[1, 1, Ny, Nx, D]`` (shared along
                 z, filled from a 2D ViT's grid embedding) plus a learned ``depth_embed``
                 ``[1, Nz, 1, 1, D]`` initialised to zero; the token at (z, y, x) gets
                 ``pos_embed[y, x] + depth_embed[z]``.

- No class token by default (segmentation and MIM use patch tokens only). With ``cls_token=True`` a
  ``cls_token`` parameter is prepended; it gets no position embedding (fold a 2D ViT's class
  position into ``cls_token`` when transferring). Outputs never include it among patch tokens.

Stable state-dict keys: ``patch_embed.proj.{weight,bias}``, ``pos_embed``, ``depth_embed``
(yx_depth only), ``cls_token`` (only when enabled), ``blocks.{i}.*`` (timm), ``norm.{weight,bias}``.

Token order is z-major flattening of the grid (index = (z*Ny + y)*Nx + x), the order of
``patch_embed(x)`` and of :func:`patchify`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.errors import NeurorayError

Grid = tuple[int, int, int]
PosEmbedKind = Literal["sincos", "learned", "yx_depth"]

#: width, depth, heads of the named sizes (timm's ViT-Ti/S/B/L).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class ModelError(NeurorayError):
    """A model was given input or weights it cannot use (wrong shape, patch, checkpoint keys)."""


# ----------------------------------------------------------------------------------------------
# grids, patchify


def token_grid(spatial: Sequence[int], patch_size: Sequence[int]) -> Grid:
    """The (Nz, Ny, Nx) token grid of a crop; the crop must be a whole number of patches."""
    spatial, patch_size = tuple(int(s) for s in spatial), tuple(int(p) for p in patch_size)
    if len(spatial) != 3 or len(patch_size) != 3:
        raise ModelError(f"expected a 3D crop and patch (z, y, x), got {spatial} and {patch_size}")
    if any(s % p or s < p for s, p in zip(spatial, patch_size, strict=True)):
        raise ModelError(
            f"crop {spatial} (z, y, x) is not a multiple of the patch {patch_size}; "
            f"use a crop size divisible by the patch, e.g. "
            f"{tuple(max(p, s // p * p) for s, p in zip(spatial, patch_size, strict=True))}"
        )
    return tuple(s // p for s, p in zip(spatial, patch_size, strict=True))  # type: ignore[return-value]


def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """[B, C, Z, Y, X] -> [B, N, pz*py*px*C], tokens z-major, voxels (pz, py, px, C) in a patch."""
    b, c, *spatial = x.shape
    nz, ny, nx = token_grid(spatial, patch_size)
    pz, py, px = patch_size
    x = x.reshape(b, c, nz, pz, ny, py, nx, px)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, Nz, Ny, Nx, pz, py, px, C
    return x.reshape(b, nz * ny * nx, pz * py * px * c)


def unpatchify(patches: Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """Exact inverse of :func:`patchify`: [B, N, pz*py*px*C] -> [B, C, Z, Y, X]."""
    nz, ny, nx = (int(g) for g in grid)
    pz, py, px = (int(p) for p in patch_size)
    b, n, p = patches.shape
    if n != nz * ny * nx or p % (pz * py * px):
        raise ModelError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {tuple(grid)} with patch "
            f"{tuple(patch_size)}"
        )
    c = p // (pz * py * px)
    x = patches.reshape(b, nz, ny, nx, pz, py, px, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, Nz, pz, Ny, py, Nx, px
    return x.reshape(b, c, nz * pz, ny * py, nx * px)


def tokens_to_volume(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """[B, N, D] patch tokens -> [B, D, Nz, Ny, Nx] feature volume (for convolutional decoders)."""
    b, n, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def hidden_indices(depth: int, count: int = 4) -> tuple[int, ...]:
    """1-based block indices at depth fractions 1/count .. count/count (12 -> 3, 6, 9, 12)."""
    return tuple(max(1, math.ceil(depth * k / count)) for k in range(1, count + 1))


# ----------------------------------------------------------------------------------------------
# position embeddings


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sin-cos embedding [1, Nz, Ny, Nx, dim] on integer token positions (MAE style).

    The width is split into three even parts for z, y, x (as equal as possible); each part is half
    sines, half cosines of the position at geometric frequencies. An odd width leaves the last
    channel zero.
    """
    base = (dim // 6) * 2
    parts = [base, base, base]
    for axis in range(3):  # spread the even remainder over the axes
        if dim - sum(parts) >= 2:
            parts[axis] += 2
    axes = []
    for size, width in zip(grid, parts, strict=True):
        pos = torch.arange(int(size), dtype=torch.float64)
        half = width // 2
        omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
        angles = pos[:, None] * omega[None, :]
        axes.append(torch.cat([angles.sin(), angles.cos()], dim=1))  # [size, width]
    nz, ny, nx = (int(g) for g in grid)
    emb = torch.cat(
        [
            axes[0][:, None, None, :].expand(nz, ny, nx, -1),
            axes[1][None, :, None, :].expand(nz, ny, nx, -1),
            axes[2][None, None, :, :].expand(nz, ny, nx, -1),
        ],
        dim=-1,
    )
    emb = F.pad(emb, (0, dim - emb.shape[-1]))
    return emb.unsqueeze(0).float()


def resize_pos_embed(pos: Tensor, grid: Sequence[int]) -> Tensor:
    """Resize a grid embedding [1, *old_grid, D] to [1, *grid, D].

    Identity (the same tensor) when the grid is unchanged; otherwise linear / bilinear / trilinear
    interpolation (align_corners=False) over the grid axes, in float32. Works for 1D, 2D and 3D
    grids, so the 2D->3D transfer can resize a 2D ViT's (y, x) grid with it too.
    """
    old, new = tuple(pos.shape[1:-1]), tuple(int(g) for g in grid)
    if len(old) != len(new):
        raise ModelError(f"cannot resize a {len(old)}D position grid {old} to {new}")
    if old == new:
        return pos
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(old)]
    moved = pos.float().movedim(-1, 1)  # [1, D, *old]
    out = F.interpolate(moved, size=new, mode=mode, align_corners=False)
    return out.movedim(1, -1).to(pos.dtype)


# ----------------------------------------------------------------------------------------------
# modules


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch: [B, C, Z, Y, X] -> [B, N, D] tokens (z-major)."""

    def __init__(
        self,
        patch_size: Sequence[int] = (4, 16, 16),
        in_chans: int = 1,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.patch_size: Grid = tuple(int(p) for p in patch_size)  # type: ignore[assignment]
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass
class EncoderOutput:
    """What :meth:`ViT3D.forward_features` returns.

    tokens: [B, K, D] final patch tokens after the last norm (K = N, or the kept tokens).
    hidden: outputs of the requested blocks (1-based, before the final norm), each [B, K, D].
    idx:    [B, K] flat token index of each row; None when all N tokens are present in order.
    valid:  [B, K] bool, False on padding rows (only when keep masks keep unequal counts per
            sample); None when every row is real.
    cls:    [B, D] the class token after the final norm, or None.
    grid:   (Nz, Ny, Nx) token grid of the input.
    """

    tokens: Tensor
    hidden: list[Tensor]
    idx: Tensor | None
    valid: Tensor | None
    cls: Tensor | None
    grid: Grid


def keep_layout(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rows to gather for a boolean keep mask [B, N]: (idx [B, K], valid [B, K] or None).

    Kept tokens come first, in token order; K is the largest kept count in the batch. Samples
    keeping fewer tokens are padded with (ignored) other tokens and ``valid`` marks real rows.
    """
    counts = keep.sum(1)
    if int(counts.min()) < 1:
        raise ModelError("every sample must keep at least one token (a mask hid all of them)")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    k = int(counts.max())
    idx = order[:, :k]
    if int(counts.min()) == k:
        return idx, None
    valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]
    return idx, valid


class ViT3D(nn.Module):
    """3D ViT encoder: anisotropic patch embedding, position embedding, timm blocks, final norm."""

    def __init__(
        self,
        img_size: Sequence[int] = (32, 160, 160),
        patch_size: Sequence[int] = (4, 16, 16),
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed: PosEmbedKind = "sincos",
        cls_token: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ModelError(f"width {embed_dim} is not divisible by {num_heads} heads")
        self.img_size: Grid = tuple(int(s) for s in img_size)  # type: ignore[assignment]
        self.patch_size: Grid = tuple(int(p) for p in patch_size)  # type: ignore[assignment]
        self.grid: Grid = token_grid(self.img_size, self.patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed_kind: PosEmbedKind = pos_embed
        self.num_prefix_tokens = 1 if cls_token else 0
        self._sincos_cache: dict[tuple, Tensor] = {}

        self.patch_embed = PatchEmbed3D(self.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        nz, ny, nx = self.grid
        self.depth_embed: nn.Parameter | None = None
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, embed_dim))
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, nz, ny, nx, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed == "yx_depth":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1, ny, nx, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            self.depth_embed = nn.Parameter(torch.zeros(1, nz, 1, 1, embed_dim))
        else:
            raise ModelError(
                f"unknown pos_embed {pos_embed!r}; use 'sincos', 'learned' or 'yx_depth'"
            )

        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rate,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for rate in rates
        )
        for block in self.blocks:
            block.attn.fused_attn = True  # F.scaled_dot_product_attention, even if env disables it
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    # -- init -----------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        """MAE-style: xavier-uniform linears and patch projection, unit norms, small cls token."""
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- properties -----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def skip_indices(self) -> tuple[int, ...]:
        """1-based blocks whose outputs UNETR uses (3, 6, 9, 12 for depth 12)."""
        return hidden_indices(self.depth, 4)

    @property
    def patch_dim(self) -> int:
        """Voxels per patch times channels: the width of :meth:`patchify` rows."""
        pz, py, px = self.patch_size
        return pz * py * px * self.in_chans

    def grid_of(self, x: Tensor) -> Grid:
        """Token grid of input x, checking its layout [B, C, Z, Y, X]."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ModelError(
                f"expected input [B, {self.in_chans}, Z, Y, X], got shape {tuple(x.shape)}"
            )
        return token_grid(x.shape[2:], self.patch_size)

    # -- position embedding ---------------------------------------------------------------------

    def pos_embed_for(self, grid: Sequence[int]) -> Tensor:
        """Position embedding for a token grid, flattened to [1, N, D] (z-major).

        The training grid returns the stored embedding itself; another grid regenerates sin-cos
        exactly, or interpolates learned embeddings (the shared (y, x) part and the depth part
        separately in ``yx_depth`` mode).
        """
        grid = tuple(int(g) for g in grid)
        if self.pos_embed_kind == "sincos":
            pos = self.pos_embed
            if grid != self.grid:
                key = (grid, pos.device, pos.dtype)
                if key not in self._sincos_cache:  # blockwise inference reuses one grid
                    self._sincos_cache = {key: sincos_pos_embed_3d(grid, self.embed_dim).to(pos)}
                pos = self._sincos_cache[key]
        elif self.pos_embed_kind == "learned":
            pos = resize_pos_embed(self.pos_embed, grid)
        else:
            nz, ny, nx = grid
            pos = resize_pos_embed(self.pos_embed, (1, ny, nx)) + resize_pos_embed(
                self.depth_embed, (nz, 1, 1)
            )
        return pos.reshape(1, -1, self.embed_dim)

    # -- patches --------------------------------------------------------------------------------

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, Z, Y, X] -> [B, N, pz*py*px*C] (see module docstring for the order)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, patches: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        """Inverse of :meth:`patchify`; grid defaults to the configured crop's grid."""
        return unpatchify(patches, grid or self.grid, self.patch_size)

    # -- forward --------------------------------------------------------------------------------

    def forward_features(
        self,
        x: Tensor,
        return_hidden: Sequence[int] = (),
        keep: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode x [B, C, Z, Y, X], optionally only a subset of its tokens.

        return_hidden: 1-based block indices whose outputs to return (e.g. ``self.skip_indices``).
        keep: None (all tokens); a LongTensor [B, K] of token indices; or a bool tensor [B, N] or
            [B, Nz, Ny, Nx] with True = keep (MAE passes ``~mask``). Counts may differ per sample:
            rows are then padded and padding is excluded from attention by a key mask, so a
            sample's output never depends on tokens it did not keep.
        """
        grid = self.grid_of(x)
        n = grid[0] * grid[1] * grid[2]
        tokens = self.patch_embed(x) + self.pos_embed_for(grid).to(x.dtype)
        idx = valid = None
        if keep is not None:
            if keep.dtype == torch.bool:
                keep = keep.reshape(keep.shape[0], -1)
                if keep.shape != (x.shape[0], n):
                    raise ModelError(
                        f"keep mask of shape {tuple(keep.shape)} does not match batch "
                        f"{x.shape[0]} x {n} tokens (grid {grid})"
                    )
                idx, valid = keep_layout(keep.to(x.device))
            else:
                idx = keep.to(device=x.device, dtype=torch.long)
                if idx.ndim != 2 or idx.shape[0] != x.shape[0]:
                    raise ModelError(f"token indices must be [B, K], got {tuple(idx.shape)}")
            tokens = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))

        prefix = self.num_prefix_tokens
        if self.cls_token is not None:
            tokens = torch.cat(
                [self.cls_token.to(tokens.dtype).expand(len(tokens), -1, -1), tokens], 1
            )
        attn_mask = None
        if valid is not None:
            key_valid = F.pad(valid, (prefix, 0), value=True)
            attn_mask = key_valid[:, None, None, :]  # [B, 1, 1, K]: True = attend

        wanted = set(int(i) for i in return_hidden)
        if wanted and (min(wanted) < 1 or max(wanted) > self.depth):
            raise ModelError(f"return_hidden {sorted(wanted)} outside blocks 1..{self.depth}")
        hidden = {}
        for i, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, attn_mask=attn_mask)
            if i in wanted:
                hidden[i] = tokens[:, prefix:]
        tokens = self.norm(tokens)
        return EncoderOutput(
            tokens=tokens[:, prefix:],
            hidden=[hidden[int(i)] for i in return_hidden],
            idx=idx,
            valid=valid,
            cls=tokens[:, 0] if prefix else None,
            grid=grid,
        )

    def forward(self, x: Tensor) -> Tensor:
        """All patch tokens after the final norm: [B, N, D]."""
        return self.forward_features(x).tokens


# ----------------------------------------------------------------------------------------------
# config


class ViTConfig(StrictModel):
    """Encoder config: a named size (tiny/small/base/large) and/or explicit width, depth, heads.

    Explicit width/depth/heads override the named size; with ``size: null`` all three are needed.
    """

    size: Literal["tiny", "small", "base", "large"] | None = "tiny"
    width: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    heads: int | None = Field(None, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    img_size: tuple[int, int, int] = (32, 160, 160)
    in_chans: int = Field(1, gt=0)
    pos_embed: PosEmbedKind = "sincos"
    cls_token: bool = False
    drop_path: float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> ViTConfig:
        width, _, heads = self.dims()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be positive")
        bad = [s for s, p in zip(self.img_size, self.patch_size, strict=True) if s < p or s % p]
        if bad:
            raise ValueError(
                f"img_size {self.img_size} (z, y, x) must be a multiple of patch_size "
                f"{self.patch_size}"
            )
        return self

    def dims(self) -> tuple[int, int, int]:
        """(width, depth, heads) after applying explicit overrides to the named size."""
        preset = VIT_SIZES[self.size] if self.size else (None, None, None)
        dims = tuple(
            given if given is not None else default
            for given, default in zip((self.width, self.depth, self.heads), preset, strict=True)
        )
        if any(d is None for d in dims):
            raise ValueError("with size: null, set width, depth and heads explicitly")
        return dims  # type: ignore[return-value]


def build_vit3d(cfg: ViTConfig) -> ViT3D:
    """The encoder a config describes."""
    width, depth, heads = cfg.dims()
    return ViT3D(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path,
        pos_embed=cfg.pos_embed,
        cls_token=cfg.cls_token,
    )
