"""`fedtune report`: one self-contained HTML page about a federation, live or simulated, from its registry."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtune.cli import COORDINATOR_PANEL, JsonOpt, ModelOpt, app, out, print_json, progress_log, registry_config
from fedtune.cli.coordinator import OptionalConfigOpt, RegistryOpt
from fedtune.errors import BadInput

TrackOpt = Annotated[Optional[str], typer.Option(
    "--track", help="also log the run to a local experiment store: mlflow (pip install 'fedtune\\[track]')")]
TrackUriOpt = Annotated[Optional[str], typer.Option(
    "--track-uri", help="the store: a .db file (SQLite) or a folder for mlflow.db \\[default: mlflow.db beside the "
                        "output]")]


@app.command(rich_help_panel=COORDINATOR_PANEL)
def report(
    registry: RegistryOpt,
    out_path: Annotated[Path, typer.Option("--out", help="the HTML file to write, e.g. report.html")],
    config: OptionalConfigOpt = None,
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", help="a prepared site folder to evaluate every version on (repeat)")] = None,
    versions: Annotated[Optional[str], typer.Option(
        "--versions", help="evaluate only these versions: v0001,v0003 or latest \\[default: every version]")] = None,
    task_examples: Annotated[Optional[int], typer.Option("--task-examples", help=(
        "with --data: also answer up to N of each site's held-out prompts per version and score them (exact "
        "match, token F1, ROUGE-L); 0: loss only \\[default: evaluation.task_examples]"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help=(
        "the longest answer generated (greedy) \\[default: evaluation.max_new_tokens]"))] = None,
    run_report: Annotated[Optional[Path], typer.Option(
        "--run-report", help="simulate's report.json to take eval results from instead of evaluating "
                             "\\[default: report.json beside the registry, when there is no --data]")] = None,
    updates: Annotated[Optional[Path], typer.Option(
        "--updates", help="the updates root (round-NNNN/ folders), for the bytes each round received "
                          "\\[default: updates/ beside the registry, when there]")] = None,
    model: ModelOpt = None,
    track: TrackOpt = None,
    track_uri: TrackUriOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page about a federation, live or simulated, from its registry.

    Eval loss and task metrics per site by version, beside the base model and the baselines.

    Per round: weights and contributions, rejected updates, participation, ε spent, bytes and seconds.

    Alerts and held versions. With --data it evaluates each version (--versions limits which).

    Without --data it takes a simulated run's results (report.json). Plots are embedded: no server needed.
    """
    from fedtune.artifacts import write_text_atomic
    from fedtune.config import load_federation
    from fedtune.registry import Registry
    from fedtune.report import evaluate_versions, pick_versions, report_page
    from fedtune.report_html import render
    from fedtune.tracking import track_run, tracking_store

    store = tracking_store(track, track_uri, out_path.parent)
    _check_writable(out_path)
    Registry(registry).latest_name()  # a missing or broken registry fails here, before any work
    config_path = registry_config(registry, config)
    federation = load_federation(config_path)
    if data and run_report is not None:
        raise BadInput("report: give --data (evaluate here) or --run-report (a run's results), not both")
    log = progress_log()
    if data:
        settings = federation.evaluation
        tasks = {"task_examples": settings.task_examples if task_examples is None else task_examples,
                 "max_new_tokens": settings.max_new_tokens if max_new_tokens is None else max_new_tokens}
        run = evaluate_versions(federation, registry, list(data), pick_versions(registry, versions), model_dir=model,
                                log=log, **tasks)
    else:
        run = _run_results(run_report if run_report is not None else registry.parent / "report.json",
                           explicit=run_report is not None)
        if run is not None and versions:
            keep = set(pick_versions(registry, versions))
            run["rounds"] = [r for r in run["rounds"] if r["version"] in keep]
    if updates is None and (registry.parent / "updates").is_dir():
        updates = registry.parent / "updates"
    page = report_page(run, federation, registry, updates)
    try:
        write_text_atomic(out_path, render(page))
    except OSError as problem:
        raise BadInput(f"{out_path}: cannot be written ({problem.strerror}); choose another --out") from None
    tracked = track_run(store, page, federation, [out_path], "report") if store is not None else None
    if json_out:
        print_json({"html": str(out_path), **({"tracking": tracked} if tracked else {}), **page})
        return
    evaluated = len(page["run"]["rounds"]) if page["run"].get("base") else 0
    out.print(f"wrote {out_path}: {len(page['versions'])} version(s), {evaluated} evaluated"
              + (f", {len(page['held'])} held" if page["held"] else ""))
    if tracked:
        out.print(f"tracked as MLflow run {tracked['run_id']} in {tracked['store']} "
                  f"(experiment {tracked['experiment']})")


def _run_results(path: Path, explicit: bool) -> dict | None:
    """A run's report.json (eval results in simulate's shape); None when it is not there and was not asked for."""
    from fedtune.artifacts import read_json

    if not path.is_file() and not explicit:
        return None
    run = read_json(path)
    if not (isinstance(run, dict) and isinstance(run.get("base"), dict) and isinstance(run.get("rounds"), list)
            and all(isinstance(r, dict) and "version" in r and isinstance(r.get("eval"), dict) for r in run["rounds"])):
        raise BadInput(f"{path}: not a run's report.json (needs base and rounds as `fedtune simulate` writes them); "
                       "give --data to evaluate instead")
    return run


def _check_writable(path: Path) -> None:
    """Fail before any evaluation when --out cannot be written: its folder must exist and take a file."""
    folder = path.parent
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; give --out a file name, e.g. {path / 'report.html'}")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as problem:
        raise BadInput(f"{path}: cannot be written in {folder} ({problem.strerror}); choose another --out") from None
    os.close(handle)
    os.unlink(probe)
