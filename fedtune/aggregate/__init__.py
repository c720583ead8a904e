"""Aggregation: a registry of methods (one file per family) and the streaming round stage.

This module stays free of torch, so that `fedtune aggregate --help` lists the methods in a blink; the method
classes and the engine are imported when a round runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

from fedtune.config import AggregationSettings
from fedtune.errors import BadInput
from fedtune.methods import METHODS

if TYPE_CHECKING:
    from fedtune.aggregate.base import Method

# A method's constructor field → the federation setting that fills it.
SETTING_OF_FIELD = {
    "trim": "trim", "byzantine": "byzantine", "keep": "keep", "density": "density",
    "radius": "clip_radius", "iterations": "clip_iterations",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise BadInput(f"--method: unknown method '{name}'; choose one of {', '.join(METHODS)}")
    module, cls, _ = METHODS[name]
    return getattr(importlib.import_module(f"fedtune.aggregate.{module}"), cls)


def make_method(name: str, settings: AggregationSettings | None = None, seed: int = 0) -> Method:
    """The method `name` with its parameters taken from `settings` (the federation's aggregation block)."""
    cls = method_class(name)
    settings = settings or AggregationSettings()
    values = {}
    for field in dataclasses.fields(cls):
        if field.name == "seed":
            values["seed"] = seed
        elif field.name in SETTING_OF_FIELD:
            values[field.name] = getattr(settings, SETTING_OF_FIELD[field.name])
    return cls(**values)


def methods_help() -> str:
    """One line per method, for `fedtune aggregate --help`."""
    return "\n\n".join(f"  {name}: {summary}" for name, (_, _, summary) in METHODS.items())


_LAZY = {"aggregate_round": "fedtune.aggregate.engine", "Method": "fedtune.aggregate.base",
         "LinearMethod": "fedtune.aggregate.base", "CoordinateMethod": "fedtune.aggregate.base",
         "LoraMethod": "fedtune.aggregate.base"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "CoordinateMethod", "LinearMethod", "LoraMethod", "Method", "aggregate_round",
           "make_method", "method_class", "methods_help"]
