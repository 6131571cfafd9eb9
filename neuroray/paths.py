"""Local paths in job configs: made absolute where the user typed them, checked before Ray starts.

Jobs run inside Ray workers whose working directory is not the user's (Train and Tune move their
workers into ``/tmp/ray/session_*/artifacts/...``), so a relative ``layers/raw`` typed on the
command line would be opened somewhere else. Every config field that names a local file or folder
is typed :data:`InputPath` or :data:`OutputPath`; validating it in the driver makes it absolute
against the current directory (URLs such as ``gs://`` pass unchanged), and validating it again in
a worker leaves the absolute path as it is. :func:`check_inputs` then says which input is missing
before any work starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import AfterValidator, BaseModel

from neuroray.errors import ConfigError

# ``checkpoint:runs/mae`` and ``file:vit.safetensors`` (model.init) hold a path after the prefix
_PATH_PREFIXES = ("checkpoint:", "file:")
# longest first, so file:// is seen before file:
_ALL_PREFIXES = ("precomputed://", "zarr://", "file://", *_PATH_PREFIXES)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


@dataclass(frozen=True)
class PathRole:
    """Marks a config field as a local path: ``input`` (must exist) or ``output``."""

    kind: str
    prefixed: bool = False
    """Only values with a ``checkpoint:`` / ``file:`` prefix are paths (e.g. ``model.init``)."""


def absolute(value: str, base: str | os.PathLike[str] | None = None) -> str:
    """``value`` with a local path made absolute against ``base`` (default: the current
    directory); URLs, ``precomputed://`` of a URL and already absolute paths are unchanged."""
    for prefix in _ALL_PREFIXES:
        if value.startswith(prefix) and not _URL.match(value[len(prefix) :]):
            rest = value[len(prefix) :]
            return prefix + (absolute(rest, base) if rest else rest)
    if not value or _URL.match(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base or os.getcwd()) / path
    return os.path.normpath(path)


def local_file(value: str) -> Path | None:
    """The file or folder a path value names on this machine (None for a URL or hub name)."""
    for prefix in _ALL_PREFIXES:
        if value.startswith(prefix):
            value = value[len(prefix) :]
    if not value or _URL.match(value):
        return None
    return Path(value.partition("#")[0]).expanduser()


def is_remote(path: str) -> bool:
    """A storage path or checkpoint on a bucket (``s3://``, ``gs://``), not ``file://``."""
    return "://" in path and not path.startswith("file://")


def _resolved(role: PathRole):
    def resolve(value: str | None) -> str | None:
        if value is None or (role.prefixed and not value.startswith(_PATH_PREFIXES)):
            return value
        return absolute(value)

    return resolve


InputPath = Annotated[str, PathRole("input"), AfterValidator(_resolved(PathRole("input")))]
"""A local file or folder a job reads (or a URL); made absolute, checked by check_inputs."""
OutputPath = Annotated[str, PathRole("output"), AfterValidator(_resolved(PathRole("output")))]
"""A local folder a job writes (or a URL); made absolute."""
ModelInit = Annotated[
    str,
    PathRole("input", prefixed=True),
    AfterValidator(_resolved(PathRole("input", prefixed=True))),
]
"""``scratch``, ``timm:<name>`` or ``checkpoint:`` / ``file:`` + a path (made absolute)."""


def plain_name(value: str) -> str:
    """A run or sweep name: one folder inside storage_path, never a path out of it."""
    if not _PLAIN_NAME.match(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} must be a plain folder name (letters, digits, _ . = + -; no '/' and "
            "no leading '.'), so the run stays inside storage_path"
        )
    return value


RunName = Annotated[str, AfterValidator(plain_name)]


def _roles(annotation: Any) -> Iterator[PathRole]:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathRole):
            yield meta
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        yield from _roles(arg)


def path_fields(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, PathRole, str]]:
    """(dotted key, role, value) of every path-typed field set in ``config``, nested models too."""
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from path_fields(value, key + ".")
            continue
        roles = [*(m for m in field.metadata if isinstance(m, PathRole)), *_roles(field.annotation)]
        if roles and isinstance(value, str):
            yield key, roles[0], value


def check_inputs(config: BaseModel) -> None:
    """Raise a ConfigError naming every local input of ``config`` that does not exist."""
    missing = []
    for key, role, value in path_fields(config):
        if role.kind != "input" or (role.prefixed and not value.startswith(_PATH_PREFIXES)):
            continue
        path = local_file(value)
        if path is not None and not path.exists():
            missing.append(f"{key}={value}")
    if missing:
        raise ConfigError(
            f"input not found: {', '.join(missing)} (relative paths are read from "
            f"{os.getcwd()}, the directory the command ran in)"
        )
