"""Where a segmenter's ViT3D encoder starts: the one encoder-initialisation path.

``init`` (the ``model.init`` of a fine-tuning job) is one of

``scratch``                 random weights, the architecture of the job's ``encoder`` section;
``checkpoint:<path>``       any neuroray pretraining checkpoint (MAE, dbMiM, MS-Con; a run, a
                            checkpoint directory or its ``model.pt``): the architecture is read from
                            the checkpoint's job, the crop size is the job's, position embeddings
                            are resized (:func:`neuroray.models.unetr.load_encoder`);
``timm:<name>`` / ``file:<path>``  a 2D natural-image ViT inflated to 3D
                            (:func:`neuroray.models.transfer.encoder_from_2d`, METHODS.md section 3)
                            with ``inflate`` (center | average), ``keep_cls_token``,
                            ``fold_normalization`` and ``num_heads``; width / depth / heads follow
                            the 2D model, the encoder section's ``img_size``, ``patch_size`` and
                            ``drop_path`` are kept.

:func:`init_encoder` returns the encoder, the architecture actually built (what a checkpoint must
record so the model reloads without its source) and a one-line note.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator

from neuroray.config import StrictModel
from neuroray.errors import ConfigError
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.transfer import Inflate, encoder_from_2d
from neuroray.models.unetr import load_encoder
from neuroray.models.vit3d import ViT3D, ViTConfig, build_vit3d
from neuroray.paths import ModelInit

INIT_KINDS = ("checkpoint", "timm", "file")


class EncoderInit(StrictModel):
    """How an encoder is initialised; a segmenter config's (``model:``) init fields."""

    init: ModelInit = "scratch"
    """scratch | checkpoint:<neuroray run, checkpoint dir or model.pt> | timm:<2D ViT name> |
    file:<2D ViT weights (.safetensors/.pth/.npz)>"""
    inflate: Inflate = "center"
    """How a 2D patch embedding becomes 3D (timm:/file: inits only)."""
    keep_cls_token: bool = True
    """Keep the 2D model's class token as context (timm:/file: inits only)."""
    fold_normalization: bool = False
    """Fold the 2D model's input mean / std into the patch embedding (timm:/file: inits only)."""
    num_heads: int | None = Field(None, gt=0)
    """Attention heads of a file: 2D ViT without a sidecar (default width // 64)."""

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        kind, _, rest = value.partition(":")
        if value != "scratch" and not (kind in INIT_KINDS and rest):
            raise ValueError(
                f"model.init {value!r} must be 'scratch', 'checkpoint:<path>', "
                "'timm:<name>' or 'file:<path>'"
            )
        return value


def encoder_config_from_checkpoint(path: str, img_size: tuple[int, int, int]) -> ViTConfig:
    """The architecture of a pretraining checkpoint's encoder, at this job's crop size."""
    return _encoder_config(load_model_checkpoint(path), path, img_size)


def _encoder_config(checkpoint: dict, path: str, img_size: tuple[int, int, int]) -> ViTConfig:
    job = json.loads(checkpoint["job"])
    encoder = job.get("model", {}).get("encoder")
    if encoder is None:
        raise ConfigError(f"checkpoint {path} has no model.encoder section to copy")
    return ViTConfig.model_validate({**encoder, "img_size": list(img_size)})


def init_encoder(init: EncoderInit, encoder: ViTConfig) -> tuple[ViT3D, ViTConfig, str]:
    """The encoder ``init`` names, its actual architecture, and a one-line note.

    ``encoder`` is the configured architecture: used as is from scratch; only its crop size (and
    for 2D sources its patch size and drop path) when the weights come from elsewhere.
    """
    kind, _, source = init.init.partition(":")
    if kind == "checkpoint":
        checkpoint = load_model_checkpoint(source)
        encoder_cfg = _encoder_config(checkpoint, source, encoder.img_size)
        model = build_vit3d(encoder_cfg)
        report = load_encoder(model, checkpoint["state_dict"], prefix=checkpoint["encoder_prefix"])
        note = (
            f"encoder from {checkpoint['kind']} checkpoint step {checkpoint['step']}: "
            f"{report.summary()}"
        )
        return model, encoder_cfg, note
    if kind in ("timm", "file"):
        model, transfer = encoder_from_2d(
            init.init,
            img_size=encoder.img_size,
            patch_size=encoder.patch_size,
            inflate=init.inflate,
            keep_cls_token=init.keep_cls_token,
            fold_normalization=init.fold_normalization,
            drop_path=encoder.drop_path,
            num_heads=init.num_heads,
        )
        note = f"encoder inflated ({init.inflate}) from {init.init}: {transfer.summary()}"
        return model, transfer.config, note
    return build_vit3d(encoder), encoder, "encoder from scratch"
