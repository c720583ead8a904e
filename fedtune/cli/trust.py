"""Keys, the roster and the registry's audit trail: `keys new`, `roster add/remove/sync/list`, `log`, `verify`,
`promote`, `rollback`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtune.cli import (
    COORDINATOR_PANEL,
    ConfigOpt,
    CoordinatorKeyOpt,
    JsonOpt,
    app,
    err,
    out,
    print_json,
    print_table,
    registry_config,
    warn,
)
from fedtune.errors import BadInput

KEYS_PANEL = "Keys (sites and coordinator)"
RegistryOpt = Annotated[Path, typer.Option("--registry", help="the registry folder")]
OptionalConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="the federation.yaml \\[default: federation.yaml beside the registry]")]


def short_key(line: str | None) -> str:
    """A public key in a form short enough for a table (the full line is in federation.yaml and --json)."""
    return f"{line[:16]}…" if line else "none"


# --- keys -----------------------------------------------------------------------------------------------

keys_app = typer.Typer(help="Key pairs: every site and the coordinator sign what they send (Ed25519) and agree "
                            "secure aggregation's pairwise masks (X25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys", rich_help_panel=KEYS_PANEL)


@keys_app.command("new")
def keys_new(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write NAME.key and NAME.pub in (created)")],
    name: Annotated[str, typer.Option("--name", help="the key's name: a site's roster name, or coordinator")],
    json_out: JsonOpt = False,
) -> None:
    """Make a key pair: NAME.key (private) and NAME.pub (public).

    NAME.key is written with mode 0600 and never leaves this machine; it signs what this party sends.

    NAME.pub holds the public keys the coordinator puts on the roster (`fedtune roster add`): the Ed25519 line,
    then the X25519 line secure aggregation agrees pairwise masks with.
    """
    import re

    from fedtune.wire import SigningKey
    from fedtune.wire.manifests import SITE_NAME

    if not re.match(SITE_NAME, name):
        raise BadInput(f"--name {name}: use letters, digits, . _ - (at most 64, starting with a letter or digit)")
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    key = SigningKey.generate()
    key.write(private, public)
    if json_out:
        print_json({"private": str(private), "public": str(public), "key": key.public,
                    "exchange_key": key.exchange_public})
        return
    out.print(f"wrote {private} (private keys: keep them on this machine) and {public} (public keys: send it to the "
              "coordinator for the roster)")
    out.print(f"{public.name}: {key.public}")
    out.print(f"{public.name}: {key.exchange_public}")


# --- roster ---------------------------------------------------------------------------------------------

roster_app = typer.Typer(help="The federation's roster: its sites, their LoRA ranks and public keys. Every change "
                              "is signed and logged in the registry.", no_args_is_help=True)
app.add_typer(roster_app, name="roster", rich_help_panel=COORDINATOR_PANEL)


def _roster_registry(config: Path, registry: Path | None) -> Path:
    return registry if registry is not None else config.parent / "registry"


@roster_app.command("add")
def roster_add(
    config: ConfigOpt,
    site: Annotated[str, typer.Option("--site", help="the new site's name")],
    public_key: Annotated[str, typer.Option("--key", help="the site's public key: its NAME.pub, or the key line")],
    registry: Annotated[Optional[Path], typer.Option(
        "--registry", help="the registry whose log records the change \\[default: registry/ beside --config]")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", min=1, help="the site's smaller LoRA rank, if it trains one")] = None,
    coordinator_key: Annotated[Optional[Path], typer.Option(
        "--coordinator-key", help="the coordinator's private key \\[default: coordinator.key beside the registry]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Put a site on the roster with its public keys; from the next round on it may send signed updates.

    A NAME.pub from `fedtune keys new` also gives the site's X25519 exchange key (secure aggregation needs it).
    """
    from fedtune.audit import change_roster

    registry = _roster_registry(config, registry)
    changed = change_roster(config, registry, "add", site, public_key, lora_r, coordinator_key)
    entry = next(s for s in changed.sites if s.name == site)
    if json_out:
        print_json({"config": str(config), "registry": str(registry), "action": "add", **entry.model_dump()})
        return
    out.print(f"added site {site} to {config} (key {short_key(entry.key)}, exchange key "
              f"{short_key(entry.exchange_key)}, rank {entry.lora_r or changed.lora.r}); "
              f"logged in {registry / 'log.jsonl'}; send the site the new federation.yaml")


@roster_app.command("remove")
def roster_remove(
    config: ConfigOpt,
    site: Annotated[str, typer.Option("--site", help="the site to remove")],
    registry: Annotated[Optional[Path], typer.Option(
        "--registry", help="the registry whose log records the change \\[default: registry/ beside --config]")] = None,
    coordinator_key: Annotated[Optional[Path], typer.Option(
        "--coordinator-key", help="the coordinator's private key \\[default: coordinator.key beside the registry]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Take a site off the roster: its updates are refused from now on; versions it contributed to stay."""
    from fedtune.audit import change_roster

    registry = _roster_registry(config, registry)
    changed = change_roster(config, registry, "remove", site, key=coordinator_key)
    short = len(changed.sites) < changed.aggregation.quorum
    message = (f"the roster has {len(changed.sites)} site(s), fewer than aggregation.quorum "
               f"{changed.aggregation.quorum}: no round can be merged until more sites join") if short else None
    if json_out:
        print_json({"config": str(config), "registry": str(registry), "action": "remove", "name": site,
                    "warnings": [message] if message else []})
        return
    if message:
        warn(message)
    out.print(f"removed site {site} from {config}; logged in {registry / 'log.jsonl'}")


@roster_app.command("sync")
def roster_sync(
    config: ConfigOpt,
    registry: Annotated[Optional[Path], typer.Option(
        "--registry", help="the registry whose log holds the roster \\[default: registry/ beside --config]")] = None,
    coordinator_key: Annotated[Optional[Path], typer.Option(
        "--coordinator-key",
        help="the coordinator's private key \\[default: coordinator.key beside the registry]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write into federation.yaml a roster change the log committed but an interrupted command did not write.

    A roster change logs its signed line first, then rewrites federation.yaml; a command killed in between leaves
    the file one change behind, which aggregate refuses until this (or the next roster add/remove) writes it.

    Any other difference from the log's roster is refused as a hand edit.
    """
    from fedtune.audit import sync_roster

    registry = _roster_registry(config, registry)
    synced, applied = sync_roster(config, registry, coordinator_key)
    if json_out:
        print_json({"config": str(config), "registry": str(registry), "applied": applied,
                    "sites": synced.site_names()})
        return
    if applied is None:
        out.print(f"{config}: its roster is the one {registry / 'log.jsonl'} records; nothing to do")
        return
    from fedtune.wire import printable

    out.print(f"wrote {config}: the roster change {registry / 'log.jsonl'} committed at line {applied['line']} "
              f"({applied['action']} {printable(applied['site'], 64)}); send the sites the new federation.yaml")


@roster_app.command("list")
def roster_list(config: ConfigOpt, json_out: JsonOpt = False) -> None:
    """The roster of a federation.yaml: each site's name, LoRA rank and public keys."""
    from fedtune.config import load_federation

    federation = load_federation(config)
    sites = [{"name": s.name, "lora_r": federation.site_rank(s.name), "key": s.key, "exchange_key": s.exchange_key}
             for s in federation.sites]
    if json_out:
        print_json({"config": str(config), "coordinator_key": federation.coordinator_key,
                    "signatures_required": federation.signatures_required(), "sites": sites})
        return
    rows = [[s["name"], str(s["lora_r"]), short_key(s["key"]), short_key(s["exchange_key"])] for s in sites]
    print_table(["site", "rank", "key", "exchange key"], rows, title=f"roster of {federation.name} (coordinator key "
                f"{short_key(federation.coordinator_key)}; signed updates "
                f"{'required' if federation.signatures_required() else 'not required'})")


# --- the audit trail ------------------------------------------------------------------------------------


@app.command(rich_help_panel=COORDINATOR_PANEL)
def log(
    registry: RegistryOpt,
    site: Annotated[Optional[str], typer.Option("--site", help="only the entries that concern this site")] = None,
    contributions: Annotated[bool, typer.Option(
        "--contributions", help="per site, summed across versions: rounds merged, the leave-one-out change of the "
                                "merged delta (Σ(1 − cos), Σ‖Δ − Δ₋ₖ‖, mean relative) and alerts")] = False,
    json_out: JsonOpt = False,
) -> None:
    """The registry's history: versions, roster changes and rollbacks, in commit order.

    Each version with its method and parameters, its contributors and their weights, and the updates it rejected.

    Each roster change, and each rollback with its reason. --site keeps the entries that concern one site.

    Monitoring alerts are noted on their version; a version held on alerts (not yet committed) is listed last.
    """
    from fedtune.audit import history

    if contributions:
        _contributions(registry, site, json_out)
        return
    rows = _with_monitoring(registry, history(registry, site), site)
    if json_out:
        print_json({"registry": str(registry), "site": site, "entries": rows})
        return
    table = [_history_cells(row) for row in rows]
    print_table(["version", "round", "created", "method", "contributors (weight)", "rejected", "notes"], table,
                title=f"history of {registry}" + (f" for site {site}" if site else ""))


def _with_monitoring(registry: Path, rows: list[dict], site: str | None) -> list[dict]:
    """The history rows with each version's alerts (and a promoted version's hold), plus a row for a version held
    on alerts (published, not committed)."""
    from fedtune.registry import Registry
    from fedtune.wire.update import MANIFEST_FILE

    store = Registry(registry)
    entries = store.entries()
    for row in rows:
        if row["event"] != "version" or not isinstance(row.get("version"), str):
            continue
        path = store.root / row["version"] / MANIFEST_FILE
        monitor = _read_monitor(path)
        row["alerts"] = [a for a in monitor.get("alerts", []) if site is None or a.get("site") == site]
        held = entries[row["line"] - 1].get("held") if 0 < row["line"] <= len(entries) else None
        if held:
            row["held"] = held
    for held in store.held():
        alerts = [a for a in held["alerts"] if site is None or a.get("site") == site]
        rows.append({"event": "held", "version": held["version"], "round": None, "created": held["created"],
                     "parent": held["parent"], "alerts": alerts})
    return rows


def _read_monitor(path: Path) -> dict:
    import json

    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    monitor = manifest.get("monitor") if isinstance(manifest, dict) else None
    return monitor if isinstance(monitor, dict) else {}


def _contributions(registry: Path, site: str | None, json_out: bool) -> None:
    from fedtune.monitor import contribution_totals
    from fedtune.registry import Registry, VERSION_RE
    from fedtune.wire.version import read_version_manifest

    store = Registry(registry)
    if not store.log_path.is_file():
        raise BadInput(f"{registry}: not a registry (no {store.log_path.name}); create one with `fedtune init`")
    manifests = [read_version_manifest(store.root / v["version"]) for v in store.versions()
                 if isinstance(v.get("version"), str) and VERSION_RE.match(v["version"])
                 and (store.root / v["version"] / "manifest.json").is_file()]
    rows = [r for r in contribution_totals(manifests) if site is None or r["site"] == site]
    if json_out:
        print_json({"registry": str(registry), "site": site, "sites": rows})
        return
    cells = [[r["site"], str(r["rounds"]), str(r["recorded"]), f"{r['loo_direction_sum']:.4f}",
              f"{r['loo_distance_sum']:.4g}",
              "n/a" if r["loo_relative_mean"] is None else f"{r['loo_relative_mean']:.3f}", str(r["alerts"])]
             for r in rows]
    print_table(["site", "rounds", "recorded", "Σ(1 − cos)", "Σ‖Δ − Δ₋ₖ‖", "mean ‖Δ − Δ₋ₖ‖/‖Δ‖", "alerts"], cells,
                title=f"contributions in {registry} (leave one out: how much the merged delta changes without the "
                      "site)")


def _history_cells(row: dict) -> list[str]:
    from fedtune.wire import printable

    created = str(row.get("created") or "")[:19].replace("T", " ")
    alerts = [f"alert {a['kind']} {a['site']}: {printable(a['message'], 160)}" for a in row.get("alerts", [])]
    if row["event"] == "held":
        return [str(row["version"]), "", created, "", "", "", "; ".join(
            [f"HELD on alerts (parent {row['parent']}): `fedtune promote {row['version']}` commits it"] + alerts)]
    if row["event"] == "roster":
        note = f"roster {row['action']} {printable(row['site'], 64)}" + (f" (key {short_key(row['key'])})"
                                                                          if row.get("key") else "")
        return ["", "", created, "", "", "", note]
    params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if v not in (None, "none", {}, []))
    method = f"{row['method']} ({params})" if params else str(row["method"])
    # Under secure aggregation no site's weight is known: only who was in the sum.
    contributors = ", ".join(f"{c['site']}" + (f" {c['weight']:.3f}" if c.get("weight") is not None else "")
                             + (f" τ={c['staleness']}" if c.get("staleness") else "") for c in row["contributors"])
    rejected = "; ".join(f"{printable(r['site'], 64)}: {printable(r['reason'], 160)}" for r in row["rejected"])
    notes = []
    if row.get("rolled_back_to"):
        notes.append(f"rolled back to {row['rolled_back_to']}: {printable(row.get('reason'), 200)}")
    notes += [f"equivocation: {site}" for site in row["equivocations"]]
    privacy = row.get("privacy") or {}
    if privacy.get("mode", "none") != "none":
        spent = privacy.get("epsilon")
        notes.append(f"ε {'n/a' if spent is None else format(spent, '.3f')} at δ {privacy.get('delta')} "
                     f"({privacy['mode']} DP, {privacy.get('rounds_accounted')} round(s))")
    called = row.get("participation")
    if called and (called["draw"] != "all" or called["missing"]):
        notes.append(f"called {len(called['called'])} ({called['draw']})"
                     + (f", missing {', '.join(called['missing'])} when "
                        + ("the deadline passed" if called["closed"] == "deadline" else "aggregate ran")
                        if called["missing"] else ""))
    secure = row.get("secure_aggregation")
    if secure:
        notes.append(f"secure aggregation: {len(secure['survivors'])} in the sum"
                     + (f", dropped {', '.join(secure['dropped'])}" if secure["dropped"] else ""))
    if row.get("held"):
        notes.append(f"held on {row['held'].get('alerts')} alert(s), promoted {str(row['held'].get('promoted'))[:19]}"
                     + (f": {printable(row['held']['reason'], 200)}" if row["held"].get("reason") else ""))
    notes += alerts
    return [str(row["version"]), str(row["round"]), created, method, contributors, rejected, "; ".join(notes)]


@app.command(rich_help_panel=COORDINATOR_PANEL)
def verify(
    path: Annotated[Optional[Path], typer.Argument(help="a global version folder to verify on its own")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="the registry to verify as a whole")] = None,
    config: OptionalConfigOpt = None,
    updates: Annotated[Optional[Path], typer.Option(
        "--updates", help="the updates root (round-NNNN/<site>/): also check every merged update is there, "
                          "as merged and signed")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-check a registry, or one global version folder, from its files alone.

    Registry: the log's hash chain and signatures, and each version's manifest, signature, files and lineage.

    Also rollbacks, the roster (against federation.yaml) and LATEST; with --updates, every merged update.

    Version folder (a site's offline check): the coordinator's signature, its files, and --config's settings.

    Exit 1 names the first broken item; what an interrupted command left for the next one is listed as pending.

    PATH: a global version folder (with --config); without it, give --registry.
    """
    from fedtune.audit import verify_registry, verify_version
    from fedtune.config import load_federation

    if (path is None) == (registry is None):
        raise BadInput("verify: give --registry REG (the whole registry) or a version folder PATH (with --config)"
                       + (", not both" if path is not None else ""))
    if path is not None:
        if config is None:
            raise BadInput(f"verify {path}: give --config, the federation.yaml the version must belong to")
        result = verify_version(path, load_federation(config))
        if json_out:
            print_json(result)
            return
        out.print(f"verified {path}: {result['version']} (round {result['round']}), "
                  + ("signed by the coordinator, " if result["signed"] else "")
                  + "its files and settings match federation.yaml")
        return
    result = verify_registry(registry, load_federation(registry_config(registry, config)), updates)
    if json_out:
        print_json(result)
        return
    out.print(f"verified {registry}: {result['versions']} versions (latest {result['latest']}), "
              f"{result['signatures_checked']} signatures"
              + (f", {result['updates_checked']} updates" if updates is not None else "")
              + (f"; {len(result['pending'])} pending (notes below)" if result["pending"] else ""))
    for note in result["pending"]:
        err.print(f"note: pending: {note}", markup=False)


@app.command(rich_help_panel=COORDINATOR_PANEL)
def promote(
    version: Annotated[str, typer.Argument(help="the held version, e.g. v0004")],
    registry: RegistryOpt,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", help="why (recorded in the log line; with --reject, written beside the folder set aside)")] = None,
    reject: Annotated[bool, typer.Option(
        "--reject", help="set the held version aside instead (renamed vNNNN.rejected-TIME, never deleted), so its "
                         "round can be aggregated again")] = False,
    config: OptionalConfigOpt = None,
    key: CoordinatorKeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Commit a version `aggregate --hold-on-alert` held on alerts, and move LATEST to it (signed and logged).

    Refused: a version that is not held (already committed, or not made under --hold-on-alert), one whose parent is
    not LATEST, and one whose manifest is not the coordinator's signature or whose files do not match it.
    """
    from fedtune.config import load_federation
    from fedtune.monitor.hold import promote as promote_held
    from fedtune.monitor.hold import reject as reject_held
    from fedtune.registry import Registry, coordinator_signer

    federation = load_federation(registry_config(registry, config))
    store = Registry(registry, coordinator_signer(federation, Path(registry), key))
    if reject:
        if not reason or not reason.strip():
            raise BadInput("--reason: say why the held version is set aside (written beside it)")
        aside = reject_held(store, version, reason.strip())
        if json_out:
            print_json({"version": version, "rejected": True, "folder": str(aside), "latest": store.latest_name()})
            return
        out.print(f"set {version} aside as {aside}; LATEST stays {store.latest_name()}; aggregate its round again")
        return
    entry = promote_held(store, version, reason.strip() if reason else None)
    if json_out:
        print_json({"version": version, "promoted": True, "latest": store.latest_name(), "log_entry": entry})
        return
    out.print(f"promoted {version}: committed in {store.log_path} and LATEST = {store.latest_name()}")


@app.command(rich_help_panel=COORDINATOR_PANEL)
def rollback(
    registry: RegistryOpt,
    to: Annotated[str, typer.Option("--to", help="the earlier version to return to, e.g. v0003")],
    reason: Annotated[str, typer.Option("--reason", help="why (recorded in the new version's manifest)")],
    config: OptionalConfigOpt = None,
    key: CoordinatorKeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make the next version a byte copy of an earlier version's adapter; nothing is deleted.

    The new version is signed and logged like any other, with the reason.

    Sites train the next round from it with no special step.
    """
    from fedtune.audit import rollback as run_rollback
    from fedtune.config import load_federation

    folder = run_rollback(load_federation(registry_config(registry, config)), registry, to, reason, key)
    if json_out:
        print_json({"version": folder.name, "folder": str(folder), "rolled_back_to": to, "reason": reason.strip()})
        return
    out.print(f"wrote {folder}: the adapter of {to} (rolled back: {reason.strip()}); LATEST = {folder.name}")
