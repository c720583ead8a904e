"""What a site runs: prepare its data, train its update, evaluate, audit and export a global version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtune.cli import (
    SITE_PANEL,
    ConfigOpt,
    JsonOpt,
    ModelOpt,
    app,
    err,
    out,
    print_json,
    print_table,
    progress_log,
)
from fedtune.errors import BadInput


@app.command(rich_help_panel=SITE_PANEL)
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
    canaries: Annotated[int, typer.Option("--canaries", min=0, help=(
        "plant N random secret records in the training split, kept in canaries.json (mode 0600) for "
        "`fedtune audit`; the data card says only how many"))] = 0,
    canary_repeats: Annotated[int, typer.Option("--canary-repeats", min=1, help="copies of each canary planted")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Filter, scrub PII, dedup, tokenize and pack a site's raw files; writes train/eval parquet and a data card."""
    from fedtune.config import load_federation, parse_columns
    from fedtune.data import prepare_site

    card = prepare_site(load_federation(config), site, input, out_dir, log=progress_log(), dry_run=dry_run,
                        num_proc=num_proc, deny_list=deny_list, ner_model=ner_model,
                        columns=parse_columns(columns) if columns else None, model_dir=model_dir, overwrite=overwrite,
                        pii_countries=pii_country, pii_entities=pii_entity, pii_patterns=_pii_patterns(pii_pattern),
                        canaries=canaries, canary_repeats=canary_repeats)
    _warn_pii_not_scanned(card)
    if json_out:
        print_json(card)
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
              f"eval {card['sequences']['eval']} ({card['packing_mode']})")
    tasks = card.get("eval_tasks")
    if tasks is not None:
        out.print(f"  held-out tasks (for evaluate's task metrics): {tasks['count']} prompts with answers"
                  + (f"; {tasks['without_answer']} eval records have no assistant turn" if tasks["without_answer"] else ""))
    if card["canaries"]["count"]:
        out.print(f"  canaries: {card['canaries']['count']} planted in train, {card['canaries']['repeats']} copies "
                  "each" + (f" (kept in {written / 'canaries.json'})" if written else ""))
    lengths = card["token_lengths"]
    out.print(f"  record length in tokens (mean {lengths['mean']}, max {lengths['max']}): "
              + ", ".join(f"{k}: {v}" for k, v in lengths["histogram"].items() if v))
    contract = card["contract"]
    out.print("  contract: " + ("satisfied" if contract["satisfied"] else "NOT satisfied: " + "; ".join(contract["problems"])))
    if not contract["satisfied"]:
        err.print("warning: train-local will refuse this data until the contract holds: " + "; ".join(contract["problems"]))


@app.command("train-local", rich_help_panel=SITE_PANEL)
def train_local_cmd(
    config: ConfigOpt,
    site: Annotated[str, typer.Option(help="this site's roster name")],
    data: Annotated[Path, typer.Option(help="this site's prepared folder")],
    global_ref: Annotated[Path, typer.Option("--global", help="registry (its LATEST) or a global version folder")],
    updates: Annotated[Path, typer.Option("--out", help="updates root; writes round-NNNN/<site>/")],
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps \\[default: training.steps of the federation file]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate \\[default: training.lr]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=(
        "sequences per micro-batch, in all: with --num-processes N each process takes 1/N of them \\[default: "
        "training.batch_size]"))] = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help="this site's private key (SITE.key from `fedtune keys new`); signs the update \\[required once "
                      "the roster holds keys]")] = None,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help=(
        "train data-parallel over N processes on this machine: one per GPU (nccl), or N CPU processes (gloo). They "
        "split each batch, so the update is the one a single process would train (to rounding, and but for LoRA "
        "dropout's masks), and process 0 writes it. Under `accelerate launch` or `torchrun` the launched processes "
        "are used instead"))] = 1,
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train this site's LoRA update from a global version (its coordinator signature is checked first)."""
    from fedtune.config import load_federation
    from fedtune.train import train_local

    folder = train_local(load_federation(config), site, data, global_ref, updates, steps, lr, batch_size,
                         log=progress_log(), model_dir=model_dir, key=key, num_processes=num_processes)
    if folder is None:  # a launched group's process other than 0: process 0 writes and reports the update
        return
    manifest = json.loads((folder / "manifest.json").read_text())
    signed = (folder / "manifest.sig").is_file()
    if json_out:
        print_json({"update": str(folder), "signed": signed, **manifest})
    else:
        t = manifest["train"]
        loss = (f"loss {t['loss_first']:.4f} → {t['loss_last']:.4f}" if t["loss_first"] is not None
                else "losses kept at the site")
        spent = manifest["privacy"].get("epsilon")
        out.print(f"wrote {folder}: round {manifest['round']}, {t['steps']} steps, {loss}, {t['tokens_per_second']} "
                  "tokens/s" + (f" over {num_processes} processes" if num_processes > 1 else "") + (f", record-level ε {spent:.3f}" if spent is not None else "")
                  + (", masked for secure aggregation" if manifest.get("secagg") else "")
                  + (", signed" if signed else ", unsigned"))


@app.command(rich_help_panel=SITE_PANEL)
def unmask(
    config: ConfigOpt,
    site: Annotated[str, typer.Option(help="this site's roster name")],
    key: Annotated[Path, typer.Option("--key", help="this site's private key (SITE.key)")],
    round_dir: Annotated[Path, typer.Option("--round", help="the round's folder, updates/round-NNNN")],
    json_out: JsonOpt = False,
) -> None:
    """Answer the coordinator's unmask request (secure aggregation): write this site's signed answer.

    It reveals this site's shares of the survivors' self-mask seeds (its own seed's share included, never a whole
    seed) and its pairwise seeds with the sites declared dropped — never both for one site. A site answers one
    request per round (SITE.unmask-answers.json beside the key remembers which).
    """
    from fedtune.config import load_federation
    from fedtune.privacy.secagg_site import answer_unmask

    path = answer_unmask(load_federation(config), site, key, round_dir, log=progress_log())
    answer = json.loads(path.read_text())["document"]
    if json_out:
        print_json({"answer": str(path), "site": site, "round": answer["round"],
                    "shares": sorted(answer["self_mask_shares"]), "pairwise_seeds": sorted(answer["pairwise_seeds"])})
        return
    dropped = sorted(answer["pairwise_seeds"])
    out.print(f"wrote {path}: site {site}'s answer for round {answer['round']} (shares for "
              f"{len(answer['self_mask_shares'])} survivor(s)"
              + (f"; pairwise seeds with dropped {', '.join(dropped)}" if dropped else "") + ")")


@app.command(rich_help_panel=SITE_PANEL)
def evaluate(
    config: ConfigOpt,
    adapter: Annotated[str, typer.Option(help="'base' or a global version folder")],
    data: Annotated[list[Path], typer.Option("--data", help="a prepared folder (repeat)")],
    task_examples: Annotated[Optional[int], typer.Option("--task-examples", help=(
        "answer up to N of each site's held-out prompts and score the answers against the site's own (exact match, "
        "token F1, ROUGE-L); 0: loss only \\[default: evaluation.task_examples of the federation file, 32]"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help=(
        "the longest answer generated (greedy) \\[default: evaluation.max_new_tokens, 32]"))] = None,
    samples: Annotated[int, typer.Option("--samples", help=(
        "show N prompts per site with the reference, the base model's and the adapter's answers side by side"))] = 0,
    harness: Annotated[str, typer.Option("--harness", help=(
        "generate and score here ('fedtune') or through EleutherAI's lm-eval harness ('lm-eval', the [eval] "
        "extra); both decode greedily and give the same answers"))] = "fedtune",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per forward pass")] = 8,
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Eval loss and perplexity on each prepared eval split, and task metrics on its held-out prompts."""
    from fedtune.config import load_federation
    from fedtune.evaluate import evaluate as run_evaluate

    federation = load_federation(config)
    settings = federation.evaluation
    result = run_evaluate(federation, adapter, data, batch_size=batch_size, model_dir=model_dir, log=progress_log(),
                          task_examples=settings.task_examples if task_examples is None else task_examples,
                          max_new_tokens=settings.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          samples=samples, harness=harness)
    if json_out:
        print_json(result)
        return
    tasked = any("task" in m for m in result["sites"].values())
    rows = []
    for site, m in result["sites"].items():
        row = [site, f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", str(m["tokens"])]
        if tasked:
            task = m.get("task")
            row += ([f"{task['exact_match']:.3f}", f"{task['token_f1']:.3f}", f"{task['rouge_l']:.3f}",
                     str(task["examples"])] if task else ["-"] * 4)
        rows.append(row)
    print_table(["site", "loss", "perplexity", "tokens"] + (["exact", "token F1", "ROUGE-L", "prompts"]
                                                            if tasked else []),
                rows, title=f"eval of {result['adapter']}")
    if result.get("samples"):
        _print_samples(result["samples"], result["adapter"])


def _print_samples(samples: list[dict], adapter: str) -> None:
    from rich.table import Table
    from rich.text import Text  # the records' own text: never read as markup

    table = Table(title=f"held-out prompts: base vs {adapter}" if adapter != "base" else "held-out prompts: base",
                  show_lines=True)
    for name in ["site", "prompt", "reference", "base"] + ([adapter] if adapter != "base" else []):
        table.add_column(name, overflow="fold")
    for sample in samples:
        cells = [sample["site"], sample["prompt"], sample["reference"], sample["base"]]
        table.add_row(*map(Text, cells + ([sample["version"]] if adapter != "base" else [])))
    out.print(table)


@app.command(rich_help_panel=SITE_PANEL)
def audit(
    config: ConfigOpt,
    adapter: Annotated[str, typer.Option(
        help="'base', a version of the registry (vNNNN or latest), or a version folder")],
    data: Annotated[list[Path], typer.Option("--data", help="a prepared folder with its canaries.json (repeat)")],
    registry: Annotated[Optional[Path], typer.Option(
        help="the registry (default: registry/ beside the federation.yaml)")] = None,
    candidates: Annotated[int, typer.Option("--candidates", min=10_000, help=(
        "R: random secrets each canary is ranked among (exposure is at most log2(R+1))"))] = 10_000,
    mia_rows: Annotated[int, typer.Option("--mia-rows", min=1, help=(
        "at most this many train rows, and as many held-out rows, in the membership-inference test"))] = 200,
    model_dir: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What an adapter leaks about each site's records: canary exposure and membership-inference AUC."""
    from fedtune.config import load_federation
    from fedtune.privacy.exposure import audit_sites

    result = audit_sites(load_federation(config), adapter, data, registry=registry or config.parent / "registry",
                         model_dir=model_dir, candidates=candidates, mia_rows=mia_rows, log=progress_log())
    if json_out:
        print_json(result)
        return
    rows = []
    for site, entry in result["sites"].items():
        exposure = "—" if entry["exposure"] is None else (
            f"{entry['exposure_mean']:.2f} (max {max(entry['exposure']):.2f})")
        auc = "—" if entry["mia_auc"] is None else f"{entry['mia_auc']:.3f} ± {entry['mia_chance_std']:.3f}"
        rows.append([site, f"{entry['canaries']} × {entry['repeats']}", exposure, auc,
                     f"{entry['mia_rows']['members']} + {entry['mia_rows']['non_members']}"])
    print_table(["site", "canaries", "exposure: mean (max)", "MIA AUC ± chance std", "rows: train + held-out"], rows,
                title=f"audit of {result['adapter']}: exposure out of {result['exposure_max']:.2f} "
                      f"(R = {result['candidates']}); AUC 0.5 = no leak")
    for site, entry in result["sites"].items():
        for note in entry["notes"]:
            err.print(f"note: {site}: {note}", markup=False)


@app.command(rich_help_panel=SITE_PANEL)
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
                            registry=registry or config.parent / "registry", model_dir=model_dir, log=progress_log())
    record = json.loads((folder / EXPORT_FILE).read_text())
    if json_out:
        print_json({"folder": str(folder), **record})
    else:
        what = f"merged into {record['base_model']['id']}" if record["merged"] else "adapter"
        out.print(f"wrote {folder}: {record['version']} {what} ({record['dtype']})")
