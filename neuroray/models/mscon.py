"""MS-Con: a Siamese UNETR trained for multiscale consistency (Chen et al., ICASSP 2024).

One encoder-decoder (a :class:`~neuroray.models.unetr.UNETR`, skip connections off by default as
published) runs with shared weights on a **weak** and a **strong** augmentation of the same crop.
Its loss has three parts (METHODS.md section 2):

- **voxel consistency**: both branches reconstruct the *clean* crop through a head with one
  output channel; MSE over the whole crop, averaged over the two views.
- **pyramid contrast**: four feature levels, each adaptively average-pooled to ``pool_grid`` and
  flattened per channel, so **every channel of every level is one token** whose vector is its
  pooled spatial map. All levels pool to the same grid, so the raw tokens share one length
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

**Variants** (``model.variant``; :data:`VARIANTS`). Explicit ``feature_size``,
``decoder_levels``, ``pool_grid`` and ``visible_fraction`` override the variant's values.

- ``published``: every token of both views through the encoder, all four UNETR stages up to the
  input resolution (levels 1..4: 8, 4, 2, 1 x ``feature_size`` = 16 channels), the reconstruction
  from level 4 by UNETR's 1x1x1 head, a 16^3 pyramid. About 30x MAE's cost per sample at
  32x160x160 (benchmarks/RESULTS.md): two full-token encoder passes are already ~8x MAE's
  matmuls (MAE encodes a quarter of one crop's tokens), and the full-resolution convolutions of
  the decoder cost three times the encoders.
- ``fast`` (the default): the same method doing less work per sample. The encoder sees a random
  ``visible_fraction`` (0.25, MAE's visible share) of the patches: one random set per step,
  shared by every crop of the batch and both views. So a view's positives cover the same patches
  as in the published method (the views differ only by augmentation), and since every token of
  the batch is masked alike, the mask pattern tells no crop from another (masks drawn per crop
  would make the other crops' negatives separable by pattern alone, a shortcut needing no image
  content; masks drawn per view would leave untrained positives further apart than other crops).
  Hidden positions get a learned ``mask_token`` before the decoder, so each view also
  reconstructs its hidden patches, as in MAE. The decoder runs ``decoder_levels`` = 3 stages at
  ``feature_size`` 4 (level 3 is half the input resolution) and a transposed-convolution head
  predicts each level-3 voxel's 2x2x2 block of input voxels; the pyramid's four levels are the
  token grid (level 0: the encoder's tokens, mask tokens where hidden, reduced by a 1x1x1
  convolution to level 1's 8 x ``feature_size`` channels) and levels 1..3, pooled to 8^3.

Both views go through the network as one batch of 2B (instance norm is per sample, so this is
exactly two shared-weight passes, at one pass's overhead). Negatives come from this worker's
batch only (no all-gather across DDP workers).

Checkpoint contract: the encoder lives under ``unetr.encoder.`` (:data:`ENCODER_PREFIX`) in
every variant, so ``load_encoder(unetr, state_dict, prefix="unetr.encoder.")`` initialises
fine-tuning; the decoder lives under ``unetr.`` with UNETR's own names (stages a variant does not
run are absent).
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
from neuroray.models.unetr import STAGES, UNETR
from neuroray.models.vit3d import ModelError, ViT3D, ViTConfig, build_vit3d, tokens_to_volume

ENCODER_PREFIX = "unetr.encoder."
LEVELS = 4
"""Pyramid levels (the paper's four)."""
STAGE_NAMES = ("up1", "up2", "up3", "up4")

Variant = Literal["fast", "published"]


@dataclass(frozen=True)
class MSConArchitecture:
    """The settings a variant fixes, after explicit overrides (:meth:`MSConConfig.architecture`)."""

    feature_size: int
    decoder_levels: int
    pool_grid: tuple[int, int, int]
    visible_fraction: float


VARIANTS: dict[str, MSConArchitecture] = {
    "published": MSConArchitecture(
        feature_size=16, decoder_levels=4, pool_grid=(16, 16, 16), visible_fraction=1.0
    ),
    "fast": MSConArchitecture(
        feature_size=4, decoder_levels=3, pool_grid=(8, 8, 8), visible_fraction=0.25
    ),
}


class MSConConfig(StrictModel):
    """The Siamese network: encoder, UNETR decoder, pyramid pooling and cross-attention."""

    encoder: ViTConfig = ViTConfig()
    variant: Variant = "fast"
    """"fast" (default) or "published" (the paper's full-resolution decoder and 16^3 pyramid on
    every token; ~30x MAE's cost per sample). See the module docstring."""
    feature_size: int | None = Field(None, ge=1)
    """UNETR decoder width: levels 1..4 have 8, 4, 2, 1 x feature_size channels (= tokens);
    null = the variant's (fast 4, published 16)."""
    decoder_levels: int | None = Field(None, ge=3, le=STAGES)
    """UNETR stages run (4 = up to the input resolution; 3 = half of it, the head predicting
    2x2x2 blocks); with 3 the pyramid takes the token grid (reduced to level 1's width) as its
    coarsest level. null = the variant's (fast 3, published 4)."""
    skip_connections: bool = False
    """The published MS-Con decoder has none; True gives the full UNETR (needs every token and
    all four decoder levels)."""
    pool_grid: tuple[int, int, int] | None = None
    """Grid (z, y, x) every pyramid level is adaptively average-pooled to; null = the variant's
    (fast 8^3, published 16^3)."""
    visible_fraction: float | None = Field(None, gt=0, le=1)
    """Share of the patches the encoder sees (one random set per step for all crops and both
    views); null = the variant's (fast 0.25, published 1)."""
    token_dim: int | None = Field(256, ge=1)
    """Per-level projection of the pooled maps to this width; null keeps the raw maps."""
    attention_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MSConConfig:
        arch = self.architecture()
        if min(arch.pool_grid) < 1:
            raise ValueError(f"pool_grid {arch.pool_grid} must be positive (z, y, x)")
        width = self.token_width()
        if width % self.attention_heads:
            raise ValueError(
                f"token width {width} (token_dim, or prod(pool_grid) when token_dim is null) is "
                f"not divisible by attention_heads {self.attention_heads}"
            )
        if self.skip_connections and (arch.decoder_levels < STAGES or arch.visible_fraction < 1):
            raise ValueError(
                "skip_connections=true needs every token and all four decoder levels: set "
                "model.variant=published (or decoder_levels=4 and visible_fraction=1)"
            )
        return self

    def architecture(self) -> MSConArchitecture:
        """The variant's settings with the explicitly given fields in their place."""
        base = VARIANTS[self.variant]
        return MSConArchitecture(
            feature_size=self.feature_size or base.feature_size,
            decoder_levels=self.decoder_levels or base.decoder_levels,
            pool_grid=tuple(self.pool_grid or base.pool_grid),  # type: ignore[arg-type]
            visible_fraction=self.visible_fraction or base.visible_fraction,
        )

    def token_width(self) -> int:
        return self.token_dim or math.prod(self.architecture().pool_grid)


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
    """Siamese UNETR with pyramid tokens and cross-attention: ``forward(weak, strong, clean)``.

    The step in pieces (each public, so benchmarks/mscon_profile.py can time them one by one):
    :meth:`draw_keep` (which patches each view's encoder sees), :meth:`encode` (level 0, the
    token grid), :meth:`decode` (levels 1..decoder_levels), ``unetr.head`` (the reconstruction),
    :meth:`pool` and :meth:`project` (pyramid tokens), :meth:`attend` (cross-attention) and
    :meth:`score` (the losses).
    """

    def __init__(
        self,
        encoder: ViT3D,
        feature_size: int = 4,
        skip_connections: bool = False,
        pool_grid: tuple[int, int, int] = (8, 8, 8),
        token_dim: int | None = 256,
        attention_heads: int = 4,
        loss: MSConLossConfig | None = None,
        decoder_levels: int = 3,
        visible_fraction: float = 0.25,
    ) -> None:
        super().__init__()
        if not LEVELS - 1 <= decoder_levels <= STAGES:
            raise ModelError(f"decoder_levels must be 3 or 4, got {decoder_levels}")
        if not 0 < visible_fraction <= 1:
            raise ModelError(f"visible_fraction must be in (0, 1], got {visible_fraction}")
        if skip_connections and (decoder_levels < STAGES or visible_fraction < 1):
            raise ModelError("skip connections need every token and all four decoder levels")
        self.unetr = UNETR(
            encoder,
            out_channels=encoder.in_chans,
            skip_connections=skip_connections,
            feature_size=feature_size,
        )
        self.decoder_levels = decoder_levels
        self.visible_fraction = float(visible_fraction)
        channels = [feature_size * 2 ** (STAGES - 1 - i) for i in range(STAGES)]  # levels 1..4
        if decoder_levels < STAGES:
            for name in STAGE_NAMES[decoder_levels:]:
                setattr(self.unetr, name, None)  # never run (DDP would wait for their gradients)
            # each finest-level voxel predicts its block of input voxels (a linear "unpatchify")
            block = tuple(
                math.prod(stage[axis] for stage in self.unetr.schedule[decoder_levels:])
                for axis in range(3)
            )
            self.unetr.head = nn.ConvTranspose3d(
                channels[decoder_levels - 1], encoder.in_chans, block, stride=block
            )
        self.mask_token: nn.Parameter | None = None
        if visible_fraction < 1:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.pool_grid = tuple(int(g) for g in pool_grid)
        self.loss_cfg = loss or MSConLossConfig()
        raw = math.prod(self.pool_grid)
        # the pyramid: the four finest of level 0 (the token grid) .. level decoder_levels; a
        # token grid in it is first reduced to level 1's width (a 1x1x1 convolution), so that
        # the encoder's width does not set the token count (and the attention's cost)
        self.level0: nn.Conv3d | None = None
        if decoder_levels < LEVELS:
            self.level0 = nn.Conv3d(encoder.embed_dim, channels[0], 1)
        self.level_channels = [channels[0], *channels[:decoder_levels]][-LEVELS:]
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
        """Pyramid tokens per crop: every channel of the four pyramid levels."""
        return sum(self.level_channels)

    # -- pieces ---------------------------------------------------------------------------------

    def draw_keep(
        self,
        batch: int,
        grid: tuple[int, int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Token indices [batch, K] the encoder sees: one uniformly random set of
        K = round(visible_fraction x N) tokens (in token order) shared by every row, i.e. by every
        crop and both views (see the module docstring); None when it sees all."""
        if self.visible_fraction >= 1:
            return None
        n = math.prod(grid)
        k = min(n, max(1, round(self.visible_fraction * n)))
        chosen = torch.randperm(n, generator=generator)[:k].sort().values
        return chosen.to(device).expand(batch, k)

    def encode(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Views [B, C, Z, Y, X] -> level 0 [B, D, Nz, Ny, Nx]: the encoder's final tokens on
        the token grid, the mask token where ``keep`` (see :meth:`draw_keep`) hid a patch."""
        enc = self.encoder.forward_features(x, keep=keep)
        tokens = enc.tokens
        if enc.idx is not None:
            if self.mask_token is None:
                raise ModelError(
                    "this MS-Con encodes every token (visible_fraction 1): it has no mask token "
                    "for hidden ones; pass keep=None"
                )
            b, _, width = tokens.shape
            mask_token = self.mask_token.to(tokens.dtype)
            if enc.valid is not None:  # padding rows stand for hidden tokens
                tokens = torch.where(enc.valid[..., None], tokens, mask_token)
            full = mask_token.expand(b, math.prod(enc.grid), width)
            tokens = full.scatter(1, enc.idx[..., None].expand(-1, -1, width), tokens)
        return tokens_to_volume(tokens, enc.grid)

    def decode(self, grid: Tensor) -> list[Tensor]:
        """Level 0 -> decoder levels 1..decoder_levels, coarse to fine (no skip connections)."""
        features = []
        for name in STAGE_NAMES[: self.decoder_levels]:
            grid = getattr(self.unetr, name)(grid)
            features.append(grid)
        return features

    def feature_levels(self, x: Tensor, keep: Tensor | None = None) -> list[Tensor]:
        """Feature maps coarse to fine, the finest last: levels 0..decoder_levels, or levels
        1..4 with skip connections (their stages need the encoder's hidden states)."""
        if self.unetr.skip_connections:
            if keep is not None:
                raise ModelError("with skip connections the encoder sees every token: keep=None")
            return self.unetr.decoder_features(x)
        grid = self.encode(x, keep)
        return [grid, *self.decode(grid)]

    def pool(self, features: list[Tensor]) -> list[Tensor]:
        """The pyramid's four levels (the finest of ``features``; a token grid among them
        reduced to level 1's width), each pooled to ``pool_grid`` and flattened per channel:
        [B, C_level, prod(pool_grid)] each."""
        levels = features[-LEVELS:]
        if self.level0 is not None:
            levels = [self.level0(levels[0]), *levels[1:]]
        return [F.adaptive_avg_pool3d(level, self.pool_grid).flatten(2) for level in levels]

    def project(self, pooled: list[Tensor]) -> Tensor:
        """Pooled maps -> pyramid tokens [B, T, D], the coarsest level's channels first."""
        return torch.cat(
            [projector(maps) for maps, projector in zip(pooled, self.projectors, strict=True)],
            dim=1,
        )

    def tokens_from_features(self, features: list[Tensor]) -> Tensor:
        """Feature levels (coarse to fine) -> pyramid tokens [B, T, D]."""
        return self.project(self.pool(features))

    def pyramid_tokens(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Pyramid tokens [B, T, D] of a batch of views [B, C, Z, Y, X]."""
        return self.tokens_from_features(self.feature_levels(x, keep))

    def cross_attend(self, query: Tensor, other: Tensor) -> Tensor:
        """``query`` tokens attending to the ``other`` view's tokens (the shared module)."""
        out, _ = self.cross_attention(query, other, other, need_weights=False)
        return out

    def attend(self, tokens: Tensor) -> Tensor:
        """Tokens [2B, T, D] (weak rows, then strong) -> each view's tokens attending to the
        other view's, in one call of the shared module."""
        other = torch.cat(tokens.chunk(2)[::-1])
        return self.cross_attend(tokens, other)

    def score(self, recon: Tensor, tokens: Tensor, attended: Tensor, clean: Tensor) -> MSConOutput:
        """The losses of both views' reconstructions [2B, C, Z, Y, X], pyramid tokens and their
        cross-attended tokens [2B, T, D] against the clean crops [B, C, Z, Y, X]."""
        batch, cfg = clean.shape[0], self.loss_cfg
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon_loss = F.mse_loss(recon.float(), clean.float().repeat(2, 1, 1, 1, 1))
        tokens_weak, tokens_strong = tokens[:batch], tokens[batch:]
        losses = {
            "recon": recon_loss,
            "contrast": info_nce(tokens_weak, tokens_strong, cfg.temperature),
            "cross_weak": consistency(
                tokens_weak, attended[:batch], cfg.cross_loss, cfg.temperature
            ),
            "cross_strong": consistency(
                tokens_strong, attended[batch:], cfg.cross_loss, cfg.temperature
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

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self, weak: Tensor, strong: Tensor, clean: Tensor, keep: Tensor | None = None
    ) -> MSConOutput:
        """Both views [B, C, Z, Y, X] through the shared network; the loss against ``clean``.

        ``keep``: token indices [2B, K] the encoder sees (weak rows first); by default drawn at
        random (:meth:`draw_keep`) when ``visible_fraction`` < 1.
        """
        if not (weak.shape == strong.shape == clean.shape):
            raise ModelError(
                f"weak {tuple(weak.shape)}, strong {tuple(strong.shape)} and clean "
                f"{tuple(clean.shape)} views must have one shape (views of the same crop)"
            )
        views = torch.cat([weak, strong])
        if keep is None:
            keep = self.draw_keep(len(views), self.encoder.grid_of(views), views.device)
        features = self.feature_levels(views, keep)
        recon = self.unetr.head(features[-1])
        tokens = self.tokens_from_features(features)
        return self.score(recon, tokens, self.attend(tokens), clean)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The clean crop as the network reconstructs it from one view [B, C, Z, Y, X], every
        patch visible."""
        return self.unetr.head(self.feature_levels(x)[-1])


def build_mscon(cfg: MSConConfig, loss: MSConLossConfig | None = None) -> MSCon:
    """The MS-Con network a config describes (encoder from scratch)."""
    arch = cfg.architecture()
    return MSCon(
        build_vit3d(cfg.encoder),
        feature_size=arch.feature_size,
        skip_connections=cfg.skip_connections,
        pool_grid=arch.pool_grid,
        token_dim=cfg.token_dim,
        attention_heads=cfg.attention_heads,
        loss=loss,
        decoder_levels=arch.decoder_levels,
        visible_fraction=arch.visible_fraction,
    )
