"""Aggregation: a registry of methods (one file per family) and the streaming round stage."""

from __future__ import annotations

from fedtune.aggregate.base import Method
from fedtune.aggregate.mean import FedAvg
from fedtune.aggregate.robust import TrimmedMean
from fedtune.errors import BadInput

METHODS: dict[str, type[Method]] = {"fedavg": FedAvg, "trimmed-mean": TrimmedMean}


def make_method(name: str, trim: float = 0.2) -> Method:
    if name not in METHODS:
        raise BadInput(f"--method: unknown method '{name}'; choose one of {', '.join(METHODS)}")
    if name == "trimmed-mean":
        if not 0 <= trim < 0.5:
            raise BadInput("--trim: must be in [0, 0.5)")
        return TrimmedMean(trim=trim, params={"trim": trim})
    return METHODS[name]()


def methods_help() -> str:
    """One paragraph per method, for `fedtune aggregate --help`."""
    return "\n\n".join(f"  {name}: {cls.summary}" for name, cls in METHODS.items())


from fedtune.aggregate.engine import aggregate_round  # noqa: E402  (engine imports the registry above)

__all__ = ["METHODS", "Method", "aggregate_round", "make_method", "methods_help"]
