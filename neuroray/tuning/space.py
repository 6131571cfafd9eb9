"""The search-space language of a sweep: ``{kind: args}`` domains over a job's dotted keys.

A search space maps dotted job keys (or ``augment_strength``) to a fixed value or a one-key
mapping naming a domain (:data:`DOMAINS`: uniform, loguniform, quniform, qloguniform, randint,
lograndint, choice, grid). Each domain also lists example values, which are validated against the
job before any trial starts, so a wrong key or type fails at once and names the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from neuroray.config import apply_overrides
from neuroray.errors import ConfigError
from neuroray.platform.augment import build_pipeline
from neuroray.registry import Registry

AUGMENT_STRENGTH = "augment_strength"
"""A search-space key that is not a job key: it scales the probability ``p`` of every transform
in ``data.augment`` (capped at 1); 0 turns augmentation off."""


@dataclass(frozen=True)
class DomainKind:
    """How one ``{kind: args}`` entry of a search space becomes a Tune domain.

    ``examples`` lists values checked against the job before any trial starts, so a wrong key
    or type fails at once and names the key.
    """

    build: Callable[[list[Any]], Any]
    examples: Callable[[list[Any]], list[Any]]
    arity: int | None = None  # fixed number of arguments, None = a non-empty list of values


DOMAINS: Registry[DomainKind] = Registry("search domain")


def _tune():
    from ray import tune

    return tune


def _register(name: str, kind: DomainKind) -> None:
    DOMAINS.register(name)(kind)


_register("uniform", DomainKind(lambda a: _tune().uniform(*a), lambda a: list(a), 2))
_register("loguniform", DomainKind(lambda a: _tune().loguniform(*a), lambda a: list(a), 2))
_register("quniform", DomainKind(lambda a: _tune().quniform(*a), lambda a: a[:2], 3))
_register("qloguniform", DomainKind(lambda a: _tune().qloguniform(*a), lambda a: a[:2], 3))
_register("randint", DomainKind(lambda a: _tune().randint(*a), lambda a: [a[0], a[1] - 1], 2))
_register("lograndint", DomainKind(lambda a: _tune().lograndint(*a), lambda a: [a[0], a[1] - 1], 2))
_register("choice", DomainKind(lambda a: _tune().choice(list(a)), lambda a: list(a)))
_register("grid", DomainKind(lambda a: _tune().grid_search(list(a)), lambda a: list(a)))


def domain_entry(key: str, spec: Any) -> tuple[str, list[Any]] | None:
    """``(kind, args)`` when ``spec`` is a one-key ``{kind: args}`` mapping naming a domain."""
    if not (isinstance(spec, Mapping) and len(spec) == 1):
        return None
    kind, args = next(iter(spec.items()))
    if kind not in DOMAINS:
        return None
    domain = DOMAINS.get(kind)
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search_space.{key}: {kind} needs a list of arguments, got {args!r}")
    if domain.arity is not None and len(args) != domain.arity:
        raise ConfigError(
            f"search_space.{key}: {kind} takes {domain.arity} arguments, got {len(args)} ({args})"
        )
    if domain.arity is not None and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in args
    ):
        raise ConfigError(f"search_space.{key}: {kind} arguments must be numbers, got {args}")
    if kind in ("uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint"):
        low, high = args[0], args[1]
        if not low < high or (kind.startswith(("log", "qlog")) and low <= 0):
            raise ConfigError(
                f"search_space.{key}: {kind} bounds {args[:2]} must satisfy 0 < low < high "
                "for log domains and low < high otherwise"
            )
    return kind, args


def build_param_space(search_space: Mapping[str, Any]) -> dict[str, Any]:
    """The Tune ``param_space`` of a YAML search space (fixed values pass through)."""
    space = {}
    for key, spec in search_space.items():
        entry = domain_entry(key, spec)
        space[key] = spec if entry is None else DOMAINS.get(entry[0]).build(entry[1])
    return space


def example_values(search_space: Mapping[str, Any]) -> dict[str, list[Any]]:
    """For each key, the values checked against the job before the sweep starts."""
    examples = {}
    for key, spec in search_space.items():
        entry = domain_entry(key, spec)
        examples[key] = [spec] if entry is None else DOMAINS.get(entry[0]).examples(entry[1])
    return examples


def scale_augmentation(augment: str | list[dict[str, Any]], strength: float) -> list[dict]:
    """``augment`` (a named list or specs) with every probability ``p`` scaled, capped at 1."""
    if strength < 0:
        raise ConfigError(f"{AUGMENT_STRENGTH} must be >= 0, got {strength}")
    if strength == 0 or not augment:
        return []
    specs = build_pipeline(augment).specs()
    for spec in specs:
        spec["p"] = min(1.0, float(spec.get("p", 1.0)) * strength)
    return specs


def job_overrides(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key.sub=value`` strings from a nested and/or dotted mapping of job keys."""
    lines = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            lines += job_overrides(value, f"{path}.")
        else:
            lines.append(f"{path}={json.dumps(value)}")
    return lines


def apply_params(job_data: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Job data (plain YAML data) with one trial's sampled parameters set."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items() if k != AUGMENT_STRENGTH]
    data = apply_overrides(job_data, overrides)
    if AUGMENT_STRENGTH in params:
        data.setdefault("data", {})
        data["data"]["augment"] = scale_augmentation(
            data["data"].get("augment", []), float(params[AUGMENT_STRENGTH])
        )
    return data
