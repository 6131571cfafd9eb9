"""Pretraining methods by name (timm style): ``mae``, ``mscon``, ``dbmim`` and any later one.

Each method names its job config class (a pydantic job model), its run function (job -> Ray
Train ``Result``) and a one-line help. ``neuroray pretrain METHOD CONFIG.yaml`` is built from
this registry, and anything else that runs a pretraining by name looks it up here::

    method = PRETRAIN_METHODS.get("mae")
    result = method.run(load_config(method.job_class, "configs/pretrain_mae.yaml"))

A method registers a *loader* that imports its home on first use, so that listing the methods
(``neuroray --help``) imports neither torch nor RLlib::

    @register_method("mae", help="MAE-3D with random / tube / block masking")
    def _mae():
        from neuroray.trainers.pretrain import MAEJob, pretrain

        return MAEJob, pretrain

The methods whose home is this layer (``mae``, ``mscon``) are registered below. dbMiM's home is
the RL side, which registers ``dbmim`` in :mod:`neuroray.agents` (its package ``__init__``, so the
registration is cheap): trainers must not import agents, so a caller that wants every method
imports :mod:`neuroray.agents` first, as the CLI does. A new method registers itself the same way,
from its own package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neuroray.registry import Registry

if TYPE_CHECKING:
    from neuroray.trainers.settings import TrainJob

RunFn = Callable[[Any], Any]
Loader = Callable[[], tuple["type[TrainJob]", RunFn]]


@dataclass(frozen=True)
class PretrainMethod:
    """One pretraining method: its name, one-line help, and (loaded on first use) its job config
    class and run function."""

    name: str
    help: str
    load: Loader

    @property
    def job_class(self) -> type[TrainJob]:
        """The pydantic job model a config YAML for this method validates against."""
        return self.load()[0]

    @property
    def run(self) -> RunFn:
        """``run(job)``: starts what the method needs, trains, returns Ray Train's Result."""
        return self.load()[1]


PRETRAIN_METHODS: Registry[PretrainMethod] = Registry("pretraining method")


def register_method(name: str, *, help: str) -> Callable[[Loader], Loader]:  # noqa: A002
    """Register the loader it decorates as pretraining method ``name`` (see the module docstring)."""

    def decorator(load: Loader) -> Loader:
        PRETRAIN_METHODS.register(name)(PretrainMethod(name, help, functools.cache(load)))
        return load

    return decorator


# ---------------------------------------------------------------------- this layer's methods
@register_method("mae", help="MAE-3D with random / tube / block masking")
def _mae() -> tuple[type[TrainJob], RunFn]:
    from neuroray.trainers.pretrain import MAEJob, pretrain

    return MAEJob, pretrain


@register_method("mscon", help="MS-Con: Siamese multiscale consistency")
def _mscon() -> tuple[type[TrainJob], RunFn]:
    from neuroray.trainers.mscon import MSConJob, run_mscon

    return MSConJob, run_mscon
