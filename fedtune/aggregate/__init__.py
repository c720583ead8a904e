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

if TYPE_CHECKING:
    from fedtune.aggregate.base import Method

# name → (module, class, one line for --help); the modules are imported when a method is used.
METHODS: dict[str, tuple[str, str, str]] = {
    "fedavg": ("mean", "FedAvg",
               "weighted mean of A and of B separately (what most tools do; inexact, the error is recorded)"),
    "ffa": ("mean", "FFA",
               "A frozen at the seeded init, sites train B only; B ← Σp_k B_k (exact, half the traffic)"),
    "svd": ("lora", "Svd",
               "exact weighted mean of the products B·A, re-factored to the federation's rank (best rank-r fit)"),
    "stack": ("lora", "Stack",
               "FLoRA stacking: exact mean of the products, the version's rank grows to the sum of the sites' ranks"),
    "trimmed-mean": ("robust", "TrimmedMean",
               "coordinate-wise mean after dropping the ⌊trim·K⌋ largest and smallest values (unweighted)"),
    "weighted-trimmed-mean": ("robust", "WeightedTrimmedMean",
               "coordinate-wise weighted mean after removing trim of the weight mass from each tail"),
    "median": ("robust", "Median",
               "coordinate-wise median (mean of the two middle values when K is even; unweighted)"),
    "krum": ("distance", "Krum",
               "the one update with the smallest sum of squared distances to its n−f−2 nearest others (f = byzantine)"),
    "multi-krum": ("distance", "MultiKrum",
               "weighted mean of the keep (default n−f) updates with the best Krum scores"),
    "geomedian": ("distance", "GeoMedian",
               "weighted geometric median of the whole updates (smoothed Weiszfeld, RFA)"),
    "centered-clip": ("distance", "CenteredClip",
               "centered clipping from the parent: v ← v + mean_i clip_τ(δ_i − v), τ = radius or the median update norm"),
    "ties": ("merging", "Ties",
               "TIES merging: keep the top density of each delta by magnitude, elect signs, average the agreeing entries"),
    "dare": ("merging", "Dare",
               "DARE: random drop (keep density, rescale 1/density) then weighted sum; seeded per key"),
    "dare-ties": ("merging", "DareTies",
               "DARE random drop and rescale, then TIES sign election and disjoint merge; seeded per key"),
}

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
