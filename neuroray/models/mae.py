"""MAE-3D: a ViT3D encoder over visible tokens and a light transformer decoder with mask tokens.

Targets (METHODS.md section 1):

- voxels: each patch as :func:`~neuroray.models.vit3d.patchify` lays it out; with
  ``norm_pix_loss`` each patch is normalised by its own mean and (unbiased) variance,
  ``(p - mean) / sqrt(var + 1e-6)``, exactly as MAE's ``norm_pix_loss``;
- optionally HOG of every z-slice of each patch (:mod:`neuroray.models.hog`, scikit-image's HOG).

Loss: ``pix_weight * MSE(voxels) + hog_weight * MSE(HOG)``, each MSE a mean over the feature
axis of each patch, then over the masked patches of the whole batch (visible patches never count).
Masks may hide a different number of tokens in each sample (dbMiM's policy does).

Checkpoint contract: the encoder's weights live under the ``encoder.`` prefix of
``MAE3D.state_dict()`` (``encoder.patch_embed.proj.weight``, ``encoder.pos_embed``,
``encoder.blocks.{i}.*``, ``encoder.norm.*``); the decoder under ``decoder_*`` and ``mask_token``.
:func:`neuroray.models.unetr.load_encoder` reads the encoder back by that prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.models.hog import HOGConfig, patch_hog, patch_hog_size
from neuroray.models.vit3d import (
    EncoderOutput,
    ModelError,
    ViT3D,
    ViTConfig,
    build_vit3d,
    patchify,
    resize_pos_embed,
    sincos_pos_embed_3d,
    unpatchify,
)


class MAEConfig(StrictModel):
    """MAE-3D: the encoder, the light decoder and the loss terms (lambda1 = pix, lambda2 = hog)."""

    encoder: ViTConfig = ViTConfig()
    decoder_width: int = Field(512, gt=0)
    decoder_depth: int = Field(6, ge=1)
    decoder_heads: int = Field(16, gt=0)
    decoder_pos_embed: Literal["sincos", "learned"] = "sincos"
    norm_pix_loss: bool = True
    pix_weight: float = Field(1.0, ge=0)
    hog_weight: float = Field(0.0, ge=0)
    hog: HOGConfig = HOGConfig()

    @model_validator(mode="after")
    def _check(self) -> MAEConfig:
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} is not divisible by decoder_heads "
                f"{self.decoder_heads}"
            )
        if self.pix_weight == 0 and self.hog_weight == 0:
            raise ValueError("pix_weight and hog_weight are both 0: nothing would be learned")
        if self.hog_weight > 0:
            patch = self.encoder.patch_size
            patch_hog_size(patch, self.encoder.in_chans, self.hog)  # raises if the patch is small
        return self


@dataclass
class MAEOutput:
    """What :meth:`MAE3D.forward` returns.

    loss:           scalar, ``pix_weight * losses["pix"] + hog_weight * losses["hog"]``.
    losses:         unweighted per-term means over masked patches: "pix" and (if used) "hog".
    per_patch_loss: [B, N] weighted loss of each patch (same weighting as ``loss``), detached;
                    exactly 0 on visible patches. dbMiM's per-agent credit reads it.
    pred:           [B, N, P] voxel predictions for every patch, in target space (per-patch
                    normalised when norm_pix_loss); visible rows are predicted too but unused.
    pred_hog:       [B, N, H] HOG predictions, or None.
    mask:           [B, N] bool, True = masked (the input mask, flattened z-major).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    per_patch_loss: Tensor
    pred: Tensor
    pred_hog: Tensor | None
    mask: Tensor
    grid: tuple[int, int, int] = field(default=(0, 0, 0))


def normalise_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """(patches - mean) / sqrt(var + eps) per patch (MAE's norm_pix_loss); also mean and std."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-patch values over masked patches of the whole batch."""
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """MSE of masked patches only: (mean over masked patches, per-patch MSE [B, N] in float32).

    ``pred`` and ``target`` are [B, N, F]; ``mask`` bool [B, N], True = masked. Visible patches
    get per-patch MSE 0 and no gradient.
    """
    per_patch = (pred.float() - target.float()).square().mean(-1)
    per_patch = torch.where(mask, per_patch, torch.zeros_like(per_patch))
    return masked_mean(per_patch, mask), per_patch


class MAE3D(nn.Module):
    """Masked autoencoder on 3D crops: ``forward(x, mask) -> MAEOutput``."""

    def __init__(
        self,
        encoder: ViT3D,
        decoder_width: int = 512,
        decoder_depth: int = 6,
        decoder_heads: int = 16,
        decoder_pos_embed: Literal["sincos", "learned"] = "sincos",
        norm_pix_loss: bool = True,
        pix_weight: float = 1.0,
        hog_weight: float = 0.0,
        hog: HOGConfig | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm_pix_loss = norm_pix_loss
        self.pix_weight = pix_weight
        self.hog_weight = hog_weight
        self.hog = hog or HOGConfig()
        self.decoder_pos_embed_kind = decoder_pos_embed

        grid = encoder.grid
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        if decoder_pos_embed == "sincos":
            self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(grid, decoder_width))
        else:
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, *grid, decoder_width))
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_width,
                decoder_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for _ in range(decoder_depth)
        )
        for block in self.decoder_blocks:
            block.attn.fused_attn = True
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, encoder.patch_dim)
        self.decoder_pred_hog = (
            nn.Linear(decoder_width, patch_hog_size(encoder.patch_size, encoder.in_chans, self.hog))
            if hog_weight > 0
            else None
        )
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        if self.decoder_pred_hog is not None:
            decoder.append(self.decoder_pred_hog)
        for module in (m for part in decoder for m in part.modules()):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- pieces ---------------------------------------------------------------------------------

    def decoder_pos_embed_for(self, grid: tuple[int, int, int]) -> Tensor:
        pos = self.decoder_pos_embed
        if tuple(pos.shape[1:-1]) != tuple(grid):
            if self.decoder_pos_embed_kind == "sincos":
                pos = sincos_pos_embed_3d(grid, pos.shape[-1]).to(pos)
            else:
                pos = resize_pos_embed(pos, grid)
        return pos.reshape(1, -1, pos.shape[-1])

    def flat_mask(self, mask: Tensor | np.ndarray, x: Tensor) -> Tensor:
        """Check a [B, Nz, Ny, Nx] (or [B, N]) mask against x; return bool [B, N] on x's device."""
        grid = self.encoder.grid_of(x)
        mask = torch.as_tensor(mask, device=x.device)
        n = grid[0] * grid[1] * grid[2]
        if mask.dtype != torch.bool or mask.reshape(mask.shape[0], -1).shape != (x.shape[0], n):
            raise ModelError(
                f"mask must be bool [B, Nz, Ny, Nx] = [{x.shape[0]}, {', '.join(map(str, grid))}]"
                f" (True = masked), got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.reshape(x.shape[0], n)
        if bool((mask.all(1) | ~mask.any(1)).any()):
            raise ModelError("every sample needs at least one masked and one visible token")
        return mask

    def targets(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Voxel targets [B, N, P] (normalised per patch if norm_pix_loss) and HOG [B, N, H]."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            patches = self.encoder.patchify(x.float())
            if self.norm_pix_loss:
                patches = normalise_patches(patches)[0]
            hog = patch_hog(x, self.encoder.patch_size, self.hog) if self.hog_weight > 0 else None
        return patches, hog

    def decode(self, enc: EncoderOutput, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decoder over all N tokens: encoded visible tokens scattered back, mask tokens elsewhere."""
        tokens = self.decoder_embed(enc.tokens)  # [B, K, Dd]
        b, _, width = tokens.shape
        n = mask.shape[1]
        mask_token = self.mask_token.to(tokens.dtype)
        if enc.valid is not None:  # padding rows belong to masked tokens
            tokens = torch.where(enc.valid[..., None], tokens, mask_token)
        full = mask_token.expand(b, n, width)
        full = full.scatter(1, enc.idx[..., None].expand(-1, -1, width), tokens)
        full = full + self.decoder_pos_embed_for(enc.grid).to(full.dtype)
        if enc.cls is not None:
            full = torch.cat([self.decoder_embed(enc.cls)[:, None], full], 1)
        for block in self.decoder_blocks:
            full = block(full)
        full = self.decoder_norm(full)[:, full.shape[1] - n :]
        pred_hog = self.decoder_pred_hog(full) if self.decoder_pred_hog is not None else None
        return self.decoder_pred(full), pred_hog

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | np.ndarray) -> MAEOutput:
        """x [B, C, Z, Y, X]; mask bool [B, Nz, Ny, Nx], True = hidden (to reconstruct)."""
        mask = self.flat_mask(mask, x)
        enc = self.encoder.forward_features(x, keep=~mask)
        pred, pred_hog = self.decode(enc, mask)
        target, target_hog = self.targets(x)

        losses = {}
        losses["pix"], per_pix = masked_mse(pred, target, mask)
        loss, per_patch = self.pix_weight * losses["pix"], self.pix_weight * per_pix
        if pred_hog is not None:
            losses["hog"], per_hog = masked_mse(pred_hog, target_hog, mask)
            loss = loss + self.hog_weight * losses["hog"]
            per_patch = per_patch + self.hog_weight * per_hog
        return MAEOutput(
            loss=loss,
            losses=losses,
            per_patch_loss=per_patch.detach(),
            pred=pred,
            pred_hog=pred_hog,
            mask=mask,
            grid=enc.grid,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        mask: Tensor | np.ndarray,
        stats: Literal["visible", "patch"] = "visible",
    ) -> Tensor:
        """Preview volume [B, C, Z, Y, X] (float32): input voxels where visible, predictions where
        masked.

        With norm_pix_loss the predictions are per-patch normalised, so they are mapped back to
        intensities with ``stats``: "visible" uses the sample's average visible-patch mean and std
        (no information from hidden voxels); "patch" uses each hidden patch's own true mean and
        std (MAE's visualisation; shows structure, but leaks each patch's brightness).
        """
        out = self.forward(x, mask)
        patches = self.encoder.patchify(x.float())
        pred = out.pred.float()
        if self.norm_pix_loss:
            _, mean, std = normalise_patches(patches)
            if stats == "visible":
                visible = (~out.mask)[..., None].float()
                count = visible.sum(1, keepdim=True)
                mean = (mean * visible).sum(1, keepdim=True) / count
                std = (std * visible).sum(1, keepdim=True) / count
            elif stats != "patch":
                raise ModelError(f"stats must be 'visible' or 'patch', got {stats!r}")
            pred = pred * std + mean
        merged = torch.where(out.mask[..., None], pred, patches)
        return unpatchify(merged, out.grid, self.encoder.patch_size)


def build_mae3d(cfg: MAEConfig) -> MAE3D:
    """The MAE a config describes (encoder built by :func:`build_vit3d`)."""
    return MAE3D(
        build_vit3d(cfg.encoder),
        decoder_width=cfg.decoder_width,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        decoder_pos_embed=cfg.decoder_pos_embed,
        norm_pix_loss=cfg.norm_pix_loss,
        pix_weight=cfg.pix_weight,
        hog_weight=cfg.hog_weight,
        hog=cfg.hog,
    )


def floored_patch_loss(
    model: MAE3D, x: Tensor, out: MAEOutput, variance_floor: float = 2e-3
) -> Tensor:
    """Per-patch loss [B, N] on a target with a noise floor, from a forward's output (detached).

    The voxel term is each masked patch's voxel MSE divided by (its variance + ``variance_floor``):
    with floor 0 it is the normalised-pixel loss (``norm_pix_loss``), but a patch whose variance
    is below the floor (flat, or pure noise) can no longer be stretched to unit variance and count
    as "hard". Predictions are mapped back to voxels first, so it works with or without
    ``norm_pix_loss``. The HOG term (if the model has one) is added as in the training loss.
    Weighted by ``pix_weight`` / ``hog_weight`` like :attr:`MAEOutput.per_patch_loss`; 0 on
    visible patches. (Intensities in [0, 1]: FIB-SEM voxel noise is about 6e-4 in variance.)
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        patches = model.encoder.patchify(x.float())
        mean = patches.mean(-1, keepdim=True)
        var = patches.var(-1, keepdim=True)
        pred = out.pred.float()
        if model.norm_pix_loss:
            pred = pred * (var + 1e-6).sqrt() + mean  # normalise_patches, inverted
        pix = (pred - patches).square().mean(-1) / (var.squeeze(-1) + variance_floor)
        per_patch = model.pix_weight * pix
        if out.pred_hog is not None:
            target_hog = model.targets(x)[1]
            hog = (out.pred_hog.float() - target_hog.float()).square().mean(-1)
            per_patch = per_patch + model.hog_weight * hog
        return torch.where(out.mask, per_patch, torch.zeros_like(per_patch))


def per_patch_mean_loss(
    x: Tensor, mask: Tensor | np.ndarray, patch_size: Sequence[int], norm_pix_loss: bool = True
) -> Tensor:
    """Loss of the trivial predictor that outputs each patch's mean (a baseline to beat).

    With norm_pix_loss the target has zero mean and unit variance per patch, so predicting zeros
    (the mean) gives ~1; without it the loss is the masked patches' voxel variance.
    """
    patches = patchify(x.float(), patch_size)
    target = normalise_patches(patches)[0] if norm_pix_loss else patches
    baseline = target.mean(-1, keepdim=True).expand_as(target)
    flat = torch.as_tensor(mask, device=x.device).reshape(len(target), -1)
    return masked_mse(baseline, target, flat)[0]
