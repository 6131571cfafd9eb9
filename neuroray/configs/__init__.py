"""The job YAML files neuroray ships: ``neuroray/configs/*.yaml`` (package data).

They are the configs users run (``neuroray finetune em configs/finetune_em.yaml``; in a checkout
the top-level ``configs`` is a link to this folder) and the ones the demo and the benchmarks
load, with their differences as dotted overrides. An installed neuroray finds them here::

    from neuroray import configs

    job = configs.load(FinetuneJob, "finetune_em", ["run.steps=200"])
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from neuroray.config import load_config
from neuroray.errors import ConfigError
from neuroray.registry import closest

M = TypeVar("M", bound=BaseModel)

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs, by name (file name without ``.yaml``)."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def path(name: str) -> Path:
    """The file of shipped config ``name`` (``"finetune_em"`` or ``"finetune_em.yaml"``)."""
    stem = name.removesuffix(".yaml")
    file = HERE / f"{stem}.yaml"
    if not file.is_file():
        hint = closest(stem, names())
        raise ConfigError(
            f"no shipped config {name!r}"
            + (f"; did you mean {hint!r}?" if hint else f"; shipped: {', '.join(names())}")
        )
    return file


def load(model: type[M], name: str, overrides: Iterable[str] = ()) -> M:
    """Shipped config ``name`` as a ``model`` job, with dotted ``overrides`` applied as the CLI
    applies them (``neuroray finetune em configs/finetune_em.yaml run.steps=200``)."""
    return load_config(model, path(name), overrides)
