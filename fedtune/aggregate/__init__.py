"""Aggregation: a registry of methods (one file per family) and the streaming round stage."""

from __future__ import annotations

import dataclasses
import importlib

from fedtune.aggregate.base import CoordinateMethod, LinearMethod, LoraMethod, Method
from fedtune.config import AggregationSettings
from fedtune.errors import BadInput

# name → (module, class); the modules are imported when a method is used.
METHODS: dict[str, tuple[str, str]] = {
    "fedavg": ("mean", "FedAvg"),
    "ffa": ("mean", "FFA"),
    "svd": ("lora", "Svd"),
    "stack": ("lora", "Stack"),
    "trimmed-mean": ("robust", "TrimmedMean"),
    "weighted-trimmed-mean": ("robust", "WeightedTrimmedMean"),
    "median": ("robust", "Median"),
    "krum": ("distance", "Krum"),
    "multi-krum": ("distance", "MultiKrum"),
    "geomedian": ("distance", "GeoMedian"),
    "centered-clip": ("distance", "CenteredClip"),
    "ties": ("merging", "Ties"),
    "dare": ("merging", "Dare"),
    "dare-ties": ("merging", "DareTies"),
}

# A method's constructor field → the federation setting that fills it.
SETTING_OF_FIELD = {
    "trim": "trim", "byzantine": "byzantine", "keep": "keep", "density": "density",
    "radius": "clip_radius", "iterations": "clip_iterations",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise BadInput(f"--method: unknown method '{name}'; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name]
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
    return "\n\n".join(f"  {name}: {method_class(name).summary}" for name in METHODS)


from fedtune.aggregate.engine import aggregate_round  # noqa: E402  (engine imports the registry above)

__all__ = ["METHODS", "CoordinateMethod", "LinearMethod", "LoraMethod", "Method", "aggregate_round",
           "make_method", "method_class", "methods_help"]
