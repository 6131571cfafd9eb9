"""A segmenter: the network a fine-tuning job trains and a blockwise job runs.

- :class:`SegmenterConfig`: the ``model:`` section of a segmentation job: ``name`` (an architecture
  in :data:`SEGMENTERS`), its encoder and decoder, and where the encoder starts (the
  :class:`~neuroray.models.encoder_init.EncoderInit` fields: scratch, a pretraining checkpoint or a
  2D ViT).
- :data:`SEGMENTERS`: architectures by name: ``"unetr"`` (a ViT3D encoder, initialised from
  scratch, any pretraining checkpoint or a 2D ViT) and ``"unet"`` (the residual 3D U-Net of
  :mod:`neuroray.models.unet`, from scratch). Another family is a class with the
  :class:`SegmenterArchitecture` methods registered under its name; a job selects it with
  ``model.name``.
- :func:`build_segmenter`: a config and an output-channel count -> the network with its encoder
  initialised, a one-line note, and the config actually built (a pretrained encoder's
  architecture is read from its checkpoint).
- :func:`load_segmenter`: a fine-tuning checkpoint -> the network with its weights and a
  :class:`SegmenterCheckpoint` (task, output channels, window). It reads the checkpoint's job as
  plain data (its ``model`` section and ``task``), so inference never imports training code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from neuroray.errors import NeurorayError, RegistryError
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.encoder_init import EncoderInit, init_encoder
from neuroray.models.unet import UNet3D, UNetConfig
from neuroray.models.unetr import UNETR
from neuroray.models.vit3d import ViTConfig
from neuroray.registry import Registry


class SegmenterArchitecture(Protocol):
    """What :data:`SEGMENTERS` holds (a class with these static methods)."""

    pretrained_encoder: bool
    """Whether ``init`` may name pretrained weights (a ViT3D encoder) or only ``scratch``."""
    window_key: str
    """Where in the ``model:`` section the window is set (``encoder.img_size``, ``unet.window``)."""

    def build(
        self, cfg: SegmenterConfig, out_channels: int
    ) -> tuple[nn.Module, str, SegmenterConfig]: ...

    def out_channels(self, state_dict: Mapping[str, Tensor]) -> int: ...

    def window(self, cfg: SegmenterConfig) -> tuple[int, int, int] | None: ...


SEGMENTERS: Registry[SegmenterArchitecture] = Registry("segmenter")


class SegmenterConfig(EncoderInit):
    """A segmenter: its architecture, encoder, decoder width, and where the encoder starts."""

    name: str = "unetr"
    """The architecture, a name in ``SEGMENTERS``."""
    encoder: ViTConfig = ViTConfig(pos_embed="learned")
    """UNETR's ViT3D encoder."""
    feature_size: int = Field(16, ge=1)
    """UNETR's decoder width at full resolution."""
    skip_connections: bool = True
    """UNETR's skips from intermediate encoder blocks."""
    unet: UNetConfig = UNetConfig()
    """The U-Net's levels, factors, normalisation and window (``name: unet``)."""

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            SEGMENTERS.get(value)
        except RegistryError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _init_fits_architecture(self) -> SegmenterConfig:
        if self.init != "scratch" and not SEGMENTERS.get(self.name).pretrained_encoder:
            raise ValueError(
                f"model.name={self.name} has no ViT encoder to initialise: model.init must be "
                f"scratch, not {self.init} (use model.name=unetr for pretrained encoders)"
            )
        return self

    @property
    def window(self) -> tuple[int, int, int] | None:
        """The crop the network takes (z, y, x); None until a job fills it (U-Net)."""
        return SEGMENTERS.get(self.name).window(self)

    @property
    def window_key(self) -> str:
        """The ``model.`` key that sets :attr:`window`."""
        return f"model.{SEGMENTERS.get(self.name).window_key}"

    def with_window(self, window: tuple[int, int, int]) -> SegmenterConfig:
        """This config with its window set (validated again: the window must fit the network)."""
        data = self.model_dump()
        *parents, last = SEGMENTERS.get(self.name).window_key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = list(window)
        return type(self).model_validate(data)


class HeadSegmenter:
    """What the registered architectures share: logits from a 1x1x1 conv called ``head``, and a
    window read from ``window_key`` in the config."""

    window_key = ""

    @staticmethod
    def out_channels(state_dict: Mapping[str, Tensor]) -> int:
        return int(state_dict["head.weight"].shape[0])

    @classmethod
    def window(cls, cfg: SegmenterConfig) -> tuple[int, int, int] | None:
        node: object = cfg
        for part in cls.window_key.split("."):
            node = getattr(node, part)
        return node  # type: ignore[return-value]


@SEGMENTERS.register("unetr")
class UNETRSegmenter(HeadSegmenter):
    """UNETR (:mod:`neuroray.models.unetr`): the ViT3D encoder and a convolutional decoder."""

    pretrained_encoder = True
    window_key = "encoder.img_size"

    @staticmethod
    def build(cfg: SegmenterConfig, out_channels: int) -> tuple[nn.Module, str, SegmenterConfig]:
        encoder, encoder_cfg, note = init_encoder(cfg, cfg.encoder)
        model = UNETR(
            encoder,
            out_channels=out_channels,
            skip_connections=cfg.skip_connections,
            feature_size=cfg.feature_size,
        )
        return model, note, cfg.model_copy(update={"encoder": encoder_cfg})


@SEGMENTERS.register("unet")
class UNetSegmenter(HeadSegmenter):
    """The residual 3D U-Net (:mod:`neuroray.models.unet`), trained from scratch."""

    pretrained_encoder = False
    window_key = "unet.window"

    @staticmethod
    def build(cfg: SegmenterConfig, out_channels: int) -> tuple[nn.Module, str, SegmenterConfig]:
        model = UNet3D(cfg.unet, out_channels)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        channels = "-".join(str(c) for c in cfg.unet.level_channels)
        return model, f"U-Net {channels} ({params:.1f} M parameters) from scratch", cfg


def build_segmenter(
    cfg: SegmenterConfig, out_channels: int
) -> tuple[nn.Module, str, SegmenterConfig]:
    """The segmenter ``cfg`` names with its encoder initialised, a one-line note, and the config
    actually built (a pretrained encoder's architecture comes from its checkpoint or 2D model)."""
    return SEGMENTERS.get(cfg.name).build(cfg, out_channels)


@dataclass(frozen=True)
class SegmenterCheckpoint:
    """What inference needs to know about a fine-tuned segmenter besides its weights."""

    kind: str
    step: int
    task: str
    """em | mito | lm: the job the segmenter was fine-tuned for."""
    out_channels: int
    model: SegmenterConfig
    """The architecture (``init`` is ``scratch``: the weights come from the checkpoint)."""

    threshold: float | None
    """The post-processing threshold the fine-tune chose on validation (waterz merge threshold
    for instances, the foreground cut for masks); ``segment`` uses it unless told otherwise.
    None for checkpoints written before it was recorded, or without validation."""

    @property
    def window(self) -> tuple[int, int, int]:
        """The crop the network takes (z, y, x)."""
        window = self.model.window
        assert window is not None, "a fine-tuned segmenter records its window"
        return window


def load_segmenter(checkpoint: str) -> tuple[nn.Module, SegmenterCheckpoint]:
    """The fine-tuned segmenter of a checkpoint (weights loaded, eval mode) and what it is."""
    state = load_model_checkpoint(checkpoint)
    kind = str(state["kind"])
    if not kind.startswith("finetune_"):
        raise NeurorayError(
            f"{checkpoint} is a {kind} checkpoint; segmenting needs a fine-tuned one "
            "(neuroray finetune em|mito|lm)"
        )
    job = json.loads(state["job"])
    section = {k: v for k, v in job.get("model", {}).items() if k in SegmenterConfig.model_fields}
    cfg = SegmenterConfig.model_validate({**section, "init": "scratch"})
    architecture = SEGMENTERS.get(cfg.name)
    out_channels = architecture.out_channels(state["state_dict"])
    model, _, _ = architecture.build(cfg, out_channels)
    model.load_state_dict(state["state_dict"])
    model.eval()
    task = job.get("task") or kind.removeprefix("finetune_")
    threshold = state.get("postprocess", {}).get("threshold")
    return model, SegmenterCheckpoint(
        kind,
        int(state["step"]),
        task,
        out_channels,
        cfg,
        None if threshold is None else float(threshold),
    )
