"""The registry's audit trail: its history for `fedtune log`, rollbacks, and roster changes — each change a
signed, logged commit under the registry's lock. Verification lives in fedtune.verify (re-exported here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from fedtune.artifacts import now, sha256_file, write_text_atomic
from fedtune.config import FederationConfig, federation_to_yaml, load_federation, parse_model
from fedtune.errors import BadInput
from fedtune.registry import (
    VERSION_RE,
    Registry,
    checked_version,
    coordinator_signer,
    roster_sha256,
    sites_sha256,
    version_name,
    version_number,
)
from fedtune.verify import verify_registry, verify_version
from fedtune.wire.keys import read_exchange_public_file, read_public_file
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE
from fedtune.wire.update import MANIFEST_FILE
from fedtune.wire.version import SERVER_STATE_FILE, read_version_manifest, write_version_manifest

__all__ = ["change_roster", "history", "rollback", "sync_roster", "verify_registry", "verify_version"]


# --- history --------------------------------------------------------------------------------------------


def history(registry: Path, site: str | None = None) -> list[dict]:
    """One row per log entry, in order, for `fedtune log`; with `site`, only the rows that concern that site.

    Version rows: {"event": "version", "line", "version", "round", "created", "method", "params", "contributors"
    [{site, weight}], "rejected" [{site, reason}], "equivocations" [sites], "rolled_back_to", "reason"} (and
    "weight": the site's, with `site`). Roster rows: {"event": "roster", "line", "action", "site", "key",
    "created"}.
    """
    root = Path(registry)
    store = Registry(root)
    if not store.log_path.is_file():
        raise BadInput(f"{root}: not a registry (no {store.log_path.name}); create one with `fedtune init`")
    rows = []
    for number, entry in enumerate(store.entries(), start=1):
        row = _history_row(root, number, entry)
        if site is None or _concerns(row, site):
            rows.append(row)
    return rows


def _history_row(root: Path, number: int, entry: dict) -> dict:
    if entry.get("event") == "roster":
        return {"event": "roster", "line": number, "action": entry.get("action"), "site": entry.get("site"),
                "key": entry.get("key"), "created": entry.get("created")}
    name = entry.get("version")
    manifest = {}
    if isinstance(name, str) and VERSION_RE.match(name) and (root / name / MANIFEST_FILE).is_file():
        manifest = read_version_manifest(root / name)
    return {
        "event": "version", "line": number, "version": name, "round": entry.get("round"),
        "created": manifest.get("created", entry.get("created")), "method": manifest.get("method"),
        "params": manifest.get("params", {}),
        "contributors": [{"site": c["site"], "weight": c["weight"],
                          **({"staleness": c["staleness"]} if c.get("staleness") is not None else {})}
                         for c in manifest.get("contributors", [])],
        "rejected": [{"site": r["site"], "reason": r["reason"]} for r in manifest.get("rejected", [])],
        "equivocations": [e["site"] for e in manifest.get("equivocations", [])],
        "rolled_back_to": manifest.get("rolled_back_to"), "reason": manifest.get("reason"),
        "privacy": manifest.get("privacy") or {"mode": "none"},
        "secure_aggregation": manifest.get("secure_aggregation"),
        "participation": manifest.get("participation"),
    }


def _concerns(row: dict, site: str) -> bool:
    if row["event"] == "roster":
        return row["site"] == site
    contributed = [c for c in row["contributors"] if c["site"] == site]
    if contributed:
        row["weight"] = contributed[0]["weight"]  # None under secure aggregation: nobody learnt it
    return (bool(contributed) or any(r["site"] == site for r in row["rejected"])
            or site in row["equivocations"])


# --- rollback -------------------------------------------------------------------------------------------


def rollback(config: FederationConfig, registry: Path, to: str, reason: str, key: Path | None = None) -> Path:
    """Make a new version whose adapter is an earlier version's, byte for byte; nothing is deleted.

    Sites continue from the new version as from any other: it is the next round's parent.

    Args:
        config: the federation.
        registry: the registry folder.
        to: the earlier version to return to, e.g. v0003.
        reason: why, recorded in the new version's manifest.
        key: the coordinator's private key (default: coordinator.key beside the registry).

    Returns:
        The new version's folder.
    """
    version_number(to)
    reason = reason.strip()
    if not reason:
        raise BadInput("--reason: say why the federation rolls back (it is recorded in the new version)")
    if len(reason) > 2000:
        raise BadInput(f"--reason: {len(reason)} characters; keep it under 2000")
    from fedtune.federation import global_manifest  # loads the model stack; verify and log do not need it

    store = Registry(registry, coordinator_signer(config, Path(registry), key))
    with store.lock("rollback"):
        held = store.held()
        if held:
            name = held[0]["version"]
            raise BadInput(f"{store.root / name}: held on monitoring alerts; decide it first with `fedtune promote "
                           f"{name}` or `fedtune promote {name} --reject`, then roll back")
        current = store.latest_name()
        if to not in {v.get("version") for v in store.versions()}:
            raise BadInput(f"--to {to}: not a version of {store.root} "
                           f"(`fedtune log --registry {store.root}` lists them)")
        if to == current:
            raise BadInput(f"--to {to}: already the current version; nothing to roll back")
        source, target = checked_version(store.root / to, config)
        _, parent = checked_version(store.root / current, config)
        number = parent["round"] + 1
        built = store.root / f".{version_name(number)}.{os.getpid()}.tmp"
        built.mkdir()
        files = [ADAPTER_FILE, CONFIG_FILE] + ([SERVER_STATE_FILE] if target.get("server_state_sha256") else [])
        try:
            for name in files:
                shutil.copyfile(source / name, built / name)
            sha = sha256_file(built / ADAPTER_FILE)
            if sha != target["adapter_sha256"]:
                raise BadInput(f"{source / ADAPTER_FILE}: changed while it was copied; nothing written")
            params, extra = {}, {}
            if target.get("server_state_sha256"):
                # The server optimizer's moments return with the adapter they belong to.
                params = {"server_opt": target.get("params", {}).get("server_opt")}
                extra = {"server_state_sha256": target["server_state_sha256"]}
            # Returning to old weights releases nothing new: the privacy spent so far carries over unchanged.
            manifest = global_manifest(
                config, number, sha, parent.get("privacy"), parent=current, parent_sha256=parent["adapter_sha256"],
                method="rollback",
                params=params, rolled_back_to=to, reason=reason, contributors=[], rejected=[],
                rank=target.get("rank") or config.lora.r, **extra)
            write_version_manifest(built, manifest, store.key)
            for child in built.iterdir():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        except BaseException:
            shutil.rmtree(built, ignore_errors=True)
            raise
        folder = store.publish(built, version_name(number))
        store.commit(folder)
    return folder


# --- the roster -----------------------------------------------------------------------------------------
#
# A roster change is committed like a version: its signed log line, carrying the whole new roster, is the commit
# point; federation.yaml is rewritten after it. A command killed in between leaves federation.yaml one committed
# change behind the log, which `sync_roster` (and the next roster change) writes from the log line.


def change_roster(
    config_path: Path,
    registry: Path,
    action: Literal["add", "remove"],
    site: str,
    public_key: str | Path | None = None,
    lora_r: int | None = None,
    key: Path | None = None,
    exchange_key: str | Path | None = None,
) -> FederationConfig:
    """Add a site to the roster or remove one: log the change, signed, then rewrite federation.yaml.

    Args:
        config_path: the federation.yaml to rewrite.
        registry: the registry whose log records the change.
        action: "add" or "remove".
        site: the site's name.
        public_key: add: the site's public key, a .pub file or the key line itself.
        lora_r: add: the site's smaller LoRA rank, if it trains one.
        key: the coordinator's private key (default: coordinator.key beside the registry).
        exchange_key: add: the site's X25519 key line (or a .pub holding one), when `public_key` is a bare
            Ed25519 line; a .pub file from `fedtune keys new` carries it already.

    Returns:
        The new federation.
    """
    config_path = Path(config_path)
    config = load_federation(config_path)
    store = Registry(registry, coordinator_signer(config, Path(registry), key))
    with store.lock("roster"):
        # A signed roster event commits to the whole roster: never sign one over entries edited by hand. A change
        # an interrupted command committed but did not write comes first.
        config, _ = _catch_up(store, config, config_path)
        changed, line, exchange = _changed(config, config_path, action, site, public_key, lora_r, exchange_key)
        sites = [s.model_dump(mode="json") for s in changed.sites]
        # exchange_key only where there is one: lines without it read exactly as before exchange keys existed.
        store.append({"event": "roster", "action": action, "site": site, "key": line,
                      **({"exchange_key": exchange} if exchange is not None else {}),
                      **({"lora_r": lora_r} if action == "add" and lora_r else {}),
                      "roster": sites, "roster_sha256": sites_sha256(sites), "created": now()})
        _write_federation(config_path, changed, store)
    return changed


def sync_roster(config_path: Path, registry: Path, key: Path | None = None) -> tuple[FederationConfig, dict | None]:
    """Write into federation.yaml the roster change the log committed but an interrupted command did not write.

    Args:
        config_path: the federation.yaml, one committed roster change behind the log or in step with it.
        registry: the registry whose log holds the roster.
        key: the coordinator's private key (default: coordinator.key beside the registry).

    Returns:
        The federation, and the change applied ({"line", "action", "site"}) or None when it was in step already.

    Raises:
        BadInput: federation.yaml's roster differs from the log's in any other way (edited by hand).
    """
    config_path = Path(config_path)
    config = load_federation(config_path)
    store = Registry(registry, coordinator_signer(config, Path(registry), key))
    with store.lock("roster"):
        config, pending = _catch_up(store, config, config_path)
    if pending is None:
        return config, None
    line, entry = pending
    return config, {"line": line, "action": entry["action"], "site": entry["site"]}


def _catch_up(
    store: Registry, config: FederationConfig, config_path: Path,
) -> tuple[FederationConfig, tuple[int, dict] | None]:
    """federation.yaml in step with the log: as it is, or with the one committed change it lacks written into it
    (its other keys kept). Refuses a roster edited by hand. Call under the registry's lock."""
    _line, recorded = store.recorded_roster()
    if recorded is None or recorded == roster_sha256(config):
        return config, None
    pending = store.pending_roster(config)
    if pending is None:
        store.check_roster(config, config_path)  # raises: edited by hand
    line, entry = pending
    synced = parse_model(FederationConfig, {**config.model_dump(mode="json"), "sites": entry["roster"]},
                         f"{store.log_path} line {line}")
    _write_federation(config_path, synced, store)
    return synced, pending


def _write_federation(config_path: Path, config: FederationConfig, store: Registry) -> None:
    try:
        write_text_atomic(config_path, federation_to_yaml(config))
    except OSError as err:
        # Past the commit point: the change is in the log, only federation.yaml lags.
        raise BadInput(f"{config_path}: could not be rewritten ({err.strerror}); the roster change is committed in "
                       f"{store.log_path}: `fedtune roster sync --config {config_path} --registry {store.root}` "
                       "writes it") from None


def _changed(
    config: FederationConfig, config_path: Path, action: str, site: str, public_key: str | Path | None,
    lora_r: int | None, exchange_key: str | Path | None = None,
) -> tuple[FederationConfig, str | None, str | None]:
    """The federation with `site` added or removed, and the key and exchange key the log line names."""
    sites = [s.model_dump(mode="json") for s in config.sites]
    if action == "add":
        if site in config.site_names():
            raise BadInput(f"--site {site}: already on the roster of {config_path}")
        if public_key is None:
            raise BadInput(f"--key: give site {site}'s public key (the NAME.pub `fedtune keys new` wrote)")
        line = read_public_file(public_key)
        holder = next((s.name for s in config.sites if s.key == line), None)
        if holder is not None:
            raise BadInput(f"--key {public_key}: already site {holder}'s key; every site signs with its own")
        exchange = _exchange_line(public_key, exchange_key)
        holder = next((s.name for s in config.sites if exchange is not None and s.exchange_key == exchange), None)
        if holder is not None:
            # Two sites with one exchange key could each compute the other's pairwise masks.
            raise BadInput(f"--key {public_key}: its exchange key is already site {holder}'s; every site agrees "
                           "its masks with its own key pair (`fedtune keys new`)")
        sites.append({"name": site, "lora_r": lora_r, "key": line,
                      **({"exchange_key": exchange} if exchange is not None else {})})
    elif action == "remove":
        if site not in config.site_names():
            raise BadInput(f"--site {site}: not on the roster of {config_path} ({', '.join(config.site_names())})")
        if len(sites) == 1:
            raise BadInput(f"--site {site}: the last site on the roster; a federation keeps at least one")
        line = config.site_key(site)
        exchange = next(s.exchange_key for s in config.sites if s.name == site)
        sites = [s for s in sites if s["name"] != site]
    else:
        raise BadInput(f"roster: unknown action '{action}' (add or remove)")
    changed = parse_model(FederationConfig, {**config.model_dump(mode="json"), "sites": sites}, str(config_path))
    return changed, line, exchange


def _exchange_line(public_key: str | Path, exchange_key: str | Path | None) -> str | None:
    """The exchange key a new site goes on the roster with: its .pub's x25519 line, or the one given apart."""
    from_pub = read_exchange_public_file(public_key)
    if exchange_key is None:
        return from_pub
    given = read_exchange_public_file(exchange_key)
    if given is None:
        raise BadInput(f"{exchange_key}: holds no X25519 key line (`fedtune keys new` writes one in NAME.pub)")
    if from_pub is not None and from_pub != given:
        raise BadInput(f"{public_key}: its exchange key differs from the one given apart ({exchange_key}); give one")
    return given
