"""Run reports: report.json, report.png and report.html, a printable table, and the report page of any registry.

A report page gathers what a person reads about a federation: eval loss (and task metrics) per site by version,
beside the base model and the baselines; per round the contributors' weights and contributions, rejected updates,
equivocations, who was called and who was missing, ε spent, bytes moved and seconds taken; alerts and held
versions. Its eval part has the shape of simulate's report.json (`run`); the rest comes from the registry's signed
version manifests, so a live federation and a simulated one give the same page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedtune.artifacts import now, write_bytes_atomic, write_json_atomic, write_text_atomic
from fedtune.errors import BadInput

if TYPE_CHECKING:
    from fedtune.config import FederationConfig

PAGE_FORMAT = "fedtune.report/1"
# What a site downloads of a version; the server state stays with the coordinator.
SENT_FILES = ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "manifest.sig")


def write_report(folder: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json, report.png and report.html into `folder`; returns the JSON's and the PNG's paths.

    The HTML page also reads the registry and updates beside them (folder/registry, folder/updates) when
    folder/federation.yaml is there, as `simulate` leaves it.
    """
    from fedtune.report_html import loss_figure, render

    json_path, png_path = folder / "report.json", folder / "report.png"
    write_json_atomic(json_path, report)
    write_bytes_atomic(png_path, loss_figure(report))
    write_text_atomic(folder / "report.html", render(folder_page(folder, report)[0]))
    return json_path, png_path


def folder_page(folder: Path, report: dict) -> tuple[dict, FederationConfig | None]:
    """The report page of a simulated run's folder (its registry and updates when there), and its federation."""
    config = None
    if (folder / "federation.yaml").is_file() and (folder / "registry" / "LATEST").is_file():
        from fedtune.config import load_federation

        config = load_federation(folder / "federation.yaml")
    return report_page(report, config, folder / "registry" if config else None, folder / "updates"), config


def report_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per version, the base first, then any baselines) of eval loss per site.

    A baseline row leaves a site blank ("-") where it has no value, e.g. `local` for an attacker.
    """
    sites = list(report["base"])
    rows = [["base"] + [f"{report['base'][s]:.4f}" for s in sites]]
    private = bool(report["rounds"]) and all("epsilon" in r for r in report["rounds"])
    rows += [[r["version"]] + [f"{r['eval'][s]:.4f}" for s in sites] + ([f"{r['epsilon']:.3f}"] if private else [])
             for r in report["rounds"]]
    if private:
        rows[0].append("0")
    for kind, losses in report.get("baselines", {}).items():
        rows.append([kind] + [f"{losses[s]:.4f}" if s in losses else "-" for s in sites] + (["-"] if private else []))
    return ["version", *sites] + (["ε"] if private else []), rows


# --- the page -------------------------------------------------------------------------------------------


def report_page(run: dict | None, config: FederationConfig | None = None, registry: Path | None = None,
                updates: Path | None = None) -> dict:
    """The report page's data: `run` (simulate's report.json shape, or what evaluate_versions gives) and, with a
    registry, one record per version made by a round.

    Returns:
        {"format", "name", "method", "generated", "registry", "latest", "run", "versions": [...], "held": [...]}
        where each version is {"version", "round", "parent", "created", "method", "held", "promoted", "contributors",
        "rejected", "equivocations", "participation", "privacy", "bytes": {"updates", "update_count", "version"},
        "seconds", "seconds_from", "monitor", "alerts", "rolled_back_to", "reason"}.
    """
    run = run or {"base": {}, "rounds": []}
    versions, held, latest = [], [], None
    if registry is not None:
        if config is None:
            raise BadInput("report: a registry needs its federation.yaml (--config)")
        latest, versions = registry_versions(config, registry, updates)
        held = [v["version"] for v in versions if v["held"]]
    by_name = {record["version"]: record for record in versions}
    run = {**run, "rounds": [dict(r) for r in run.get("rounds", [])]}
    for evaluated in run["rounds"]:
        record = by_name.get(evaluated["version"])
        if record is None:
            continue
        if evaluated.get("seconds") is not None:  # simulate timed the round itself: finer than manifest timestamps
            record["seconds"], record["seconds_from"] = evaluated["seconds"], "simulate"
        if "epsilon" not in evaluated and record["privacy"]["epsilon"] is not None:
            evaluated["epsilon"] = record["privacy"]["epsilon"]
    name = run.get("name") or (config.name if config is not None else "federation")
    method = run.get("method") or (config.aggregation.method if config is not None else None)
    return {"format": PAGE_FORMAT, "name": name, "method": method, "generated": now(),
            "registry": str(registry) if registry is not None else None, "latest": latest, "run": run,
            "versions": versions, "held": held}


def registry_versions(config: FederationConfig, registry: Path, updates: Path | None = None) -> tuple[str, list[dict]]:
    """LATEST and one record per version a round (or a rollback) made, in the log's order, each manifest's
    signature checked; a held version (published, LATEST not moved to it until `fedtune promote`) comes last,
    marked held."""
    from fedtune.registry import Registry
    from fedtune.wire.version import read_version_manifest

    store = Registry(registry)
    latest = store.latest_name()
    entries = [(e["version"], e) for e in store.versions()]
    entries += [(held["version"], None) for held in store.held()]
    records, previous = [], None
    for name, entry in entries:
        folder = store.path_of(name)
        manifest = read_version_manifest(folder, config.coordinator_key)
        if manifest["round"]:  # v0000, the seeded start, is no round's work
            records.append(_version_record(manifest, folder, previous, updates, entry))
        previous = manifest
    return latest, records


def _version_record(manifest: dict, folder: Path, previous: dict | None, updates: Path | None,
                    entry: dict | None) -> dict:
    """entry: the version's log line (None: held, not committed)."""
    from fedtune.registry import round_dir_name

    round_dir = updates / round_dir_name(manifest["round"]) if updates is not None else None
    received = [p for p in sorted(round_dir.iterdir()) if (p / "manifest.json").is_file()] \
        if round_dir is not None and round_dir.is_dir() else []
    monitor = manifest.get("monitor") or {}
    privacy = manifest.get("privacy") or {}
    return {
        "version": manifest["version"], "round": manifest["round"], "parent": manifest.get("parent"),
        "created": manifest.get("created"), "method": manifest.get("method"), "held": entry is None,
        # a version committed by `fedtune promote` after it was held on alerts
        "promoted": (entry or {}).get("held"),
        "contributors": [
            {"site": c["site"], "weight": c.get("weight"), "norm": c.get("norm"), "clip_scale": c.get("clip_scale"),
             "staleness": c.get("staleness"), "num_examples": c.get("num_examples"),
             **({"contribution": c["contribution"]} if c.get("contribution") else {})}
            for c in manifest.get("contributors", [])],
        "rejected": [{"site": r["site"], "reason": r["reason"]} for r in manifest.get("rejected", [])],
        "equivocations": [{"site": e["site"], "folders": e.get("folders", [])} for e in manifest.get("equivocations", [])],
        "participation": manifest.get("participation"),
        "privacy": {"mode": privacy.get("mode", "none"), "epsilon": privacy.get("epsilon"),
                    "delta": privacy.get("delta"), "rounds_accounted": privacy.get("rounds_accounted")},
        "bytes": {"updates": sum(_folder_bytes(p) for p in received) if round_dir is not None else None,
                  "update_count": len(received) if round_dir is not None else None,
                  "version": sum((folder / n).stat().st_size for n in SENT_FILES if (folder / n).is_file())},
        "seconds": _seconds_between(previous, manifest), "seconds_from": "manifests",
        "monitor": monitor.get("sites") or {},
        "alerts": list(monitor.get("alerts") or []),
        "rolled_back_to": manifest.get("rolled_back_to"), "reason": manifest.get("reason"),
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _seconds_between(previous: dict | None, manifest: dict) -> float | None:
    """Seconds from the previous version's commit to this one's: the round as the registry saw it (whole seconds,
    including any wait for sites)."""
    from datetime import datetime

    try:
        return (datetime.fromisoformat(manifest["created"]) - datetime.fromisoformat(previous["created"])).total_seconds()
    except (TypeError, KeyError, ValueError):
        return None


# --- evaluating versions --------------------------------------------------------------------------------


def pick_versions(registry: Path, wanted: str | None) -> list[str]:
    """The versions made by rounds (v0001 on, a held one last: its eval helps decide on promoting it), or those
    named in `wanted` ("v0001,v0003" or "latest")."""
    from fedtune.registry import Registry

    store = Registry(registry)
    latest = store.latest_name()
    made = [e["version"] for e in store.versions() if e.get("round")] + [h["version"] for h in store.held()]
    if not wanted:
        return made
    picked = []
    for name in (part.strip() for part in wanted.split(",") if part.strip()):
        name = latest if name == "latest" else name
        if name not in made:
            raise BadInput(f"--versions: {name} is not a version of {registry} made by a round "
                           f"(it has {', '.join(made) or 'none yet'})")
        if name not in picked:
            picked.append(name)
    return [name for name in made if name in picked]


def evaluate_versions(config: FederationConfig, registry: Path, data: list[Path], versions: list[str], *,
                      model_dir: Path | None = None, log: Callable[[str], None] = lambda _msg: None,
                      **evaluate_options) -> dict:
    """Evaluate the base model and each of `versions` on the prepared folders in `data`, loading the base model
    once; returns the eval part of a report page (simulate's report.json shape, with "tasks" when the evaluation
    computed task metrics). `evaluate_options` go to fedtune.evaluate.evaluate as they are."""
    from fedtune import models
    from fedtune.evaluate import evaluate

    base_model = models.load_base_model(
        models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "report"))
    run: dict = {"name": config.name, "method": config.aggregation.method, "base": {}, "rounds": [], "tasks": {},
                 "notes": []}
    for number, name in enumerate(["base", *versions], start=1):
        log(f"report: evaluating {name} ({number}/{len(versions) + 1})")
        adapter = "base" if name == "base" else Path(registry) / name
        result = evaluate(config, adapter, data, base_model=base_model, model_dir=model_dir, log=log,
                          **evaluate_options)
        scores = result["sites"]
        run["notes"] += [note for note in result.get("notes", []) if note not in run["notes"]]
        losses = {site: metrics["loss"] for site, metrics in scores.items()}
        if name == "base":
            run["base"] = losses
        else:
            run["rounds"].append({"version": name, "eval": losses})
        tasks = {site: metrics["task"] for site, metrics in scores.items() if metrics.get("task")}
        if tasks:
            run["tasks"][name] = tasks
    for key in ("tasks", "notes"):
        if not run.get(key):
            run.pop(key, None)
    return run
