"""Pipelines: :class:`Compose`, specs -> transforms, the named default pipelines and MS-Con views."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field

from neuroray.config import StrictModel
from neuroray.errors import ConfigError, NeurorayError, RegistryError
from neuroray.platform.augment.base import (
    AUGMENTATIONS,
    Sample,
    Transform,
    as_float_image,
)
from neuroray.registry import closest

# --------------------------------------------------------------------------------------------
# Pipelines


class Compose:
    """Transforms applied in order with one generator; output arrays are always fresh."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | int) -> Sample:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        out = sample.replace(image=as_float_image(sample.image))
        for transform in self.transforms:
            out = transform(out, rng)
        return out.replace(
            image=_owned(out.image, sample.image),
            labels=_owned(out.labels, sample.labels),
            mask=_owned(out.mask, sample.mask),
        )

    def specs(self) -> list[dict[str, Any]]:
        """The spec list that rebuilds this pipeline (JSON / YAML serialisable)."""
        return [transform.spec() for transform in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _owned(array: np.ndarray | None, original: np.ndarray | None) -> np.ndarray | None:
    """A C-contiguous, writable array that shares no memory with the caller's input."""
    if array is None:
        return None
    if original is not None and np.may_share_memory(array, original):
        return np.array(array, order="C")
    if not array.flags.c_contiguous or not array.flags.writeable:
        return np.array(array, order="C")
    return array


def build_transform(spec: Mapping[str, Any], where: str = "augmentation") -> Transform:
    """One transform from ``{name: ..., **params}``; bad names and params raise helpful errors."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{name: flip, p: 0.5}}, got {spec!r}")
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"{where}: every augmentation needs a 'name' (one of {', '.join(AUGMENTATIONS)}); "
            f"got {spec!r}"
        )
    try:
        cls = AUGMENTATIONS.get(name)
    except RegistryError as err:
        raise RegistryError(f"{where}: {err}") from None
    try:
        return cls(**params)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def build_pipeline(specs: Sequence[Mapping[str, Any]] | str) -> Compose:
    """A :class:`Compose` from YAML-style specs, or from the name of a default list."""
    if isinstance(specs, str):
        specs = default_pipeline(specs)
    if not isinstance(specs, Sequence):
        raise ConfigError(
            f"augmentations must be a list of {{name: ..., params...}} mappings, got {specs!r}"
        )
    return Compose(
        [
            build_transform(spec, where=f"augmentation #{i} ({_name_of(spec)})")
            for i, spec in enumerate(specs)
        ]
    )


def _name_of(spec: Any) -> str:
    return str(spec.get("name", "?")) if isinstance(spec, Mapping) else "?"


DEFAULT_PIPELINES: dict[str, list[dict[str, Any]]] = {
    # Supervised EM (anisotropic ssTEM or isotropic FIB-SEM): dihedral symmetries, section-wise
    # intensity changes, and the classic serial-section defects.
    "em": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
        {"name": "contrast", "p": 0.5, "factor": [0.8, 1.2], "per_section": True},
        {"name": "brightness", "p": 0.5, "shift": [-0.08, 0.08], "per_section": True},
        {"name": "gamma", "p": 0.3, "gamma": [0.8, 1.25]},
        {"name": "gaussian_noise", "p": 0.3, "sigma": [0.01, 0.04]},
        {"name": "gaussian_blur", "p": 0.2, "sigma": [0.5, 1.2]},
        {"name": "missing_sections", "p": 0.1, "count": [1, 1]},
        {"name": "partially_missing_sections", "p": 0.1, "count": [1, 1]},
        {"name": "low_contrast_sections", "p": 0.1, "count": [1, 1]},
        {"name": "misalignment", "p": 0.2, "max_shift": 6},
        {"name": "elastic", "p": 0.3, "magnitude": [1.0, 3.0]},
    ],
    # Confocal LM of single neurons: no section artefacts; blur along z too, mild deformation.
    "lm": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
        {"name": "rescale", "p": 0.2, "factor": [0.9, 1.1]},
        {"name": "contrast", "p": 0.5},
        {"name": "brightness", "p": 0.5, "shift": [-0.05, 0.05]},
        {"name": "gamma", "p": 0.5},
        {"name": "gaussian_noise", "p": 0.3, "sigma": [0.01, 0.03]},
        {"name": "gaussian_blur", "p": 0.2, "sigma": [0.5, 1.0], "sigma_z": [0.0, 0.5]},
        {"name": "elastic", "p": 0.2, "magnitude": [1.0, 2.0]},
    ],
    # Masked-image modelling: geometric only, as MAE trains (flips, no photometric jitter). The
    # reconstruction target is the augmented crop, so defects and noise become things to predict.
    "mim": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
    ],
    # MS-Con: applied once to the crop, so the clean target and both views share orientation.
    "mscon_shared": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
    ],
    # MS-Con weak view: photometric only, small.
    "mscon_weak": [
        {"name": "contrast", "p": 0.5, "factor": [0.9, 1.1]},
        {"name": "brightness", "p": 0.5, "shift": [-0.05, 0.05]},
        {"name": "gaussian_noise", "p": 0.5, "sigma": [0.0, 0.02]},
    ],
    # MS-Con strong view: everything the network must learn to see through.
    "mscon_strong": [
        {"name": "contrast", "p": 0.8, "factor": [0.6, 1.4], "per_section": True},
        {"name": "brightness", "p": 0.8, "shift": [-0.15, 0.15], "per_section": True},
        {"name": "gamma", "p": 0.5, "gamma": [0.6, 1.6]},
        {"name": "gaussian_noise", "p": 0.8, "sigma": [0.02, 0.08]},
        {"name": "gaussian_blur", "p": 0.5, "sigma": [0.5, 2.0]},
        {"name": "motion_blur", "p": 0.3},
        {"name": "cutout", "p": 0.5},
        {"name": "missing_sections", "p": 0.5},
        {"name": "partially_missing_sections", "p": 0.3},
        {"name": "low_contrast_sections", "p": 0.3},
        {"name": "misalignment", "p": 0.5},
        {"name": "elastic", "p": 0.5},
    ],
}


def default_pipeline(name: str) -> list[dict[str, Any]]:
    """A copy of one of :data:`DEFAULT_PIPELINES` (em, lm, mscon_shared, mscon_weak, ...)."""
    if name not in DEFAULT_PIPELINES:
        hint = closest(name, list(DEFAULT_PIPELINES))
        did_you_mean = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"unknown augmentation list {name!r}{did_you_mean} "
            f"(known: {', '.join(DEFAULT_PIPELINES)})"
        )
    return copy.deepcopy(DEFAULT_PIPELINES[name])


def _checked_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate at config-load time and return the specs with every parameter spelled out."""
    try:
        return build_pipeline(specs).specs()
    except NeurorayError as err:
        raise ValueError(str(err)) from None


PipelineSpec = Annotated[list[dict[str, Any]], AfterValidator(_checked_specs)]
"""A config field holding an augmentation list; bad names or params fail when the config loads."""


class MSConAugmentConfig(StrictModel):
    """The explicit augmentation lists of MS-Con (the published code drew both from one list).

    ``shared`` is applied once to the crop (it becomes the clean reconstruction target); the
    ``weak`` and ``strong`` views are then drawn from it independently.
    """

    shared: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_shared"), validate_default=True
    )
    weak: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_weak"), validate_default=True
    )
    strong: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_strong"), validate_default=True
    )

    def pipelines(self) -> tuple[Compose, Compose, Compose]:
        return build_pipeline(self.shared), build_pipeline(self.weak), build_pipeline(self.strong)

    def views(self, sample: Sample, rng: np.random.Generator) -> tuple[Sample, Sample, Sample]:
        """(clean target, weak view, strong view) of one crop."""
        shared, weak, strong = self.pipelines()
        clean = shared(sample, rng)
        return clean, weak(clean, rng), strong(clean, rng)
