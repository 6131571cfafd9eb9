"""UNETR: a convolutional decoder on ViT3D hidden states, for affinities or binary masks.

Structure (Hatamizadeh et al. 2022, MONAI's layout), with the token grid called level 0 and the
input resolution level 4:

- ``skip_input``: a residual conv block on the input volume (level 4, ``feature_size`` channels);
- ``skip3`` / ``skip2`` / ``skip1``: the outputs of the blocks at depth fractions 1/4, 2/4, 3/4
  (``encoder.skip_indices``: blocks 3, 6, 9 of 12), reshaped to the token grid and brought up by
  transposed convolutions to levels 3, 2, 1 (2x, 4x, 8x feature_size channels);
- ``up1`` .. ``up4``: from the final (normed) tokens at level 0, each stage upsamples by a
  transposed conv, concatenates the skip of its level and applies a residual conv block;
- ``head``: 1x1x1 conv to ``out_channels`` logits (sigmoid at inference: :meth:`UNETR.predict`).

Anisotropic z transition. Each of the four stages upsamples an axis 2x or not at all: an axis
whose patch is 2^k voxels is upsampled in the LAST (finest) k stages. For the default 4x16x16
patch, y and x double at every stage (16x) and z only at stages 3 and 4 (4x):

    level:      0 (tokens)  1        2        3        4 (input)
    z scale:    1/4         1/4      1/4      1/2      1
    y, x scale: 1/16        1/8      1/4      1/2      1

so z stays at token resolution while y, x catch up, and levels 2-4 have equal downsampling on
all axes. Patches must be powers of two no larger than 16 per axis.

Without skips (``skip_connections=False``, the MS-Con decoder) only the final tokens feed the
decoder and no skip branches are built. :meth:`UNETR.decoder_features` returns the four decoder
levels (1..4, coarse to fine) for MS-Con's feature pyramid.

Also here: :func:`load_encoder` (encoder weights from any pretraining checkpoint by key prefix,
position embeddings resized), :func:`param_groups_lrd` (layer-wise learning-rate decay) and
:func:`freeze_encoder` (frozen-encoder warm-up).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.models.vit3d import (
    ModelError,
    ViT3D,
    ViTConfig,
    build_vit3d,
    resize_pos_embed,
    tokens_to_volume,
)

STAGES = 4


def upsample_schedule(patch_size: Sequence[int], stages: int = STAGES) -> list[tuple[int, ...]]:
    """Per-stage (z, y, x) upsampling factors, coarse to fine; their product is the patch."""
    log2s = []
    for p in patch_size:
        k = int(p).bit_length() - 1
        if p < 1 or 2**k != p or k > stages:
            raise ModelError(
                f"UNETR needs patch sizes that are powers of two up to {2**stages} per axis, got "
                f"{tuple(patch_size)}; use e.g. (4, 16, 16) or (2, 8, 8)"
            )
        log2s.append(k)
    return [tuple(2 if s >= stages - k else 1 for k in log2s) for s in range(stages)]


class ResBlock(nn.Module):
    """conv3-norm-lrelu-conv3-norm plus a (1x1 projected) residual, then lrelu (MONAI UnetResBlock)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.residual = (
            nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, bias=False), nn.InstanceNorm3d(out_ch, affine=True)
            )
            if in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.residual(x))


def _up(in_ch: int, out_ch: int, factor: Sequence[int]) -> nn.ConvTranspose3d:
    factor = tuple(factor)
    return nn.ConvTranspose3d(in_ch, out_ch, factor, stride=factor, bias=False)


class SkipBranch(nn.Module):
    """Token-grid features brought up to a decoder level (MONAI UnetrPrUpBlock)."""

    def __init__(self, in_ch: int, out_ch: int, factors: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.first = _up(in_ch, out_ch, factors[0])
        self.rest = nn.ModuleList(
            nn.Sequential(_up(out_ch, out_ch, f), ResBlock(out_ch, out_ch)) for f in factors[1:]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.first(x)
        for stage in self.rest:
            x = stage(x)
        return x


class UpStage(nn.Module):
    """Upsample, concatenate the level's skip (if any), residual conv block."""

    def __init__(self, in_ch: int, out_ch: int, factor: Sequence[int], skip: bool) -> None:
        super().__init__()
        self.up = _up(in_ch, out_ch, factor)
        self.block = ResBlock(out_ch * (2 if skip else 1), out_ch)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class UNETR(nn.Module):
    """ViT3D encoder + UNETR decoder: [B, C, Z, Y, X] -> [B, out_channels, Z, Y, X] logits."""

    def __init__(
        self,
        encoder: ViT3D,
        out_channels: int = 3,
        skip_connections: bool = True,
        feature_size: int = 16,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = out_channels
        self.skip_connections = skip_connections
        self.schedule = upsample_schedule(encoder.patch_size)
        fs, width = feature_size, encoder.embed_dim
        channels = [fs * 8, fs * 4, fs * 2, fs]  # decoder levels 1..4
        self.skip_input = ResBlock(encoder.in_chans, fs) if skip_connections else None
        if skip_connections:
            # skipN feeds level N (N = 1, 2, 3), from the block at depth fraction (4 - N) / 4
            self.skip1 = SkipBranch(width, channels[0], self.schedule[:1])
            self.skip2 = SkipBranch(width, channels[1], self.schedule[:2])
            self.skip3 = SkipBranch(width, channels[2], self.schedule[:3])
        else:
            self.skip1 = self.skip2 = self.skip3 = None
        ins = [width, *channels[:-1]]
        self.up1, self.up2, self.up3, self.up4 = (
            UpStage(i, o, f, skip_connections)
            for i, o, f in zip(ins, channels, self.schedule, strict=True)
        )
        self.head = nn.Conv3d(fs, out_channels, 1)

    def decoder_features(self, x: Tensor) -> list[Tensor]:
        """Decoder feature maps at levels 1..4 (coarse to fine; channels 8, 4, 2, 1 x feature_size)."""
        indices = self.encoder.skip_indices[:3] if self.skip_connections else ()
        enc = self.encoder.forward_features(x, return_hidden=indices)
        grid = enc.grid
        deep = tokens_to_volume(enc.tokens, grid)
        if self.skip_connections:
            h1, h2, h3 = (tokens_to_volume(h, grid) for h in enc.hidden)
            skips = [self.skip1(h3), self.skip2(h2), self.skip3(h1), self.skip_input(x)]
        else:
            skips = [None] * STAGES
        features = []
        for stage, skip in zip((self.up1, self.up2, self.up3, self.up4), skips, strict=True):
            deep = stage(deep, skip)
            features.append(deep)
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.decoder_features(x)[-1])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Probabilities (sigmoid of the logits): affinities or foreground."""
        return torch.sigmoid(self.forward(x))


class UNETRConfig(StrictModel):
    """A UNETR: encoder config, output channels (3+ affinities, 1 binary) and decoder width."""

    encoder: ViTConfig = ViTConfig(pos_embed="learned")
    out_channels: int = Field(3, ge=1)
    feature_size: int = Field(16, ge=1)
    skip_connections: bool = True


def build_unetr(cfg: UNETRConfig) -> UNETR:
    """The UNETR a config describes (encoder from scratch; see :func:`load_encoder`)."""
    return UNETR(
        build_vit3d(cfg.encoder),
        out_channels=cfg.out_channels,
        skip_connections=cfg.skip_connections,
        feature_size=cfg.feature_size,
    )


# ----------------------------------------------------------------------------------------------
# loading pretrained encoders


@dataclass
class LoadReport:
    """What :func:`load_encoder` did, key names relative to the encoder."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} encoder tensors; missing {self.missing or 'none'}; "
            f"unexpected {self.unexpected or 'none'}; resized {self.resized or 'none'}"
        )


def find_encoder(model: nn.Module) -> ViT3D:
    """The ViT3D of a model: itself, or its ``encoder`` attribute."""
    if isinstance(model, ViT3D):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, ViT3D):
        return encoder
    raise ModelError(f"{type(model).__name__} is not a ViT3D and has no ViT3D `encoder`")


def _fit_pos_embed(
    key: str, value: Tensor, target: Tensor, encoder: ViT3D, source: Mapping[str, Tensor]
) -> tuple[Tensor, str]:
    """Checkpoint position embedding -> the encoder's grid, and a note for the report."""
    if value.ndim != 5 or value.shape[-1] != target.shape[-1]:
        raise ModelError(
            f"checkpoint {key} has shape {tuple(value.shape)}, expected [1, Nz, Ny, Nx, "
            f"{target.shape[-1]}]: it was made for a different encoder width or layout"
        )
    old_grid, new_grid = tuple(value.shape[1:-1]), tuple(target.shape[1:-1])
    if key == "pos_embed":
        shared_src, shared_dst = (
            old_grid[0] == 1,
            new_grid[0] == 1 and encoder.depth_embed is not None,
        )
        if shared_src and not shared_dst and "depth_embed" in source:
            # a yx_depth checkpoint into a full-grid encoder: fold the depth embedding in
            value = value + source["depth_embed"].to(value)
            old_grid = tuple(value.shape[1:-1])
            return resize_pos_embed(
                value, new_grid
            ), f"pos_embed (+depth_embed) {old_grid}->{new_grid}"
        if shared_dst and not shared_src:
            raise ModelError(
                "the checkpoint has a full 3D pos_embed but this encoder uses pos_embed="
                "'yx_depth' (shared over z); build the encoder with pos_embed='learned' or 'sincos'"
            )
    if old_grid == new_grid:
        return value, ""
    return resize_pos_embed(value, new_grid), f"{key} {old_grid}->{new_grid}"


def load_encoder(
    model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "encoder."
) -> LoadReport:
    """Load a ViT3D (or a model's ``.encoder``) from a checkpoint's tensors under ``prefix``.

    Works with MAE3D / dbMiM / MS-Con / UNETR state dicts (prefix "encoder.") or a bare encoder's
    (prefix ""). Position embeddings trained on another crop size are resized to this encoder's
    grid (interpolated when learned; a sin-cos encoder keeps its own fixed table). Any other shape
    mismatch is an error, as is a prefix that matches nothing.
    """
    encoder = find_encoder(model)
    source = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not source:
        heads = sorted({k.split(".")[0] for k in state_dict})[:8]
        raise ModelError(
            f"no checkpoint key starts with {prefix!r} (top-level names: {heads}); "
            "pass the prefix the encoder was saved under, e.g. prefix='encoder.' or prefix=''"
        )
    own = encoder.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    provided: set[str] = set()
    for key, value in source.items():
        if key not in own:
            if key == "depth_embed" and "pos_embed" in source and encoder.depth_embed is None:
                continue  # folded into pos_embed below
            report.unexpected.append(key)
            continue
        if key == "pos_embed" and encoder.pos_embed_kind == "sincos":
            # fixed sin-cos is a function of the grid: keep this encoder's own
            if value.shape != own[key].shape or not torch.allclose(value.to(own[key]), own[key]):
                report.resized.append("pos_embed: kept this encoder's fixed sin-cos")
            provided.add(key)
            continue
        if key in ("pos_embed", "depth_embed"):
            value, note = _fit_pos_embed(key, value, own[key], encoder, source)
            if note:
                report.resized.append(note)
        elif value.shape != own[key].shape:
            raise ModelError(
                f"checkpoint tensor {prefix}{key} has shape {tuple(value.shape)} but the encoder "
                f"expects {tuple(own[key].shape)}: the checkpoint was made with a different "
                "width, patch size or channel count; configure the encoder to match it"
            )
        to_load[key] = value
    encoder.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load and k not in provided)
    return report


# ----------------------------------------------------------------------------------------------
# optimiser helpers

_NO_DECAY = ("pos_embed", "depth_embed", "cls_token", "mask_token")


def encoder_layer_id(name: str, depth: int) -> int:
    """Layer of an encoder parameter for lr decay: 0 embeddings, i + 1 block i, depth + 1 the rest."""
    if name.startswith(("patch_embed", "pos_embed", "depth_embed", "cls_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def param_groups_lrd(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay: Iterable[str] = _NO_DECAY,
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT / MAE fine-tuning).

    A parameter in encoder layer l (0 = embeddings, i + 1 = block i) gets
    ``lr = base_lr * layer_decay ** (depth + 1 - l)``; the final norm and everything outside the
    encoder (decoder, head) gets ``base_lr``. Biases, norms (1-D tensors) and embeddings get no
    weight decay. Each group carries ``lr_scale`` for schedulers (multiply the scheduled lr by
    it). Frozen parameters are included, so a frozen-encoder warm-up needs no new optimiser.
    """
    encoder = find_encoder(model)
    depth = encoder.depth
    encoder_names = {id(p): n for n, p in encoder.named_parameters()}
    skip = tuple(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        local = encoder_names.get(id(param))
        layer = encoder_layer_id(local, depth) if local is not None else depth + 1
        decay = not (param.ndim <= 1 or name.split(".")[-1] in skip)
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault(
            (layer, decay),
            {
                "name": f"layer_{layer}_{'decay' if decay else 'no_decay'}",
                "params": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def freeze_encoder(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart, frozen=False) gradients into the encoder; returns the tensors touched."""
    params = list(find_encoder(model).parameters())
    for param in params:
        param.requires_grad_(not frozen)
    return len(params)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
