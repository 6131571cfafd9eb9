"""Typed job configs: pydantic v2 models loaded from YAML with dotted command-line overrides.

Every job is one :class:`StrictModel`. Unknown keys and wrong types fail before any work starts,
with a message that names the key and the closest valid one. A config dumps to JSON and reloads
identically (:func:`to_json` / :func:`from_json`), so it ships verbatim to actors and Ray jobs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from neuroray.errors import ConfigError
from neuroray.registry import closest

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,  # the docstring under a field is its description (--help)
    )


class RaySettings(StrictModel):
    """Where the job runs: embedded local Ray (address None) or a cluster."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int | None = 512


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = safe_yaml(raw, f"override {text!r}") if raw.strip() else None
    except yaml.YAMLError as err:
        message = " ".join(str(err).split())  # yaml's message spans lines
        raise ConfigError(f"override {text!r}: value is not valid YAML ({message})") from None
    return path, value


#: Largest config file (or override) read; a job config is a few KiB.
MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """yaml's safe loader without anchors and aliases: no alias bomb, no self-reference."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(
                f"{self.name}: YAML anchors and aliases are not supported (found {kind}"
                f"{event.anchor} at line {event.start_mark.line + 1}); write the values out"
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML text without aliases, within :data:`MAX_YAML_BYTES`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_YAML_BYTES // 1024} KiB; not a config")
    loader = _NoAliasLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a timestamp like 2024-13-45
        raise ConfigError(f"{source}: a value is not valid ({err})") from None
    finally:
        loader.dispose()


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set."""
    result = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def override(key: str, value: Any) -> str:
    """The ``key.sub=value`` override that sets ``key`` to ``value`` (any JSON-able value).

    The value is written as JSON, which YAML reads back unchanged, so a path or a name with
    ``:``, ``#`` or spaces in it survives :func:`parse_override`.
    """
    return f"{key}={json.dumps(value)}"


def _submodel_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc`` (so we can list its valid keys)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def describe_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem, each naming the dotted key (and the closest valid key if unknown)."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        key = ".".join(str(part) for part in loc) or "<root>"
        if problem["type"] == "extra_forbidden":
            holder = _submodel_at(model, loc)
            valid = sorted(holder.model_fields) if holder is not None else []
            hint = closest(str(loc[-1]), valid)
            prefix = ".".join(str(part) for part in loc[:-1])
            suggestion = f"{prefix}.{hint}" if prefix and hint else hint
            msg = f"unknown key {key!r}"
            if suggestion:
                msg += f"; did you mean {suggestion!r}?"
            elif valid:
                msg += f" (valid keys here: {', '.join(valid)})"
            lines.append(msg)
        else:
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            if isinstance(given, dict):  # a whole section failed a cross-field check
                lines.append(message if not loc else f"{key}: {message}")
            else:
                lines.append(f"key {key!r}: {message} (got {given!r})")
    return "; ".join(lines)


def validate(model: type[M], data: Mapping[str, Any], source: str = "config") -> M:
    """Validate plain data into ``model``, turning pydantic's errors into a :class:`ConfigError`."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(model, err)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    source = f"config file {str(path)!r}"
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_YAML_BYTES // 1024} KiB; not a config")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not a UTF-8 text file (binary?)") from None
    try:
        data = safe_yaml(text, source) or {}
    except yaml.YAMLError as err:
        message = " ".join(str(err).split())  # yaml's message spans lines
        raise ConfigError(f"{source} is not valid YAML: {message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(model: type[M], path: str | Path | None = None, overrides: Iterable[str] = ()) -> M:
    """Load ``model`` from a YAML file (or its defaults) with ``key.sub=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else model.__name__
    return validate(model, apply_overrides(data, overrides), source)


def to_json(config: BaseModel) -> str:
    return config.model_dump_json()


def from_json(model: type[M], text: str) -> M:
    return validate(model, json.loads(text), model.__name__)


def dump_yaml(config: BaseModel, path: str | Path) -> None:
    """Write a config as YAML that :func:`load_config` reads back identically."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
