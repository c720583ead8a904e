"""`fedtune status`: what the coordinator needs to know before running `aggregate`.

Reads the registry and the updates folder only; never loads a model or a tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtune.config import SITE_NAME, FederationConfig
from fedtune.registry import Registry, read_version_manifest, round_dir_name


def federation_status(config: FederationConfig, registry_root: Path, updates: Path) -> dict:
    """The latest version, the round it waits for, which sites have sent an update, and the quorum.

    Args:
        config: the federation (roster and quorum).
        registry_root: the registry folder.
        updates: the updates root, holding round-NNNN/<site>/ folders.

    Returns:
        {"latest": {version, round, method, contributors, created}, "round", "quorum", "ready", "called",
         "sampled", "closes_at", "waiting": {"folder", "sites", "missing", "unknown"}, "held": [{version, parent,
         alerts, created}] (a version aggregate --hold-on-alert left for `fedtune promote`)}, and under secure
        aggregation "unmask": {"requested", "threshold", "survivors", "dropped", "answered", "not_answered"}
    """
    registry = Registry(registry_root)
    latest_dir = registry.latest()
    manifest = read_version_manifest(latest_dir)
    number = int(manifest["round"]) + 1
    folder = updates / round_dir_name(number)
    sent = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "manifest.json").is_file()) \
        if folder.is_dir() else []
    roster = config.site_names()
    # A name that is not a valid site name is shown escaped: folder names come from whoever wrote them.
    unknown = [s if re.match(SITE_NAME, s) else ascii(s) for s in sent if s not in roster]
    arrived = [s for s in sent if s in roster]
    quorum = config.aggregation.quorum
    called, closes_at = _called(config, folder, manifest)
    unmask = _unmask_status(folder, config) if config.privacy.secure_aggregation else None
    return {
        **({"unmask": unmask} if unmask is not None else {}),
        "latest": {
            "version": manifest["version"], "round": manifest["round"], "method": manifest.get("method"),
            "contributors": [c.get("site") for c in manifest.get("contributors", [])],
            "created": manifest.get("created"),
        },
        "round": number,
        "quorum": quorum,
        "ready": len(arrived) >= quorum,
        "called": called,
        "sampled": len(called) < len(roster),
        "closes_at": closes_at,
        "waiting": {"folder": str(folder), "sites": arrived, "missing": [s for s in called if s not in arrived],
                    "unknown": unknown},
        "held": registry.held(),
    }


def _called(config: FederationConfig, folder: Path, parent: dict) -> tuple[list[str], str | None]:
    """The sites the round calls and when it closes (ISO time, or None); the roster when its draw is not out yet."""
    from fedtune.errors import BadInput
    from fedtune.rounds import called_sites, closing_time

    try:
        called = called_sites(config, folder, parent)
        closes = closing_time(config, folder, parent, called)
    except BadInput:  # a Poisson-sampled round whose sample is not drawn yet
        return config.site_names(), None
    return called.sites, closes.isoformat() if closes is not None else None


def _unmask_status(folder: Path, config: FederationConfig) -> dict:
    """Secure aggregation: whether the round's unmask request is out, and whose answer files are in (their
    signatures are checked by `aggregate`, not here)."""
    from fedtune.wire.secagg import REQUEST_FILE, RESPONSES_DIR, read_request

    if not (folder / REQUEST_FILE).exists():
        return {"requested": False, "threshold": config.secagg_threshold()}
    request = read_request(folder, config.coordinator_key)
    survivors = [s["site"] for s in request["survivors"]]
    answers = folder / RESPONSES_DIR
    answered = sorted(p.stem for p in answers.glob("*.json") if p.stem in survivors) if answers.is_dir() else []
    return {"requested": True, "threshold": request["threshold"], "survivors": survivors,
            "dropped": request["dropped"], "answered": answered,
            "not_answered": [s for s in survivors if s not in answered]}
