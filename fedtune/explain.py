"""The reference of every federation.yaml key, generated from the schema in fedtune/config.py, so the
documentation cannot drift from the code (`fedtune init --explain`, and the README's reference section)."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedtune.config import FederationConfig


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (directly, in a list, or in an optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see its keys)"
    return json.dumps(value, ensure_ascii=False)


def reference(model: type[BaseModel] = FederationConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every key of `model`, nested keys after their parent."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"  # the key as written in the file (async, not asynchronous)
        nested = _models_in(field.annotation)
        described = field.description or (nested[0].__doc__ if nested else "") or ""
        description = " ".join(described.strip().split("\n\n")[0].split())
        yield path, _type_name(field.annotation), _default(field), description
        for inner in nested:
            is_list = typing.get_origin(field.annotation) is list
            yield from reference(inner, f"{path}[]." if is_list else f"{path}.")


def reference_markdown() -> str:
    """The reference as a Markdown table."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, kind, default, description in reference():
        cells = [f"`{path}`", kind.replace("|", "\\|"), f"`{default}`" if default != "required" else "required",
                 description.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
