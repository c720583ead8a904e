"""`fedtune simulate`: a whole federation on one machine, through the same stage functions the CLI calls.

Every site gets its own key pair (out/keys/SITE.key, both public keys on the roster) and signs its updates,
so a simulation runs the whole trust path; under secure aggregation it also masks them, and `simulate` drives
the unmask exchange itself. A recipe site may drop out before sending, or before answering the unmask request, or
send late (a straggler: it trains from the round's parent and sends after the round has closed).
A recipe site may be an attacker: it trains honestly, then replaces its update with a forged one
(`forge_update`) and signs what it sends with its own key, so only validation and the robust rules can stop it.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from fedtune import models
from fedtune.adapter import ADAPTER_FILE, CONFIG_FILE, read_tensors
from fedtune.aggregate import aggregate_round, method_class
from fedtune.artifacts import read_json
from fedtune.baselines import parse_baselines, run_baselines
from fedtune.config import Attack, FederationConfig, load_recipe
from fedtune.data import prepare_site
from fedtune.data.sources import check_input
from fedtune.errors import BadInput, BudgetSpent, Waiting
from fedtune.evaluate import evaluate
from fedtune.federation import init_federation
from fedtune.registry import Registry, round_dir_name
from fedtune.rounds import open_round
from fedtune.report import write_report
from fedtune.privacy.dp_fedavg import next_round
from fedtune.privacy.sampling import draw_sample, sampling
from fedtune.train import train_local
from fedtune.wire import SigningKey
from fedtune.wire.update import encode_update, write_update

# What encoding adds to a manifest; a forger re-encodes the rest.
ENCODED_FIELDS = ("sha256", "nonce", "fedtune_version", "created")


def simulate(
    recipe_path: Path,
    out: Path,
    log: Callable[[str], None] = lambda _msg: None,
    method: str | None = None,
    baselines: tuple[str, ...] | list[str] | str = (),
) -> dict:
    """Run the recipe: init, prepare every site, R rounds of train-local then aggregate, evaluate all.

    Args:
        recipe_path: a recipe file or a folder holding recipe.yaml.
        out: an empty folder for the whole run.
        log: receives progress lines.
        method: an aggregation method that replaces the recipe's (recorded in federation.yaml, so
            train-local follows it: ffa freezes A).
        baselines: "local" and/or "central" (a list or a comma-separated string): adapters trained
            without federation for the same step budget, evaluated beside the global versions.

    Returns:
        The report: {"name", "method", "attackers", "base": {site: loss},
        "rounds": [{"version", "eval": {site: loss}, "rejected": [...]}], "baselines": {kind: {site: loss}},
        "tasks": {"base" | version | kind: {site: task metrics}}} ("tasks" for the sites with held-out prompts,
        when the recipe's evaluation.task_examples is above 0).
    """
    kinds = parse_baselines(baselines)
    if method is not None:
        method_class(method)  # an unknown name fails here, before anything is written
    recipe, recipe_dir = load_recipe(recipe_path)
    inputs = {site.name: [recipe_dir / p for p in site.inputs] for site in recipe.sites}
    for site, paths in inputs.items():
        for path in paths:
            if not path.exists():
                raise BadInput(f"{recipe_path}: site {site}: input {path} not found")
            check_input(path)
    if (out / "federation.yaml").exists() or (out / "registry").exists():
        raise BadInput(f"{out}: already holds a federation; choose an empty --out folder")
    attacks = {site.name: site.attack for site in recipe.sites if site.attack is not None}
    drops = {site.name: site.drop for site in recipe.sites if site.drop is not None}
    if len(attacks) == len(recipe.sites):
        raise BadInput(f"{recipe_path}: every site is an attacker; leave at least one honest site")

    plan = recipe.plan()
    if method is not None:
        plan["aggregation"]["method"] = method
    log(f"init: {out / 'federation.yaml'} (model {recipe.model})")
    keys = out / "keys"
    roster = recipe.roster()
    for entry in roster:
        key = SigningKey.generate()
        key.write(keys / f"{entry['name']}.key", keys / f"{entry['name']}.pub")
        entry["key"] = key.public
        entry["exchange_key"] = key.exchange_public
    config = init_federation(out, roster, recipe.model, plan, log=log)
    # A recipe may name its model by folder; the federation records the id, so this run points at the folder.
    model_dir = Path(recipe.model).expanduser() if Path(recipe.model).expanduser().is_dir() else None
    prepared = {}
    for site, paths in inputs.items():
        prepared[site] = out / "prepared" / site
        prepare_site(config, site, paths, prepared[site], log=log, model_dir=model_dir,
                     canaries=recipe.canaries.count, canary_repeats=recipe.canaries.repeats)
    registry = Registry(out / "registry")
    data_dirs = list(prepared.values())

    base_model = models.load_base_model(
        models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "simulate"))
    tasked = {"task_examples": config.evaluation.task_examples, "max_new_tokens": config.evaluation.max_new_tokens,
              "model_dir": model_dir}  # the tokenizer that renders answers is the base model's
    base_eval = evaluate(config, "base", data_dirs, base_model=base_model, **tasked)
    for note in base_eval.get("notes", []):
        log(f"note: {note}")
    report: dict = {
        "name": recipe.name, "method": config.aggregation.method, "attackers": {s: a.model_dump() for s, a in attacks.items()},
        "base": {s: m["loss"] for s, m in base_eval["sites"].items()}, "rounds": [],
    }
    _add_tasks(report, "base", base_eval)
    log("eval base: " + _fmt(report["base"]))
    for number in range(1, recipe.rounds.count + 1):
        started = time.monotonic()  # the round's seconds: training, validation and merging (not the evaluation)
        try:
            next_round(config, read_json(registry.latest() / "manifest.json"), "simulate")
            called = prepared
            if sampling(config):
                drawn = draw_sample(config, registry.root, out / "updates")["sites"]
                called = {site: folder for site, folder in prepared.items() if site in drawn}
                log(f"round {number}: sample drew {', '.join(drawn) or 'no site'} (q {config.privacy.sample_rate})")
            elif config.rounds.samples():
                drawn = open_round(config, registry.root, out / "updates").sites
                called = {site: folder for site, folder in prepared.items() if site in drawn}
                log(f"round {number}: called {', '.join(drawn)} (seeded draw)")
            senders = {site: folder for site, folder in called.items()
                       if not (drops.get(site) and (drops[site].drops("before-sending", number)
                                                    or drops[site].drops("late", number)))}
            for site in sorted(set(called) - set(senders)):
                if drops[site].stage == "before-sending":
                    log(f"{site}: dropped out before sending its round-{number} update")
            parent = registry.latest_name()
            round_dir = train_round(config, senders, registry.root, out / "updates", attacks, log=log,
                                    model_dir=model_dir, keys=keys, number=number)
        except BudgetSpent as spent:  # the coordinator's budget, or a site's own ledger under local DP
            report["stopped"] = str(spent)
            log(f"stopped before round {number}: {spent}")
            break
        if config.privacy.secure_aggregation:
            answering = [site for site in senders
                         if not (drops.get(site) and drops[site].drops("before-unmasking", number))]
            result = secure_round(config, registry.root, round_dir, answering, keys, log)
        else:
            snapshot = None
            if config.monitor.loo_eval:  # the registry before this round, for the leave-one-out candidates
                from fedtune.monitor import snapshot_registry

                snapshot = snapshot_registry(registry.root, out / ".loo-eval")
            try:
                result = aggregate_round(config, registry.root, round_dir, warn=log, closed=True)
            except Waiting as waiting:  # an async buffer that the round's updates do not fill
                raise BadInput(f"simulate: round {number} cannot be merged ({waiting}); lower "
                               "aggregation.async.buffer to what a round sends") from None
        # Stragglers: they trained from the round's parent and send once the round has closed.
        for site in sorted(s for s in called if drops.get(s) and drops[s].drops("late", number)):
            train_local(config, site, called[site], registry.path_of(parent), out / "updates", log=log,
                        model_dir=model_dir, key=keys / f"{site}.key")
            log(f"{site}: sent its round-{number} update late, after the round closed")
        seconds = round(time.monotonic() - started, 3)
        # Answering the held-out prompts costs several times the loss (measured on the quickstart), so the
        # versions between the first and the last are scored by loss alone unless evaluation.every_version.
        scored = config.evaluation.every_version or number == recipe.rounds.count
        scores = evaluate(config, result.folder, data_dirs, base_model=base_model,
                          **(tasked if scored else {**tasked, "task_examples": 0}))
        _add_tasks(report, result.version, scores)
        epsilon = (read_json(result.folder / "manifest.json").get("privacy") or {}).get("epsilon")
        report["rounds"].append({"version": result.version, "eval": {s: m["loss"] for s, m in scores["sites"].items()},
                                 "rejected": result.rejected, **({"epsilon": epsilon} if epsilon is not None else {}),
                                 "seconds": seconds})
        log(f"eval {result.version}: " + _fmt(report["rounds"][-1]["eval"]))
        if not config.privacy.secure_aggregation and snapshot is not None:
            from fedtune.monitor import loo_candidate_losses, loo_eval_records

            without = loo_candidate_losses(config, snapshot, round_dir, out / "coordinator.key", lambda folder: {
                s: m["loss"] for s, m in evaluate(config, folder, data_dirs, base_model=base_model)["sites"].items()},
                log=log)
            report["rounds"][-1]["loo_eval"] = loo_eval_records(report["rounds"][-1]["eval"], without)
    final = report["rounds"][-1]["version"] if report["rounds"] else None
    if final is not None and "tasks" in report and final not in report["tasks"]:  # the run stopped early
        _add_tasks(report, final, evaluate(config, registry.path_of(final), data_dirs, base_model=base_model, **tasked))
    if kinds:
        honest = {site: folder for site, folder in prepared.items() if site not in attacks}
        report["baselines"] = run_baselines(
            config, honest, data_dirs, registry.path_of("v0000"), out / "baselines", kinds,
            steps_per_site=recipe.rounds.count * config.training.steps, base_model=base_model, log=log, model_dir=model_dir,
            tasks=report.setdefault("tasks", {}), task_examples=tasked["task_examples"],
            max_new_tokens=tasked["max_new_tokens"])
        if not report["tasks"]:
            del report["tasks"]
    write_report(out, report)
    return report


def train_round(
    config: FederationConfig,
    prepared: dict[str, Path],
    registry: Path,
    updates: Path,
    attacks: dict[str, Attack] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    model_dir: Path | None = None,
    keys: Path | None = None,
    number: int | None = None,
) -> Path:
    """Every site in `prepared` trains its update from the registry's LATEST; attackers then forge theirs.

    keys: the folder of the sites' private keys (SITE.key), when the federation signs updates.
    number: the round, for a round that may have no site (a site sample that drew none).

    Returns:
        The round's updates folder (updates/round-NNNN).
    """
    attacks = attacks or {}
    folder = None
    for site, data in prepared.items():
        key = keys / f"{site}.key" if keys is not None else None
        folder = train_local(config, site, data, registry, updates, log=log, model_dir=model_dir, key=key)
        if site in attacks:
            forge_update(folder, attacks[site], key)
            log(f"{site}: sent a forged update ({attacks[site].kind}, factor {attacks[site].factor:g})")
    if folder is None:
        if number is None:
            raise BadInput("simulate: no sites to train")
        empty = updates / round_dir_name(number)
        empty.mkdir(parents=True, exist_ok=True)
        return empty
    return folder.parent


def secure_round(config: FederationConfig, registry: Path, round_dir: Path, answering: list[str], keys: Path,
                 log: Callable[[str], None] = lambda _msg: None):
    """A masked round's three steps: aggregate writes the unmask request, each site in `answering` answers, aggregate
    completes the round."""
    from fedtune.privacy.secagg_site import answer_unmask

    try:
        # completes only if the answers are in already
        return aggregate_round(config, registry, round_dir, warn=log, closed=True)
    except Waiting as waiting:
        log(f"aggregate: {waiting}")
    for site in answering:
        answer_unmask(config, site, keys / f"{site}.key", round_dir, log=log)
        log(f"{site}: answered the unmask request")
    silent = sorted(set(config.site_names()) - set(answering))
    if silent:
        log(f"not answering: {', '.join(silent)}")
    try:
        return aggregate_round(config, registry, round_dir, warn=log, closed=True)
    except Waiting as waiting:
        raise BadInput(f"simulate: {round_dir.name} cannot be unmasked with the sites that answered "
                       f"({waiting})") from None


def forge_update(folder: Path, attack: Attack, site_key: Path | None = None) -> Path:
    """Replace the update in `folder` by what `attack` sends, signed with the attacker's own `site_key`.

    sign-flip: delta × (−factor); scale: delta × factor; noise: Gaussian noise with std factor × the
    honest delta's std, per tensor; nan: a NaN written into one tensor. The noise is seeded by the
    site and round, so a rerun forges the same update.
    """
    manifest = read_json(folder / "manifest.json")
    tensors = read_tensors(folder / ADAPTER_FILE)
    seed = zlib.crc32(f"{manifest['site']}/{manifest['round']}".encode())
    generator = torch.Generator().manual_seed(seed)
    forged = {}
    for key in sorted(tensors):
        delta = tensors[key].to(torch.float32)
        if attack.kind == "sign-flip":
            delta = delta * -attack.factor
        elif attack.kind == "scale":
            delta = delta * attack.factor
        elif attack.kind == "noise":
            std = float(delta.std()) if delta.numel() > 1 else abs(float(delta.flatten()[0]))
            delta = torch.randn(delta.shape, generator=generator) * (attack.factor * std)
        forged[key] = delta.to(tensors[key].dtype).contiguous()
    if attack.kind == "nan":
        first = min(forged)
        forged[first] = forged[first].clone()
        forged[first].view(-1)[0] = math.nan
    fields = {k: v for k, v in manifest.items() if k not in ENCODED_FIELDS}
    signer = SigningKey.load(site_key) if site_key is not None else None
    return write_update(folder, encode_update(forged, fields, read_json(folder / CONFIG_FILE), signer), replace=True)


def _add_tasks(report: dict, name: str, result: dict) -> None:
    """report["tasks"][name]: each site's task metrics in an `evaluate` result, if it has any."""
    sites = {site: m["task"] for site, m in result["sites"].items() if "task" in m}
    if sites:
        report.setdefault("tasks", {})[name] = sites


def _fmt(losses: dict) -> str:
    return ", ".join(f"{site} {loss:.4f}" for site, loss in losses.items())
