"""A segmenter: the network a fine-tuning job trains and a blockwise job runs.

- :class:`SegmenterConfig`: the ``model:`` section of a segmentation job: ``name`` (an architecture
  in :data:`SEGMENTERS`), its encoder and decoder, and where the encoder starts (the
  :class:`~neuroray.models.encoder_init.EncoderInit` fields: scratch, a pretraining checkpoint or a
  2D ViT).
- :data:`SEGMENTERS`: architectures by name. ``"unetr"`` is registered here; another family (a
  U-Net, say) is a class with ``build`` and ``out_channels`` registered under its name, and a job
  selects it with ``model.name``.
- :func:`build_segmenter`: a config and an output-channel count -> the network with its encoder
  initialised, a one-line note, and the encoder architecture actually built.
- :func:`load_segmenter`: a fine-tuning checkpoint -> the network with its weights and a
  :class:`SegmenterCheckpoint` (task, output channels, window). It reads the checkpoint's job as
  plain data (its ``model`` section and ``task``), so inference never imports training code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pydantic import Field, field_validator
from torch import Tensor, nn

from neuroray.errors import NeurorayError, RegistryError
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.encoder_init import EncoderInit, init_encoder
from neuroray.models.unetr import UNETR
from neuroray.models.vit3d import ViTConfig
from neuroray.registry import Registry


class SegmenterArchitecture(Protocol):
    """What :data:`SEGMENTERS` holds (a class with these two static methods)."""

    def build(
        self, cfg: SegmenterConfig, out_channels: int
    ) -> tuple[nn.Module, str, ViTConfig]: ...

    def out_channels(self, state_dict: Mapping[str, Tensor]) -> int: ...


SEGMENTERS: Registry[SegmenterArchitecture] = Registry("segmenter")


class SegmenterConfig(EncoderInit):
    """A segmenter: its architecture, encoder, decoder width, and where the encoder starts."""

    name: str = "unetr"
    """The architecture, a name in ``SEGMENTERS``."""
    encoder: ViTConfig = ViTConfig(pos_embed="learned")
    feature_size: int = Field(16, ge=1)
    skip_connections: bool = True

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            SEGMENTERS.get(value)
        except RegistryError as err:
            raise ValueError(str(err)) from None
        return value


@SEGMENTERS.register("unetr")
class UNETRSegmenter:
    """UNETR (:mod:`neuroray.models.unetr`): the ViT3D encoder and a convolutional decoder."""

    @staticmethod
    def build(cfg: SegmenterConfig, out_channels: int) -> tuple[nn.Module, str, ViTConfig]:
        encoder, encoder_cfg, note = init_encoder(cfg, cfg.encoder)
        model = UNETR(
            encoder,
            out_channels=out_channels,
            skip_connections=cfg.skip_connections,
            feature_size=cfg.feature_size,
        )
        return model, note, encoder_cfg

    @staticmethod
    def out_channels(state_dict: Mapping[str, Tensor]) -> int:
        return int(state_dict["head.weight"].shape[0])


def build_segmenter(cfg: SegmenterConfig, out_channels: int) -> tuple[nn.Module, str, ViTConfig]:
    """The segmenter ``cfg`` names with its encoder initialised, a one-line note, and the
    encoder's actual architecture (from the checkpoint or 2D model when initialised from one)."""
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

    @property
    def window(self) -> tuple[int, int, int]:
        """The crop the network takes (z, y, x)."""
        return self.model.encoder.img_size


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
    return model, SegmenterCheckpoint(kind, int(state["step"]), task, out_channels, cfg)
