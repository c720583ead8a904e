"""Federation quality: how close each aggregation method gets to pooling the data, and what attackers do.

    python benchmarks/federation_quality.py --save benchmarks/results/federation_quality_cpu.json   # ~30 min, 2 cores
    python benchmarks/federation_quality.py --report benchmarks/results/federation_quality_cpu.json # reprint a record
    python benchmarks/federation_quality.py --model PATH --steps 2 --rounds 2   # a tiny model: checks the script
    python benchmarks/federation_quality.py --sweep 2x3,6x1,3x2 --save benchmarks/results/federation_quality_sweep_cpu.json

Table 1 (recipes/non-iid, five sites, five domains): eval loss per site and mean for the base model,
local-only adapters (each site alone, on its own eval split), a centralized adapter (all data pooled,
same total steps) and the global version after the last round of fedavg, svd, ffa and stack, with the
share of the local→central gap on mean loss each method closes (n/a when centralized is not better
than local-only: there is no gap to close).

Table 2 (attackers, sign-flip × 20; × 10 left fedavg within 10 % of clean in the 2-of-7 setting):
1 of 5 sites (the recipe's roster) and 2 of 7 (clinic and bank each split across two sites; one half
of each attacks), eval loss averaged over the honest sites for fedavg, trimmed-mean, median and krum
beside the clean run (fedavg, every site honest, the attackers' honest updates included).

The sweep (--sweep ROUNDSxSTEPS,...; --methods, default fedavg,stack) replaces both tables: each method's
global version after R rounds of S steps per site, beside local-only and centralized trained for the same
R × S steps per site, so budgets with equal R × S show what more rounds of communication buy, and larger
R × S what more local work buys. Its gap is measured on every site's split (the own-split gap is often not
defined, see Table 1), on the mean and on the worst single split.

Everything runs through fedtune's stage functions (init_federation, prepare_site, train_local,
aggregate_round, evaluate) and the attack forging of `fedtune simulate`. To fit 2 CPU cores: each site
is prepared once per roster; round-1 updates start from the same v0000, so they are trained once and
aggregated by every rule (ffa, which trains B only, gets its own; the 7-site roster copies the
unsplit sites' from the 5-site one); only later rounds are per method. Training is seeded, so a rerun
gives the same numbers; with --work a rerun reuses the finished runs it finds (e.g. to try another
--attack without retraining Table 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("fedavg", "svd", "ffa", "stack", "fedavg-server-lr")
EXACT = ("svd", "stack", "ffa")
ROBUST = ("trimmed-mean", "median", "krum", "multi-krum")
STARTED = time.perf_counter()
REUSED: list[str] = []  # rosters an earlier run left in --work (their finished runs are not trained again)


def fail(message: str) -> None:
    """Bad input: one line naming what and the fix, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def log(message: str) -> None:
    elapsed = time.perf_counter() - STARTED
    print(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}", file=sys.stderr, flush=True)


class Roster:
    """One federation: its config, prepared sites and the registry holding v0000 (never advanced)."""

    def __init__(self, folder: Path, inputs: dict[str, list[Path]], model: str, plan: dict):
        from fedtune.data import prepare_site
        from fedtune.federation import init_federation

        self.folder = folder
        self.registry = folder / "registry"
        self.prepared = {site: folder / "prepared" / site for site in inputs}
        if (folder / "federation.yaml").is_file() and all((p / "data_card.json").is_file() for p in self.prepared.values()):
            self.config = self._reopen(folder, inputs, plan)
            return
        shutil.rmtree(folder, ignore_errors=True)  # a run interrupted during setup starts this roster afresh
        self.config = init_federation(folder, list(inputs), model, plan)
        for site, paths in inputs.items():
            prepare_site(self.config, site, paths, self.prepared[site])

    @staticmethod
    def _reopen(folder: Path, inputs: dict, plan: dict):
        """The federation an earlier run left in --work, if it was made with the same settings."""
        from fedtune.config import TrainingPlan, load_federation

        config = load_federation(folder / "federation.yaml")
        same = config.model_dump(include=set(TrainingPlan.model_fields), by_alias=True) == {k: v for k, v in plan.items() if k != "name"}
        if not same or config.site_names() != list(inputs):
            fail(f"{folder}: holds a federation with other settings or sites; give another --work folder")
        REUSED.append(folder.name)
        log(f"{folder.name}: reusing the federation and prepared data left in {folder}")
        return config

    def with_method(self, method: str):
        """The federation with another aggregation method (ffa: train-local then freezes A)."""
        config = self.config.model_copy(deep=True)
        config.aggregation.method = method
        return config

    def fork(self, name: str) -> tuple[Path, Path]:
        """(registry, updates root) of a new run starting at this roster's v0000."""
        from fedtune.registry import COORDINATOR_KEY

        run = self.folder / "runs" / name
        shutil.copytree(self.registry / "v0000", run / "registry" / "v0000")
        shutil.copy2(self.folder / COORDINATOR_KEY, run / COORDINATOR_KEY)  # the fork's versions are signed with it too
        (run / "registry" / "LATEST").write_text("v0000\n")
        return run / "registry", run / "updates"

    def first_round(self, name: str, config=None, reuse: Roster | None = None) -> Path:
        """Round-1 updates of every site from v0000, trained once and shared by the runs that start there.

        A site that `reuse` (another roster) already trained from the same v0000 on the same prepared
        data is copied: training is seeded by site and round, so it would give the same update.
        """
        from fedtune.artifacts import read_json
        from fedtune.train import train_local

        config = config or self.config
        updates = self.folder / "shared" / name
        if (updates / "round-0001").is_dir() and {p.name for p in (updates / "round-0001").iterdir()} == set(self.prepared):
            return updates / "round-0001"  # left by an earlier run in --work
        shutil.rmtree(updates, ignore_errors=True)
        same_start = reuse is not None and _v0000_sha(reuse.registry) == _v0000_sha(self.registry)
        for site, data in self.prepared.items():
            earlier = reuse.folder / "shared" / name / "round-0001" / site if same_start else None
            if earlier and earlier.is_dir() and site in reuse.prepared and \
                    read_json(reuse.prepared[site] / "data_card.json")["files"] == read_json(data / "data_card.json")["files"]:
                shutil.copytree(earlier, updates / "round-0001" / site)
                log(f"{site}: round 1 update reused from {reuse.folder.name}")
            else:
                train_local(config, site, data, self.registry, updates, log=log)
        return updates / "round-0001"


def _v0000_sha(registry: Path) -> str:
    return json.loads((registry / "v0000" / "manifest.json").read_text())["adapter_sha256"]


def run(roster: Roster, name: str, rounds: int, first: Path, config=None, attacks=None, **overrides) -> list[Path]:
    """A federation run from v0000: round 1 aggregates `first` (attackers forge their copy of it),
    later rounds train from the run's own versions. Returns every version folder, v0001 first."""
    from fedtune.aggregate import aggregate_round
    from fedtune.simulate import forge_update, train_round

    config = config or roster.config
    registry, updates = roster.folder / "runs" / name / "registry", roster.folder / "runs" / name / "updates"
    # A run left in --work (or by a shorter budget of the sweep) with the same settings goes on from its LATEST:
    # training is seeded by site and round, so rounds 1..k of a longer run are the shorter run's.
    have = int((registry / "LATEST").read_text().strip()[1:]) if (registry / "LATEST").is_file() else 0
    versions = [registry / f"v{n:04d}" for n in range(1, min(have, rounds) + 1)]
    if have == 0:
        shutil.rmtree(roster.folder / "runs" / name, ignore_errors=True)
        registry, updates = roster.fork(name)
    for stale in (p for p in updates.glob("round-*") if int(p.name[6:]) > have):  # an interrupted round
        shutil.rmtree(stale)
    for number in range(have + 1, rounds + 1):
        if number == 1:
            round_dir = updates / first.name
            shutil.copytree(first, round_dir)
            for site, attack in (attacks or {}).items():
                forge_update(round_dir / site, attack)
        else:
            round_dir = train_round(config, roster.prepared, registry, updates, attacks, log=log)
        result = aggregate_round(config, registry, round_dir, warn=log, method=config.aggregation.method, **overrides)
        versions.append(result.folder)
        log(f"{name}: {result.version} ({len(result.contributors)} contributors, {len(result.rejected)} rejected)")
    return versions


def losses(roster: Roster, adapter, sites, base_model) -> dict[str, float]:
    from fedtune.evaluate import evaluate

    scores = evaluate(roster.config, adapter, [roster.prepared[s] for s in sites], base_model=base_model)
    return {s: m["loss"] for s, m in scores["sites"].items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def split_inputs(work: Path, inputs: dict[str, list[Path]], split: tuple[str, ...]) -> dict[str, list[Path]]:
    """Each domain in `split` becomes two sites, <name>-a and <name>-b, holding alternate records."""
    out = {}
    for site, paths in inputs.items():
        if site not in split:
            out[site] = paths
            continue
        lines = [line for path in paths for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for half, part in (("a", lines[0::2]), ("b", lines[1::2])):
            path = work / "raw" / f"{site}-{half}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(part) + "\n", encoding="utf-8")
            out[f"{site}-{half}"] = [path]
    return out


def baseline_rows(roster: Roster, baselines: Path, steps_per_site: int, base_model) -> dict[str, dict[str, float]]:
    """local (each site's adapter on its own split), local-all (every local adapter on every split, averaged
    per split) and central eval losses, the adapters trained from v0000 for `steps_per_site` per site."""
    from fedtune.baselines import run_baselines

    sites = list(roster.prepared)
    if (baselines / "losses.json").is_file():  # left by an earlier run in --work: the adapters' scores
        return json.loads((baselines / "losses.json").read_text())
    table = {}
    if (baselines / "central" / "manifest.json").is_file():  # written last, so every local one is there too
        log(f"baselines ({steps_per_site} steps per site): reusing the adapters left in --work")
        table["central"] = losses(roster, baselines / "central", sites, base_model)
    else:
        shutil.rmtree(baselines, ignore_errors=True)
        log(f"baselines: local-only per site and centralized, from v0000, {steps_per_site} steps per site")
        table.update(run_baselines(roster.config, roster.prepared, list(roster.prepared.values()), roster.registry / "v0000",
                                   baselines, ("local", "central"), steps_per_site=steps_per_site,
                                   base_model=base_model, log=log))
    # Every local-only adapter on every site: what one site alone reaches on the federation's task.
    on_all = {owner: losses(roster, baselines / "local" / owner, sites, base_model) for owner in sites}
    table["local"] = {s: on_all[s][s] for s in sites}
    table["local-all"] = {s: mean(on_all[owner][s] for owner in sites) for s in sites}
    (baselines / "losses.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def quality_study(roster: Roster, rounds: int, steps: int, base_model) -> tuple[dict, dict[str, list[Path]]]:
    """Table 1. Returns its record and every method's version folders (the attack study reuses fedavg's)."""
    sites = list(roster.prepared)
    table = {"base": losses(roster, "base", sites, base_model)}
    table.update(baseline_rows(roster, roster.folder / "baselines", rounds * steps, base_model))
    shared = roster.first_round("round1-AB")
    versions = {}
    for method in METHODS:
        # fedavg-server-lr: FedOpt with η = K, i.e. the sum of the sites' deltas each round, so a round
        # moves as far as the K × steps a centralized run takes in the same time.
        extra = {"server_lr": float(len(sites))} if method == "fedavg-server-lr" else {}
        config = roster.with_method("fedavg" if extra else method)
        first = roster.first_round("round1-B", config) if method == "ffa" else shared
        versions[method] = run(roster, method, rounds, first, config=config, **extra)
        table[method] = losses(roster, versions[method][-1], sites, base_model)
        log(f"{method}: mean eval loss {mean(table[method].values()):.4f}")
    return table, versions


def attack_study(roster: Roster, attackers: tuple[str, ...], rounds: int, attack, base_model,
                 shared: Path | None = None, clean: Path | None = None, reuse: Roster | None = None) -> dict:
    """Table 2, one setting: mean eval loss over the honest sites of the clean run and each rule under attack."""
    honest = [s for s in roster.prepared if s not in attackers]
    attacks = {s: attack for s in attackers}
    shared = shared or roster.first_round("round1-AB", reuse=reuse)
    if clean is None:
        clean = run(roster, "clean", rounds, shared)[-1]
    row = {"clean": mean(losses(roster, clean, honest, base_model).values())}
    # The trim must cover the attackers: the smallest multiple of 0.1 with ⌊β·n⌋ ≥ f.
    trim = next(t / 10 for t in range(1, 5) if int(t / 10 * len(roster.prepared)) >= len(attackers))
    for rule in ("fedavg", *ROBUST):
        settings = ({"trim": trim} if rule == "trimmed-mean" else {"byzantine": len(attackers)} if "krum" in rule else {})
        tag = f"-trim{trim:g}" if rule == "trimmed-mean" else ""
        versions = run(roster, f"{rule}{tag}-{attack.kind}-{attack.factor:g}", rounds, shared, config=roster.with_method(rule), attacks=attacks, **settings)
        row[rule] = mean(losses(roster, versions[-1], honest, base_model).values())
        log(f"{len(attackers)} of {len(roster.prepared)} attacking, {rule}: {row[rule]:.4f} (clean {row['clean']:.4f})")
    return {"sites": len(roster.prepared), "attackers": list(attackers), "honest": honest, "trim": trim, "loss": row}


def gap_closed(table: dict, sites: list[str], local_row: str = "local") -> dict[str, float | None]:
    """Per method, (L_local − L_method)/(L_local − L_central) on mean eval loss; None for every method
    when centralized training is not better than local-only (the gap is then not defined)."""
    local, central = (mean(table[k][s] for s in sites) for k in (local_row, "central"))
    return {m: (local - mean(table[m][s] for s in sites)) / (local - central) if local > central else None for m in METHODS}


def print_table1(table: dict, sites: list[str], shares: dict, shares_all: dict) -> None:
    print("| model | " + " | ".join(sites) + " | mean | gap closed (own site) | gap closed (every site) |")
    print("|---|" + "---|" * (len(sites) + 3))

    def cell(values, name):
        return "" if name not in values else "n/a" if values[name] is None else f"{100 * values[name]:.1f} %"

    for name in ("base", "local", "local-all", "central", *METHODS):
        if name not in table:
            continue
        row = table[name]
        label = {"local": "local-only (each site's adapter on its own split)",
                 "local-all": "local-only (every site's adapter on every split)",
                 "central": "centralized (pooled)", "fedavg-server-lr": f"fedavg, server lr {len(sites)} (FedOpt)"}.get(name, name)
        print(f"| {label} | " + " | ".join(f"{row[s]:.4f}" for s in sites)
              + f" | {mean(row[s] for s in sites):.4f} | {cell(shares, name)} | {cell(shares_all, name)} |")


def print_table2(settings: list[dict]) -> None:
    print("| setting | clean (fedavg, no attackers) | fedavg | trimmed-mean (β) | median | krum (f = attackers) | multi-krum (f, keep n−f) |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        row = s["loss"]
        cells = [f"{row['clean']:.4f}"] + [f"{row[r]:.4f} ({100 * (row[r] / row['clean'] - 1):+.1f} %)" for r in ("fedavg", *ROBUST)]
        print(f"| {len(s['attackers'])} of {s['sites']} attacking ({', '.join(s['attackers'])}; β = {s.get('trim', 0.2):g}) | "
              + " | ".join(cells) + " |")


def goal(ok: bool, text: str) -> dict:
    print(f"{'PASS' if ok else 'MISS'}  {text}")
    return {"goal": text, "pass": bool(ok)}


def report(record: dict) -> dict:
    """Print the header, both tables and the goals of a measured record; returns it with gap_closed and goals."""
    sites, table1, steps, rounds = record["sites"], record["table1"], record["training"]["steps"], record["rounds"]
    attack, attack_rounds = record["attack"], record["attack_rounds"]
    print(f"# Federation quality — {record['model']}, {', '.join(sites)}; seq_len {record['seq_len']}, LoRA r "
          f"{record['lora']['r']} on {','.join(record['lora']['target_modules'])}, {steps} steps × batch "
          f"{record['training']['batch_size']} per round; {record['threads']} CPU threads")
    print(f"# Table 1: {rounds} rounds. Table 2: {attack_rounds} round(s)"
          + (f" — fewer than Table 1's {rounds} to fit the CPU budget" if attack_rounds < rounds else "")
          + f"; attack {attack['kind']} × {attack['factor']:g}.")
    if record.get("reused_from_work"):
        print(f"# Reused from --work: the {' and '.join(record['reused_from_work'])}-site rosters' finished runs (same "
              f"settings, deterministic); the time below covers this invocation only.")
    shares = gap_closed(table1, sites)
    shares_all = gap_closed(table1, sites, "local-all")
    print(f"\n## Table 1 — non-IID, {len(sites)} sites, eval loss after {rounds} rounds "
          f"(local-only: {rounds * steps} steps per site; centralized: {rounds * steps * len(sites)} steps)\n")
    print_table1(table1, sites, shares, shares_all)
    print(f"\n## Table 2 — attackers ({attack['kind']} × {attack['factor']:g}), mean eval loss of the honest sites after "
          f"{attack_rounds} round(s); in brackets: change from the clean run\n")
    print_table2(record["table2"])
    print()
    means = {m: mean(table1[m][s] for s in sites) for m in METHODS}
    best_exact = min(EXACT, key=means.get)
    goals = [goal(means[best_exact] <= means["fedavg"], f"an exact method at least as good as fedavg on mean eval loss "
                                                        f"(best exact: {best_exact} {means[best_exact]:.4f}, fedavg {means['fedavg']:.4f})")]
    if all(v is not None for v in shares_all.values()):
        best = max(shares_all, key=shares_all.get)
        goals.append(goal(shares_all[best] >= 0.9, f"the best method closes >= 90 % of the local-only -> centralized gap "
                                                   f"on every site's eval split ({best}: {100 * shares_all[best]:.1f} %)"))
    if all(v is None for v in shares.values()):
        local, central = (mean(table1[k][s] for s in sites) for k in ("local", "central"))
        goals.append(goal(False, f"the best method closes >= 90 % of the local-only -> centralized gap (no gap: "
                                 f"centralized {central:.4f} is not below local-only {local:.4f}; best method "
                                 f"{min(means, key=means.get)} {min(means.values()):.4f})"))
    else:
        best = max(shares, key=shares.get)
        goals.append(goal(shares[best] >= 0.9, f"the best method closes >= 90 % of the local-only -> centralized gap "
                                               f"({best}: {100 * shares[best]:.1f} %)"))
    for s in record["table2"]:
        row, label = s["loss"], f"{len(s['attackers'])} of {s['sites']}"
        for rule in ROBUST:
            goals.append(goal(row[rule] <= 1.05 * row["clean"], f"{label}: {rule} within 5 % of the clean run "
                                                                 f"({100 * (row[rule] / row['clean'] - 1):+.1f} %)"))
        goals.append(goal(row["fedavg"] >= 1.10 * row["clean"], f"{label}: fedavg hurt by >= 10 % "
                                                                f"({100 * (row['fedavg'] / row['clean'] - 1):+.1f} %)"))
    split = (f" (Table 1 {record['seconds_table1'] / 60:.1f} min, Table 2 {(record['seconds'] - record['seconds_table1']) / 60:.1f} min)"
             if "seconds_table1" in record else "")
    print(f"\ntotal {record['seconds'] / 60:.1f} min{split}")
    return {**record, "gap_closed": shares, "gap_closed_every_site": shares_all, "goals": goals}


def sweep_study(roster: Roster, budgets: list[tuple[int, int]], methods: list[str], base_model, record: dict,
                save=lambda _record: None, earlier: dict | None = None) -> dict:
    """The sweep: for each method and (rounds, steps) budget, the global version after `rounds` rounds of `steps`
    steps per site, beside local-only and centralized trained for the same rounds × steps per site.

    A method's runs with the same steps are one run read at each budget's round (rounds 1..k of a longer run are
    the shorter one's); baselines are trained once per total steps per site. `earlier`, a Table 1 record of the
    same setup, gives the baselines and method rows of its budget instead of training them again (training is
    seeded: checked by the base model's losses, which must match). `record` is filled in as runs finish and
    handed to `save`, so an interrupted sweep keeps what it measured."""
    sites = list(roster.prepared)
    scored = roster.folder / "base_losses.json"  # the base model's scores, kept in --work for a rerun
    if not scored.is_file():
        scored.write_text(json.dumps(losses(roster, "base", sites, base_model)) + "\n")
    record.update(base=json.loads(scored.read_text()), baselines={}, runs=[])
    if earlier is not None:
        if any(abs(earlier["table1"]["base"][s] - record["base"][s]) > 1e-4 for s in sites):
            fail(f"--reuse: the base model's losses differ from the record's ({earlier['table1']['base']} here "
                 f"{record['base']}); the data or model changed, measure without --reuse")
        total = earlier["rounds"] * earlier["training"]["steps"]
        record["baselines"][str(total)] = {k: earlier["table1"][k] for k in ("local", "local-all", "central")}
        record["runs"] += [{"rounds": earlier["rounds"], "steps": earlier["training"]["steps"], "method": m,
                            "loss": earlier["table1"][m], "reused": True} for m in methods]
    for method in methods:
        for rounds, steps in budgets:
            total = rounds * steps
            if any((r["rounds"], r["steps"], r["method"]) == (rounds, steps, method) for r in record["runs"]):
                continue
            if str(total) not in record["baselines"]:
                record["baselines"][str(total)] = baseline_rows(roster, roster.folder / f"baselines-{total}", total, base_model)
                save(record)
            config = roster.with_method(method)
            config.training.steps = steps
            first = roster.first_round(f"round1-{'B' if method == 'ffa' else 'AB'}-s{steps}", config)
            version = run(roster, f"{method}-s{steps}", rounds, first, config=config)[-1]
            scored = version.parent.parent / f"losses-{version.name}.json"  # kept in --work for a rerun
            if not scored.is_file():
                scored.write_text(json.dumps(losses(roster, version, sites, base_model)) + "\n")
            row = {"rounds": rounds, "steps": steps, "method": method, "loss": json.loads(scored.read_text())}
            record["runs"].append(row)
            log(f"sweep {rounds} x {steps}, {method}: mean eval loss {mean(row['loss'].values()):.4f}")
            save(record)
    return record


def sweep_shares(record: dict, row: dict) -> dict[str, float | None]:
    """A sweep row's share of the gap: own (local-only on its own split → centralized, mean loss), every
    (every local-only adapter on every split → centralized, mean loss) and worst (the smallest share of
    that gap over the single splits). None where centralized is not better, so there is no gap."""
    base = record["baselines"][str(row["rounds"] * row["steps"])]
    sites, loss = record["sites"], row["loss"]

    def share(local: float, central: float, value: float) -> float | None:
        return (local - value) / (local - central) if local > central else None

    def on_mean(key: str) -> float | None:
        return share(*(mean(values[s] for s in sites) for values in (base[key], base["central"], loss)))

    per_split = [share(base["local-all"][s], base["central"][s], loss[s]) for s in sites]
    return {"own": on_mean("local"), "every": on_mean("local-all"),
            "worst": None if None in per_split else min(per_split)}


def report_sweep(record: dict) -> dict:
    """Print the sweep's table and goal; returns the record with each row's shares and the goals."""
    sites, pct = record["sites"], lambda v: "n/a" if v is None else f"{100 * v:.1f} %"
    print(f"# Federation quality sweep — {record['model']}, {', '.join(sites)}; seq_len {record['seq_len']}, LoRA r "
          f"{record['lora']['r']} on {','.join(record['lora']['target_modules'])}, batch "
          f"{record['training']['batch_size']}, lr {record['training']['lr']:g}; {record['threads']} CPU threads"
          + ("" if record.get("complete") else " — INCOMPLETE: the budgets below are the ones that finished"))
    if record.get("reused"):
        rounds, steps = record["reused"]["budget"]
        print(f"# The {rounds} × {steps} rows (baselines and methods, marked *) are those of {record['reused']['from']} "
              f"(Table 1, {record['reused']['threads']} threads), not trained again; the base model's losses match it.")
    print(f"\nbase model: mean eval loss {mean(record['base'][s] for s in sites):.4f}\n")
    print("| rounds × steps | steps per site | model | mean eval loss | gap closed (own site) | gap closed (every site) "
          "| worst split's gap closed (every site) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for total, base in record["baselines"].items():
        for key, label in (("local", "local-only, own split"), ("local-all", "local-only, every split"), ("central", "centralized")):
            print(f"| | {total} | {label} | {mean(base[key][s] for s in sites):.4f} | | | |")
        for row in (r for r in record["runs"] if r["rounds"] * r["steps"] == int(total)):
            shares = sweep_shares(record, row)
            rows.append({**row, "gap_closed": shares})
            print(f"| {row['rounds']} × {row['steps']} | {total} | {row['method']}{' *' if row.get('reused') else ''} | {mean(row['loss'].values()):.4f} | "
                  f"{pct(shares['own'])} | {pct(shares['every'])} | {pct(shares['worst'])} |")
    print()
    ranked = [r for r in rows if r["gap_closed"]["worst"] is not None]
    best = max(ranked, key=lambda r: r["gap_closed"]["worst"], default=None)
    goals = [goal(best is not None and best["gap_closed"]["worst"] >= 0.9,
                  "some budget closes >= 90 % of the local-only -> centralized gap (every site) on every site's split"
                  + ("" if best is None else f" (best: {best['method']} at {best['rounds']} x {best['steps']}, worst split "
                                             f"{pct(best['gap_closed']['worst'])}, mean {pct(best['gap_closed']['every'])})"))]
    print(f"\ntotal {record['seconds'] / 60:.1f} min")
    return {**record, "runs": rows or record["runs"], "goals": goals}


def measure(args) -> dict:
    """Run both studies; returns the record of every loss measured (no summaries)."""
    import torch

    from fedtune import models
    from fedtune.config import Attack, load_recipe

    recipe, recipe_dir = load_recipe(args.recipe)
    plan = recipe.plan()
    if args.steps:
        plan["training"]["steps"] = args.steps
    rounds = args.rounds or recipe.rounds.count
    steps = plan["training"]["steps"]
    kind, _, factor = args.attack.partition(":")
    attack = Attack(kind=kind, factor=float(factor or 10))
    model = args.model or recipe.model
    inputs = {s.name: [recipe_dir / p for p in s.inputs] for s in recipe.sites}
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; " + (f"sweep {args.sweep} ({args.methods})" if args.sweep else
                                   f"Table 1 {rounds} rounds, Table 2 {args.attack_rounds} round(s)"))

    if Path(model).is_dir():  # the federation records an id; the sites find the weights in this folder
        os.environ[models.MODEL_DIR_ENV] = str(Path(model).resolve())
    five = Roster(work / "five", inputs, model, plan)
    base_model = models.load_base_model(models.locate_base(five.config.base_model.id, five.config.base_model.sha256))
    about = {"model": model, "recipe": _shown(args.recipe), "seq_len": plan["seq_len"], "lora": plan["lora"],
             "training": plan["training"], "sites": list(five.prepared), "threads": torch.get_num_threads()}
    if args.sweep:
        budgets = [tuple(int(n) for n in b.split("x")) for b in args.sweep.split(",")]
        methods = args.methods.split(",")
        earlier = None
        if args.reuse:
            earlier = json.loads(args.reuse.read_text())
            if any(earlier.get(k) != about[k] for k in ("model", "seq_len", "lora", "sites")) or \
                    {**earlier["training"], "steps": 0} != {**plan["training"], "steps": 0}:
                fail(f"--reuse {args.reuse}: measured with another model, data or training settings; measure without it")
            about["reused"] = {"from": str(args.reuse), "budget": [earlier["rounds"], earlier["training"]["steps"]],
                               "threads": earlier["threads"]}

        def save(record):
            if args.save:
                write_record(args.save, {**record, "seconds": round(time.perf_counter() - STARTED, 1)})

        record = sweep_study(five, budgets, methods, base_model, {**about, "budgets": budgets, "methods": methods,
                                                                   "complete": False}, save, earlier)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return {**record, "complete": True, "seconds": round(time.perf_counter() - STARTED, 1)}
    sites = list(five.prepared)
    table1, versions = quality_study(five, rounds, steps, base_model)
    seconds1 = time.perf_counter() - STARTED

    # 1 of 5: the recipe's roster. Its round-1 updates and its clean run are Table 1's fedavg run.
    clean5 = versions["fedavg"][args.attack_rounds - 1] if args.attack_rounds <= rounds else None
    setting5 = attack_study(five, (sites[-1],), args.attack_rounds, attack, base_model,
                            shared=five.folder / "shared" / "round1-AB" / "round-0001", clean=clean5)
    split = tuple(sites[:2])
    seven = Roster(work / "seven", split_inputs(work, inputs, split), model, plan)
    setting7 = attack_study(seven, tuple(f"{s}-b" for s in split), args.attack_rounds, attack, base_model, reuse=five)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return {**about, "rounds": rounds, "attack_rounds": args.attack_rounds, "attack": attack.model_dump(),
            "table1": table1, "table2": [setting5, setting7], "seconds": round(time.perf_counter() - STARTED, 1),
            "seconds_table1": round(seconds1, 1), "reused_from_work": REUSED}


def _shown(recipe: Path) -> str:
    path = recipe.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # a reader never sees half a record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "non-iid")
    parser.add_argument("--model", help="base model instead of the recipe's (a tiny one checks the script in seconds)")
    parser.add_argument("--steps", type=int, help="steps per round instead of the recipe's")
    parser.add_argument("--rounds", type=int, help="rounds of Table 1 instead of the recipe's")
    parser.add_argument("--attack-rounds", type=int, default=1,
                        help="rounds of the attack study (default 1: each later round retrains every site once per rule, "
                             "which does not fit ~35 min on 2 cores)")
    parser.add_argument("--attack", default="sign-flip:20", help="KIND:FACTOR every attacker uses (sign-flip, scale, noise)")
    parser.add_argument("--work", type=Path, help="folder for the runs, kept (default: a temporary folder, removed after); "
                                                  "a later run with the same settings reuses the runs it finds there")
    parser.add_argument("--sweep", help="ROUNDSxSTEPS,... : instead of Tables 1 and 2, each method's gap closed at each "
                                         "budget, e.g. 3x10,10x3,30x1 (same steps per site) and 10x10")
    parser.add_argument("--methods", default="fedavg,stack", help="methods the sweep runs (fedavg, svd, ffa, stack)")
    parser.add_argument("--reuse", type=Path, help="with --sweep: a Table 1 record of the same setup whose baselines and "
                                                   "method rows stand for its rounds x steps budget (not trained again)")
    parser.add_argument("--save", type=Path, help="write the JSON record here")
    parser.add_argument("--report", type=Path, help="print the tables and goals of a saved record instead of measuring")
    args = parser.parse_args()

    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for module in ("peft", "transformers", "accelerate", "torch"):  # library deprecation chatter, not results
        warnings.filterwarnings("ignore", module=module)
    if args.sweep and not re.fullmatch(r"[1-9]\d*x[1-9]\d*(,[1-9]\d*x[1-9]\d*)*", args.sweep):
        fail(f"--sweep {args.sweep!r}: give budgets as ROUNDSxSTEPS separated by commas, e.g. 3x10,10x3,30x1")
    unknown = [m for m in args.methods.split(",") if m not in ("fedavg", *EXACT)]
    if unknown:
        fail(f"--methods: unknown method {unknown[0]!r}; choose from fedavg, {', '.join(EXACT)} (comma-separated)")
    if args.report:
        record = json.loads(args.report.read_text())
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        record = measure(args)
    record = report_sweep(record) if "budgets" in record else report(record)
    if args.save:
        write_record(args.save, record)
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
