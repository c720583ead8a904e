"""`fedtune aggregate`: validate a round's updates and merge them, one tensor key at a time, into the
next global version.

Tensors are read key by key through memory-mapped `safe_open` handles, so memory holds one key of
every site plus the output adapter, never every update at once.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from fedtune.adapter import ADAPTER_FILE, tensor_layout, write_adapter
from fedtune.aggregate import make_method
from fedtune.aggregate.validate import Rejected, Update, check_update
from fedtune.artifacts import atomic_folder, write_json_atomic
from fedtune.config import FederationConfig
from fedtune.errors import BadInput
from fedtune.federation import global_manifest
from fedtune.registry import Registry, read_version_manifest, version_name

ROUND_RE = re.compile(r"^round-(\d{4,})$")


@dataclass
class RoundResult:
    version: str
    folder: Path
    contributors: list[dict]
    rejected: list[dict] = field(default_factory=list)


def _collect(round_dir: Path, config, parent, layout, max_bytes) -> tuple[list[Update], list[dict]]:
    valid, rejected = [], []
    for folder in sorted(p for p in round_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            valid.append(check_update(folder, config, parent, layout, max_bytes))
        except Rejected as why:
            rejected.append({"site": folder.name, "reason": str(why)})
    # Two updates claiming one site cannot both count, and picking one would be arbitrary.
    claims = Counter(u.site for u in valid)
    for update in [u for u in valid if claims[u.site] > 1]:
        valid.remove(update)
        rejected.append({"site": update.folder.name, "reason": f"site '{update.site}' sent more than one update this round"})
    return valid, rejected


def aggregate_round(
    config: FederationConfig,
    registry_dir: Path,
    round_dir: Path,
    method: str | None = None,
    trim: float | None = None,
    quorum: int | None = None,
    strict: bool = False,
    warn: Callable[[str], None] = lambda _msg: None,
) -> RoundResult:
    """Merge the valid updates in `round_dir` into the next global version of `registry_dir`.

    Args:
        config: the federation.
        registry_dir: the registry; its LATEST is the parent of this round.
        round_dir: updates/round-NNNN holding one folder per site.
        method, trim, quorum: override the federation's aggregation settings.
        strict: fail the round on any invalid update instead of leaving it out.
        warn: receives one line per rejected update.
    """
    settings = config.aggregation
    rule = make_method(method or settings.method, settings.trim if trim is None else trim)
    quorum = settings.quorum if quorum is None else quorum
    if quorum < 1:
        raise BadInput("--quorum: must be at least 1")
    registry = Registry(registry_dir)
    parent_dir = registry.latest()
    parent = read_version_manifest(parent_dir)
    if parent["base_model"]["sha256"] != config.base_model.sha256:
        raise BadInput(f"{parent_dir}: built on another base model than {config.base_model.id}")
    if not round_dir.is_dir():
        raise BadInput(f"{round_dir}: updates folder not found")
    match = ROUND_RE.match(round_dir.name)
    number = parent["round"] + 1
    if not match or int(match.group(1)) != number:
        raise BadInput(f"{round_dir}: the registry's next round is {number}; give updates/round-{number:04d}")
    target = registry.path_of(version_name(number))
    if target.exists():
        raise BadInput(f"{target}: already exists but LATEST is {parent['version']}; remove it to redo the round")

    layout = tensor_layout(parent_dir / ADAPTER_FILE)
    max_bytes = 2 * (parent_dir / ADAPTER_FILE).stat().st_size + (1 << 20)
    valid, rejected = _collect(round_dir, config, parent, layout, max_bytes)
    if strict and rejected:
        # One error line (DESIGN §8): it names the first rejected update and counts the others.
        first = rejected[0]
        others = f"; {len(rejected) - 1} other update(s) also rejected" if len(rejected) > 1 else ""
        raise BadInput(f"{round_dir / first['site']}: {first['reason']} (--strict: the round is not aggregated{others})")
    for item in rejected:
        warn(f"warning: {round_dir / item['site']}: rejected: {item['reason']}")
    if len(valid) < quorum:
        raise BadInput(
            f"{round_dir}: {len(valid)} valid update(s), below the quorum of {quorum}; nothing written"
            + (f" ({len(rejected)} rejected)" if rejected else "")
        )

    counts = torch.tensor([u.num_examples for u in valid], dtype=torch.float64)
    weights = counts / counts.sum() if rule.weighted else torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    merged: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(u.folder / ADAPTER_FILE), framework="pt")) for u in valid]
        base = stack.enter_context(safe_open(str(parent_dir / ADAPTER_FILE), framework="pt"))
        for key in layout:
            stacked = torch.stack([h.get_tensor(key).to(torch.float32) for h in handles])
            delta = rule.combine(stacked, weights.to(torch.float32))
            parent_tensor = base.get_tensor(key)
            merged[key] = (parent_tensor.to(torch.float32) + delta).to(parent_tensor.dtype)
            del stacked

    contributors = [
        {"site": u.site, "update_sha256": u.sha256, "weight": round(float(w), 8), "num_examples": u.num_examples}
        for u, w in zip(valid, weights)
    ]
    with atomic_folder(target) as tmp:
        sha = write_adapter(tmp, merged, config)
        manifest = global_manifest(
            config, number, sha, parent=parent["version"], method=rule.name, params=dict(rule.params),
            quorum=quorum, contributors=contributors, rejected=rejected,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    registry.commit(target.name, sha, target / "manifest.json")
    return RoundResult(version=target.name, folder=target, contributors=contributors, rejected=rejected)
