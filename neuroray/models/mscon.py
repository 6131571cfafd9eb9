"""MS-Con: a Siamese UNETR trained for multiscale consistency (Chen et al., ICASSP 2024).

One encoder-decoder (a :class:`~neuroray.models.unetr.UNETR`, skip connections off by default as
published) runs with shared weights on a **weak** and a **strong** augmentation of the same crop.
Its loss has three parts (METHODS.md section 2):

- **voxel consistency**: both branches reconstruct the *clean* crop through the UNETR head
  (one output channel); MSE, averaged over the two views.
- **pyramid contrast**: the four decoder levels (coarse to fine, 8/4/2/1 x ``feature_size``
  channels) are each adaptively average-pooled to ``pool_grid`` (16^3 published) and flattened
  per channel, so **every channel of every level is one token** whose vector is its pooled
  spatial map. All levels pool to the same grid, so the raw tokens share one length
  G = prod(pool_grid); a per-level linear projection (``token_dim``) maps each level's maps to a
  common, smaller width D. It is per level because the levels' maps have different statistics
  (coarse levels are blurred copies of the token grid), and it keeps the attention below cheap
  (published G = 4096 would give a 67M-parameter attention). ``token_dim: null`` skips it and uses
  the raw pooled maps, as published. The two views' tokens are compared by a **real InfoNCE**
  (:func:`info_nce`) at temperature 0.1: a token's positive is the same channel of the same level
  in the other view of the same crop; its negatives are every other channel (all levels) of the
  other view and every channel of the other samples in the batch. The published loss had no
  negatives and was minimised as well by all similarities being -1 (see tests/models/test_mscon.py).
- **cross-attention consistency**: one ``nn.MultiheadAttention`` (shared by both directions)
  lets each view's tokens attend to the other's; each view's tokens should agree with their
  cross-attended version (:func:`consistency`). One term per direction. By default the
  agreement is itself an InfoNCE (a token's positive is its own cross-attended token), because
  a plain ``2 - 2 cos`` term at the published weight (0.5 each, against 0.1 for the contrast)
  is met more cheaply by collapse: every token shares one large common component, cosines go
  to 1, and InfoNCE drifts to chance (measured on the FIB-SEM cube: contrast 3.4 -> 5.1 of a
  possible 5.5 in 30 steps). ``cross_loss: cosine`` keeps a cosine form, centred over tokens
  so that collapsed tokens score 2 rather than 0.

Total: ``recon_weight * recon + contrast_weight * contrast + cross_weight * (cross_weak +
cross_strong)`` (published weights 1, 0.1, 0.5). Every term reaches the encoder.

Both views go through the network as one batch of 2B (instance norm is per sample, so this is
exactly two shared-weight passes, at one pass's overhead). Negatives come from this worker's
batch only (no all-gather across DDP workers).

Checkpoint contract: the encoder lives under ``unetr.encoder.`` (:data:`ENCODER_PREFIX`); the
decoder under ``unetr.`` with UNETR's own names, so ``load_encoder(unetr, state_dict,
prefix="unetr.encoder.")`` initialises fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.models.unetr import UNETR
from neuroray.models.vit3d import ModelError, ViT3D, ViTConfig, build_vit3d

ENCODER_PREFIX = "unetr.encoder."
LEVELS = 4


class MSConConfig(StrictModel):
    """The Siamese network: encoder, UNETR decoder, pyramid pooling and cross-attention."""

    encoder: ViTConfig = ViTConfig()
    feature_size: int = Field(16, ge=1)
    """UNETR decoder width: levels 1..4 have 8, 4, 2, 1 x feature_size channels (= tokens)."""
    skip_connections: bool = False
    """The published MS-Con decoder has none; True gives the full UNETR."""
    pool_grid: tuple[int, int, int] = (16, 16, 16)
    """Grid (z, y, x) every decoder level is adaptively average-pooled to (16^3 published)."""
    token_dim: int | None = Field(256, ge=1)
    """Per-level projection of the pooled maps to this width; null keeps the raw maps."""
    attention_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MSConConfig:
        if min(self.pool_grid) < 1:
            raise ValueError(f"pool_grid {self.pool_grid} must be positive (z, y, x)")
        width = self.token_width()
        if width % self.attention_heads:
            raise ValueError(
                f"token width {width} (token_dim, or prod(pool_grid) when token_dim is null) is "
                f"not divisible by attention_heads {self.attention_heads}"
            )
        return self

    def token_width(self) -> int:
        return self.token_dim or math.prod(self.pool_grid)


class MSConLossConfig(StrictModel):
    """Loss weights (published: reconstruction 1, similarity 0.1, each cross term 0.5)."""

    recon_weight: float = Field(1.0, ge=0)
    contrast_weight: float = Field(0.1, ge=0)
    cross_weight: float = Field(0.5, ge=0)
    """Weight of EACH cross-attention term (weak->strong and strong->weak)."""
    temperature: float = Field(0.1, gt=0)
    cross_loss: Literal["infonce", "cosine"] = "infonce"
    """How a view's tokens must agree with their cross-attended version: "infonce" (each token's
    positive is its own cross-attended token, negatives all others; cannot be met by collapse)
    or "cosine" (2 - 2 cos after centring over tokens; closer to the published term)."""

    @model_validator(mode="after")
    def _check(self) -> MSConLossConfig:
        if self.recon_weight == self.contrast_weight == self.cross_weight == 0:
            raise ValueError("all MS-Con loss weights are 0: nothing would be learned")
        return self


# ----------------------------------------------------------------------------------------------
# losses


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE between two views' tokens ``a``, ``b`` of shape [B, T, D].

    Token (i, t) of ``a`` has one positive, (i, t) of ``b``; the negatives are the B*T - 1 other
    tokens of ``b`` (other channels and levels of the same crop, and all tokens of the other
    crops). Cosine similarities over ``temperature``, cross-entropy both ways (a->b and b->a),
    averaged. Computed in float32 even under autocast. Minimum 0 (every positive far above its
    negatives); log(B*T) when all similarities are equal.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ModelError(
            f"info_nce needs two [B, T, D] token tensors of one shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    with torch.autocast(device_type=a.device.type, enabled=False):
        za = F.normalize(a.float().flatten(0, 1), dim=-1)
        zb = F.normalize(b.float().flatten(0, 1), dim=-1)
        logits = za @ zb.T / temperature
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def positive_accuracy(a: Tensor, b: Tensor) -> float:
    """Fraction of tokens of ``a`` whose most similar token of ``b`` is their positive."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        za = F.normalize(a.float().flatten(0, 1), dim=-1)
        zb = F.normalize(b.float().flatten(0, 1), dim=-1)
        best = (za @ zb.T).argmax(dim=1)
    return float((best == torch.arange(len(best), device=best.device)).float().mean())


def consistency(
    tokens: Tensor,
    attended: Tensor,
    kind: Literal["infonce", "cosine"] = "infonce",
    temperature: float = 0.1,
) -> Tensor:
    """How far tokens [B, T, D] are from their cross-attended counterparts (0 = consistent).

    "infonce": :func:`info_nce` with each token's own cross-attended token as its positive.
    "cosine": mean ``2 - 2 cos`` after subtracting each sample's mean token from both sides, so
    the common component that every token shares (the cheap way to agree) does not count and
    fully collapsed tokens score 2, not 0.
    """
    if kind == "infonce":
        return info_nce(tokens, attended, temperature)
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        tokens, attended = tokens.float(), attended.float()
        tokens = tokens - tokens.mean(dim=1, keepdim=True)
        attended = attended - attended.mean(dim=1, keepdim=True)
        cos = F.cosine_similarity(tokens, attended, dim=-1)
        return (2 - 2 * cos).mean()


# ----------------------------------------------------------------------------------------------
# the model


@dataclass
class MSConOutput:
    """What :meth:`MSCon.forward` returns.

    loss:       weighted total (see the module docstring).
    losses:     unweighted terms: "recon", "contrast", "cross_weak", "cross_strong".
    recon:      [2, B, C, Z, Y, X] reconstructions of the clean crop from the weak (0) and
                strong (1) view.
    tokens:     [2, B, T, D] pyramid tokens of the weak and strong view.
    accuracy:   fraction of weak tokens whose nearest strong token is their positive (a health
                metric: chance is 1 / (B*T)).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    recon: Tensor
    tokens: Tensor
    accuracy: float


class MSCon(nn.Module):
    """Siamese UNETR with pyramid tokens and cross-attention: ``forward(weak, strong, clean)``."""

    def __init__(
        self,
        encoder: ViT3D,
        feature_size: int = 16,
        skip_connections: bool = False,
        pool_grid: tuple[int, int, int] = (16, 16, 16),
        token_dim: int | None = 256,
        attention_heads: int = 4,
        loss: MSConLossConfig | None = None,
    ) -> None:
        super().__init__()
        self.unetr = UNETR(
            encoder,
            out_channels=encoder.in_chans,
            skip_connections=skip_connections,
            feature_size=feature_size,
        )
        self.pool_grid = tuple(int(g) for g in pool_grid)
        self.loss_cfg = loss or MSConLossConfig()
        raw = math.prod(self.pool_grid)
        self.level_channels = [feature_size * 2 ** (LEVELS - 1 - i) for i in range(LEVELS)]
        self.projectors = nn.ModuleList(
            nn.Linear(raw, token_dim) if token_dim else nn.Identity() for _ in range(LEVELS)
        )
        width = token_dim or raw
        self.cross_attention = nn.MultiheadAttention(width, attention_heads, batch_first=True)

    @property
    def encoder(self) -> ViT3D:
        """The shared ViT3D (a property, so its keys appear once, under ``unetr.encoder.``)."""
        return self.unetr.encoder

    @property
    def num_tokens(self) -> int:
        """Pyramid tokens per crop: every channel of the four decoder levels."""
        return sum(self.level_channels)

    # -- pieces ---------------------------------------------------------------------------------

    def tokens_from_features(self, features: list[Tensor]) -> Tensor:
        """Decoder levels (coarse to fine) -> pyramid tokens [B, T, D], level 1's channels first."""
        tokens = []
        for level, projector in zip(features, self.projectors, strict=True):
            pooled = F.adaptive_avg_pool3d(level, self.pool_grid)  # [B, C, *pool_grid]
            tokens.append(projector(pooled.flatten(2)))
        return torch.cat(tokens, dim=1)

    def pyramid_tokens(self, x: Tensor) -> Tensor:
        """Pyramid tokens [B, T, D] of a batch of views [B, C, Z, Y, X]."""
        return self.tokens_from_features(self.unetr.decoder_features(x))

    def cross_attend(self, query: Tensor, other: Tensor) -> Tensor:
        """``query`` tokens attending to the ``other`` view's tokens (the shared module)."""
        out, _ = self.cross_attention(query, other, other, need_weights=False)
        return out

    # -- forward --------------------------------------------------------------------------------

    def forward(self, weak: Tensor, strong: Tensor, clean: Tensor) -> MSConOutput:
        """Both views [B, C, Z, Y, X] through the shared network; the loss against ``clean``."""
        if not (weak.shape == strong.shape == clean.shape):
            raise ModelError(
                f"weak {tuple(weak.shape)}, strong {tuple(strong.shape)} and clean "
                f"{tuple(clean.shape)} views must have one shape (views of the same crop)"
            )
        batch, cfg = weak.shape[0], self.loss_cfg
        features = self.unetr.decoder_features(torch.cat([weak, strong]))
        recon = self.unetr.head(features[-1])
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon_loss = F.mse_loss(recon.float(), clean.float().repeat(2, 1, 1, 1, 1))
        tokens = self.tokens_from_features(features)
        tokens_weak, tokens_strong = tokens[:batch], tokens[batch:]
        losses = {
            "recon": recon_loss,
            "contrast": info_nce(tokens_weak, tokens_strong, cfg.temperature),
            "cross_weak": consistency(
                tokens_weak,
                self.cross_attend(tokens_weak, tokens_strong),
                cfg.cross_loss,
                cfg.temperature,
            ),
            "cross_strong": consistency(
                tokens_strong,
                self.cross_attend(tokens_strong, tokens_weak),
                cfg.cross_loss,
                cfg.temperature,
            ),
        }
        total = (
            cfg.recon_weight * losses["recon"]
            + cfg.contrast_weight * losses["contrast"]
            + cfg.cross_weight * (losses["cross_weak"] + losses["cross_strong"])
        )
        return MSConOutput(
            loss=total,
            losses=losses,
            recon=recon.unflatten(0, (2, batch)),
            tokens=tokens.unflatten(0, (2, batch)),
            accuracy=positive_accuracy(tokens_weak, tokens_strong),
        )

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The clean crop as the network reconstructs it from one view [B, C, Z, Y, X]."""
        return self.unetr(x)


def build_mscon(cfg: MSConConfig, loss: MSConLossConfig | None = None) -> MSCon:
    """The MS-Con network a config describes (encoder from scratch)."""
    return MSCon(
        build_vit3d(cfg.encoder),
        feature_size=cfg.feature_size,
        skip_connections=cfg.skip_connections,
        pool_grid=cfg.pool_grid,
        token_dim=cfg.token_dim,
        attention_heads=cfg.attention_heads,
        loss=loss,
    )
