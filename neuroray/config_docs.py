"""Every key of a job config with its type, default and description, read from the pydantic model.

``neuroray <job> --help`` and ``neuroray config show <job>`` print this table, so what the CLI
says a job accepts is what :func:`neuroray.config.load_config` validates: nothing is restated.
Descriptions are the docstrings under the fields (``use_attribute_docstrings``) or the
section's class docstring.
"""

from __future__ import annotations

import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REQUIRED = "required"


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as written in an override
    type: str
    default: str  # JSON, or "required"
    description: str
    section: bool = False  # a nested section (its keys follow), not a value


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``float | None``, ``auto|bf16|off``, ``list[int]``."""
    annotation = _strip_annotated(annotation)
    origin = get_origin(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = get_args(annotation)
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_of(field: FieldInfo) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        try:
            return field.default_factory()  # type: ignore[call-arg]
        except TypeError:  # a factory that wants the validated data
            return PydanticUndefined
    return PydanticUndefined


def _json(value: Any, limit: int = 48) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _description(field: FieldInfo, annotation: Any) -> str:
    text = field.description or ""
    if not text and _is_model(annotation):
        text = annotation.__doc__ or ""
    return " ".join(text.split())


def describe_keys(model: type[BaseModel], prefix: str = "", defaults: Any = None) -> list[KeyDoc]:
    """Every key of ``model``, nested sections expanded (their keys prefixed ``section.``).

    ``defaults`` is the instance the enclosing model gives this section by default (its values
    win over the section class's own defaults).
    """
    keys: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        annotation = _strip_annotated(field.annotation)
        key = f"{prefix}{name}"
        default = _default_of(field)
        if defaults is not None and hasattr(defaults, name):
            default = getattr(defaults, name)
        if _is_model(annotation):
            keys.append(
                KeyDoc(
                    key,
                    annotation.__name__,
                    REQUIRED if default is PydanticUndefined else "{...}",
                    _description(field, annotation),
                    section=True,
                )
            )
            nested = default if isinstance(default, BaseModel) else None
            keys += describe_keys(annotation, f"{key}.", nested)
            continue
        keys.append(
            KeyDoc(
                key,
                type_name(annotation),
                REQUIRED if default is PydanticUndefined else _json(default),
                _description(field, annotation),
            )
        )
    return keys


def keys_table(model: type[BaseModel], *, full: bool = False, width: int = 100) -> str:
    """The keys as text: ``key  type  default`` and the description's first sentence (``full``:
    all of it, wrapped)."""
    rows = describe_keys(model)
    key_width = min(38, max(len(r.key) for r in rows) + 2) if rows else 10
    lines = []
    for row in rows:
        if row.section:
            head = f"  {row.key + ':':<{key_width}} section {row.type}"
            if row.default == REQUIRED:
                head += " (required)"
        else:
            head = f"  {row.key:<{key_width}} {row.type} = {row.default}"
        lines.append(head)
        text = row.description if full else _first_sentence(row.description)
        if text:
            lines += textwrap.wrap(
                text, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(`\"'])")


def _first_sentence(text: str, limit: int = 160) -> str:
    end = _SENTENCE_END.search(text)
    if end is not None:
        text = text[: end.start() + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
