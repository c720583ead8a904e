"""Aggregation: a registry of methods (one file per family) and the streaming round stage.

This module stays free of torch, so that `fedtune aggregate --help` lists the methods in a blink; the method
classes and the engine are imported when a round runs, with the threads set for it (`round_threads`). A round of
a linear rule (fedavg, ffa, krum, ...) is merged with numpy alone; the others import torch through `round_torch`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import TYPE_CHECKING

from fedtune.errors import BadInput
from fedtune.methods import METHODS

if TYPE_CHECKING:
    from fedtune.aggregate.base import Method
    from fedtune.config import AggregationSettings

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
    from fedtune.config import AggregationSettings  # pydantic: not needed by `fedtune aggregate --help`

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


THREADS_ENV = "FEDTUNE_THREADS"


def round_threads() -> tuple[int, str]:
    """(threads, why): how many threads torch's operations use while a round is merged.

    $FEDTUNE_THREADS when set; else the cores the machine's load leaves idle, at least one. The merge is
    elementwise and memory-bound, so a second thread gains little even on an idle machine, while a parallel
    operation whose worker another process has descheduled waits for it: on 2 busy cores, `fedtune aggregate`
    of 16 updates of 78 MB took 105 s with 2 threads and 20 s with one (benchmarks/README.md, aggregate).
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BadInput(f"{THREADS_ENV}={value[:20]!r}: give a whole number of threads, 1 or more")
        return int(value), f"{THREADS_ENV}={int(value)}"
    cores = _cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system: the safe choice
        return 1, f"{cores} cores, load unknown"
    return max(1, min(cores, int(cores - load))), f"{cores} cores, load {load:.2f}"


# The thread count of the round being merged, and torch's own before the round set it (None: not set yet).
_ROUND: dict = {"threads": None, "torch_before": None}


def aggregate_round(*args, **kwargs):
    """`fedtune.aggregate.engine.aggregate_round` (see it for the arguments) on `round_threads()` threads: numpy's
    BLAS and, when the round uses it, torch; both restored after it."""
    from threadpoolctl import threadpool_limits

    from fedtune.aggregate.engine import aggregate_round as merge_round

    threads, _ = round_threads()
    _ROUND.update(threads=threads, torch_before=None)
    if "torch" in sys.modules:  # a caller that uses torch too (simulate): its count is restored after the round
        round_torch()
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            return merge_round(*args, **kwargs)
    finally:
        if _ROUND["torch_before"] is not None:
            sys.modules["torch"].set_num_threads(_ROUND["torch_before"])
        _ROUND.update(threads=None, torch_before=None)


def merge_workers() -> int:
    """How many threads the numpy merge reads and sums on: $FEDTUNE_THREADS when set, else one per core. Its
    workers share whole keys (no barrier between them), so unlike torch's operations a busy core slows one of them
    down without stalling the others: the load does not need to be guessed."""
    if os.environ.get(THREADS_ENV, "").strip():
        return round_threads()[0]
    return _cores()


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def round_torch():
    """torch, with its thread count set to the round's: the merges that need torch call this rather than importing
    it, so a round that never needs it (fedavg) never loads it."""
    import torch

    if _ROUND["threads"] is not None and _ROUND["torch_before"] is None:
        _ROUND["torch_before"] = torch.get_num_threads()
        torch.set_num_threads(_ROUND["threads"])
    return torch


_LAZY = {"Method": "fedtune.aggregate.base",
         "LinearMethod": "fedtune.aggregate.base", "CoordinateMethod": "fedtune.aggregate.base",
         "LoraMethod": "fedtune.aggregate.base"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "CoordinateMethod", "LinearMethod", "LoraMethod", "Method", "aggregate_round",
           "make_method", "method_class", "methods_help", "round_threads"]
