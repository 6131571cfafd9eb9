"""Offline natural-image pretraining of a small 2D ViT (MAE), the stand-in for hub weights.

METHODS.md section 3 initialises the 3D encoder from a 2D ViT pretrained on natural images. No
hub is reachable offline (tests, CI, this workplace), so this module pretrains a small timm
``VisionTransformer`` on the natural photographs that ship inside the scikit-image wheel
(:data:`NATURAL_IMAGES`: astronaut, coffee, chelsea, rocket, camera, ...; every one loads from
the installed package, no download) and saves a checkpoint timm itself loads.

Training is MAE (He et al. 2022) in plain torch, in-process (no Ray: it is minutes on a CPU):
random resized crops, flips, colour jitter and random greyscale (the 3D target is grey), 75% of
patches hidden per image, the encoder sees the visible patches plus the class token, a light
decoder predicts the hidden patches' pixels, normalised per patch (``norm_pix_loss``). The
encoder's position embedding is the fixed 2D sin-cos table (frozen, as in MAE), stored in timm's
learned ``pos_embed`` slot so nothing special is needed to load it.

Output (``cfg.output`` is a directory): ``vit2d.safetensors`` (the encoder's state dict under
timm ``VisionTransformer`` key names, no head) and ``vit2d.json`` (``model_name``,
``model_args``, input ``mean`` / ``std``, the training config and loss curve). Load it with::

    meta = json.load(open("vit2d.json"))
    timm.create_model(meta["model_name"], pretrained=False,
                      checkpoint_path="vit2d.safetensors", **meta["model_args"])

or transfer it to 3D with ``encoder_from_2d("file:<dir>/vit2d.safetensors", ...)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.models.vit3d import ModelError
from neuroray.paths import OutputPath

#: Photographs bundled in the scikit-image wheel (skimage/data/*.png|jpg), loadable offline.
#: ``motorcycle_left`` / ``motorcycle_right`` are the two views of ``stereo_motorcycle``.
NATURAL_IMAGES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "moon",
    "coins",
    "gravel",
    "grass",
    "brick",
)
TIMM_MODEL_NAME = "vit_tiny_patch16_224"  # a registered ViT; its dims are overridden by model_args
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_NAME = "vit2d.safetensors"


class Pretrain2DJob(StrictModel):
    """A 2D MAE pretraining run on the bundled photographs.

    Defaults: 64 px crops, 16 px patches, width 192, depth 6, 3 heads, 300 steps of 32 crops,
    one torch thread. Measured on the shared 2-core dev machine (load average ~10): 400 steps
    took 251 s (0.63 s/step) with the loss (per-patch normalised pixels; predicting zeros
    scores ~1.0) falling 0.96 -> 0.79 (means of the first / last 40 steps), flat after ~250.
    """

    output: OutputPath = Field("runs/vit2d", validate_default=True)
    """Directory for vit2d.safetensors + vit2d.json."""
    images: tuple[str, ...] = NATURAL_IMAGES
    img_size: int = Field(64, ge=8)
    patch_size: int = Field(16, ge=2)
    width: int = Field(192, gt=0)
    depth: int = Field(6, gt=0)
    heads: int = Field(3, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    decoder_width: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_heads: int = Field(4, gt=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1.5e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    crop_scale: tuple[float, float] = (0.1, 1.0)
    grayscale_p: float = Field(0.3, ge=0, le=1)
    seed: int = 0
    num_threads: int | None = Field(1, gt=0)
    """torch CPU threads during the run (None: torch's setting). 1 by default: on a shared
    2-core machine two threads contend and a step ran ~8x slower than with one."""
    log_every: int = Field(50, gt=0)
    progress: bool = True

    @field_validator("images")
    @classmethod
    def _known_images(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in NATURAL_IMAGES]
        if unknown or not names:
            raise ValueError(
                f"images {unknown or '(empty)'} are not bundled photographs; choose from "
                f"{list(NATURAL_IMAGES)}"
            )
        return names

    @model_validator(mode="after")
    def _check(self) -> Pretrain2DJob:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {self.patch_size}")
        if self.width % self.heads or self.decoder_width % self.decoder_heads:
            raise ValueError("width / decoder_width must be divisible by heads / decoder_heads")
        n = (self.img_size // self.patch_size) ** 2
        if round(n * (1 - self.mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} hides all {n} patches")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        return self

    def model_args(self) -> dict[str, object]:
        """timm VisionTransformer arguments of the encoder (JSON-ready)."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.width,
            "depth": self.depth,
            "num_heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": 0,
        }


# ----------------------------------------------------------------------------------------------
# data


def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as uint8 [H, W, 3] (grey ones replicated to RGB)."""
    import skimage.data

    if name not in NATURAL_IMAGES:
        raise ModelError(f"{name!r} is not a bundled photograph; choose from {NATURAL_IMAGES}")
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def photo_batches(
    images: Sequence[np.ndarray],
    cfg: Pretrain2DJob,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """Endless normalised batches [B, 3, S, S]: random resized crop, flip, jitter, greyscale."""
    from torchvision.transforms import v2

    augment = v2.Compose(
        [
            v2.RandomResizedCrop(cfg.img_size, scale=cfg.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.05)], p=0.8),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    tensors = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    while True:
        picks = torch.randint(len(tensors), (cfg.batch_size,), generator=generator).tolist()
        yield torch.stack([augment(tensors[i]) for i in picks])


# ----------------------------------------------------------------------------------------------
# model


def random_masking(
    batch: int, n: int, keep: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample random split of n tokens: (kept indices [B, keep], mask [B, n] True=hidden)."""
    noise = torch.rand(batch, n, generator=generator)
    order = noise.argsort(dim=1)
    kept = order[:, :keep]
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask.scatter_(1, kept, False)
    return kept, mask


class MAE2D(nn.Module):
    """MAE around a timm VisionTransformer encoder (saved alone, under timm's key names)."""

    def __init__(self, cfg: Pretrain2DJob) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(**cfg.model_args())
        grid = self.encoder.patch_embed.grid_size
        self.grid = tuple(int(g) for g in grid)
        with torch.no_grad():  # fixed 2D sin-cos, class position 0 (MAE)
            table = build_sincos2d_pos_embed(grid, cfg.width)
            self.encoder.pos_embed.zero_()
            self.encoder.pos_embed[:, 1:] = table
        self.encoder.pos_embed.requires_grad_(False)

        dw = cfg.decoder_width
        self.decoder_embed = nn.Linear(cfg.width, dw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer(
            "decoder_pos", build_sincos2d_pos_embed(grid, dw).unsqueeze(0), persistent=False
        )
        self.decoder = nn.ModuleList(
            Block(dw, cfg.decoder_heads, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dw, eps=1e-6)
        self.decoder_pred = nn.Linear(dw, cfg.patch_size**2 * 3)

    def patchify(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, N, p*p*3], tokens row-major (timm's order)."""
        p = self.cfg.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean squared error on the hidden patches."""
        enc = self.encoder
        b = images.shape[0]
        tokens = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        n = tokens.shape[1]
        keep = max(1, round(n * (1 - self.cfg.mask_ratio)))
        kept, mask = random_masking(b, n, keep, generator)
        tokens = torch.gather(tokens, 1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, tokens], 1)))

        x = self.decoder_embed(x)
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, kept[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        y = torch.cat([x[:, :1], full + self.decoder_pos], 1)
        for block in self.decoder:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]

        target = self.patchify(images)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# run


@dataclass
class Pretrain2DResult:
    checkpoint: Path
    metadata: Path
    model_name: str
    model_args: dict[str, object]
    losses: list[float]
    seconds: float

    @property
    def source(self) -> str:
        """The string :func:`neuroray.models.transfer.encoder_from_2d` takes."""
        return f"file:{self.checkpoint}"

    def summary(self) -> str:
        k = max(1, len(self.losses) // 10)
        first, last = float(np.mean(self.losses[:k])), float(np.mean(self.losses[-k:]))
        return (
            f"2D MAE: {len(self.losses)} steps in {self.seconds:.0f} s, loss {first:.3f} -> "
            f"{last:.3f} (mean of first / last {k}); checkpoint {self.checkpoint} "
            f"(use model.init={self.source})"
        )


def _lr_at(step: int, cfg: Pretrain2DJob) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_atomic(directory: Path, name: str, write) -> Path:  # noqa: ANN001 - a writer callback
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name


def pretrain_2d(cfg: Pretrain2DJob | None = None, **overrides: object) -> Pretrain2DResult:
    """Pretrain the 2D ViT described by ``cfg`` (plus keyword overrides) and save it."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    cfg = cfg or Pretrain2DJob()
    if overrides:
        cfg = Pretrain2DJob.model_validate({**cfg.model_dump(), **overrides})
    previous_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)  # torchvision's transforms draw from the global generator
        generator = torch.Generator().manual_seed(cfg.seed)
        photos = [load_photo(name) for name in cfg.images]
        model = MAE2D(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            weight_decay=0.0,
        )
        batches = photo_batches(photos, cfg, generator)
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="pretrain-2d", unit="step", disable=not cfg.progress)
        model.train()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = model(next(batches), generator)
            if not torch.isfinite(loss):
                raise ModelError(f"2D MAE loss became {loss.item()} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-cfg.log_every :]):.4f}")
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)

    out = Path(cfg.output)
    state = {k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    checkpoint = _save_atomic(out, CHECKPOINT_NAME, lambda tmp: save_file(state, tmp))
    meta = {
        "model_name": TIMM_MODEL_NAME,
        "model_args": cfg.model_args(),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "method": "mae",
        "config": cfg.model_dump(mode="json"),
        "losses": [round(v, 5) for v in losses],
        "seconds": round(seconds, 1),
    }
    metadata = _save_atomic(
        out,
        Path(CHECKPOINT_NAME).with_suffix(".json").name,
        lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)),
    )
    return Pretrain2DResult(
        checkpoint, metadata, TIMM_MODEL_NAME, cfg.model_args(), losses, seconds
    )


#: For the CLI convention (``neuroray models pretrain-2d [CONFIG] [key=value ...]``): the job's
#: config class and its runner, as the pretraining modules expose them.
JOB_CLASS = Pretrain2DJob


def run_job(cfg: Pretrain2DJob) -> Pretrain2DResult:
    """Run a validated config (what the CLI calls); print ``result.summary()`` afterwards."""
    return pretrain_2d(cfg)
