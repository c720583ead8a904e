"""Federation quality: how close each aggregation method gets to pooling the data, and what attackers do.

    python benchmarks/federation_quality.py                  # embedded SmolLM2-135M, CPU, ~35 min on 2 cores
    python benchmarks/federation_quality.py --save benchmarks/results/federation_quality_cpu.json
    python benchmarks/federation_quality.py --model PATH --steps 2 --attack-rounds 1   # a tiny model: checks the script

Table 1 (recipes/non-iid, five sites, five domains): eval loss per site and mean for the base model,
local-only adapters (each site alone, on its own eval split), a centralized adapter (all data pooled,
same total steps) and the global version after the last round of fedavg, svd, ffa and stack, with the
share of the local→central gap on mean loss each method closes.

Table 2 (attackers, sign-flip × 10): 1 of 5 sites (the recipe's roster) and 2 of 7 (clinic and bank
each split across two sites; one half of each attacks), eval loss averaged over the honest sites for
fedavg, trimmed-mean, median and krum beside the clean run (fedavg, every site honest).

Everything runs through fedtune's stage functions (init_federation, prepare_site, train_local,
aggregate_round, evaluate) and the attack forging of `fedtune simulate`. To fit 2 CPU cores: each site
is prepared once per roster; round-1 updates start from the same v0000, so they are trained once and
aggregated by every rule (ffa, which trains B only, gets its own); only later rounds are per method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("fedavg", "svd", "ffa", "stack")
EXACT = ("svd", "stack", "ffa")
ROBUST = ("trimmed-mean", "median", "krum")
STARTED = time.perf_counter()


def log(message: str) -> None:
    elapsed = time.perf_counter() - STARTED
    print(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}", file=sys.stderr, flush=True)


class Roster:
    """One federation: its config, prepared sites and the registry holding v0000 (never advanced)."""

    def __init__(self, folder: Path, inputs: dict[str, list[Path]], model: str, plan: dict):
        from fedtune.data import prepare_site
        from fedtune.federation import init_federation

        self.folder = folder
        self.config = init_federation(folder, list(inputs), model, plan)
        self.prepared = {}
        for site, paths in inputs.items():
            self.prepared[site] = folder / "prepared" / site
            prepare_site(self.config, site, paths, self.prepared[site])
        self.registry = folder / "registry"

    def with_method(self, method: str):
        """The federation with another aggregation method (ffa: train-local then freezes A)."""
        config = self.config.model_copy(deep=True)
        config.aggregation.method = method
        return config

    def fork(self, name: str) -> tuple[Path, Path]:
        """(registry, updates root) of a new run starting at this roster's v0000."""
        run = self.folder / "runs" / name
        shutil.copytree(self.registry / "v0000", run / "registry" / "v0000")
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
    registry, updates = roster.fork(name)
    versions = []
    for number in range(1, rounds + 1):
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


def quality_study(roster: Roster, rounds: int, steps: int, base_model) -> tuple[dict, dict[str, list[Path]]]:
    """Table 1. Returns its record and every method's version folders (the attack study reuses fedavg's)."""
    from fedtune.baselines import run_baselines

    sites = list(roster.prepared)
    table = {"base": losses(roster, "base", sites, base_model)}
    log("baselines: local-only per site and centralized, from v0000")
    table.update(run_baselines(roster.config, roster.prepared, list(roster.prepared.values()), roster.registry / "v0000",
                               roster.folder / "baselines", ("local", "central"), steps_per_site=rounds * steps,
                               base_model=base_model, log=log))
    shared = roster.first_round("round1-AB")
    versions = {}
    for method in METHODS:
        config = roster.with_method(method)
        first = roster.first_round("round1-B", config) if method == "ffa" else shared
        versions[method] = run(roster, method, rounds, first, config=config)
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
    for rule in ("fedavg", *ROBUST):
        settings = {"trim": 0.2} if rule == "trimmed-mean" else {"byzantine": len(attackers)} if rule == "krum" else {}
        versions = run(roster, f"{rule}-attacked", rounds, shared, config=roster.with_method(rule), attacks=attacks, **settings)
        row[rule] = mean(losses(roster, versions[-1], honest, base_model).values())
        log(f"{len(attackers)} of {len(roster.prepared)} attacking, {rule}: {row[rule]:.4f} (clean {row['clean']:.4f})")
    return {"sites": len(roster.prepared), "attackers": list(attackers), "honest": honest, "loss": row}


def print_table1(table: dict, sites: list[str]) -> dict:
    gap = lambda m: (table["local_mean"] - m) / (table["local_mean"] - table["central_mean"])  # noqa: E731
    print("| model | " + " | ".join(sites) + " | mean | gap closed |")
    print("|---|" + "---|" * (len(sites) + 2))
    shares = {}
    for name in ("base", "local", "central", *METHODS):
        row = table[name]
        avg = mean(row[s] for s in sites)
        share = "" if name in ("base", "local", "central") else f"{100 * gap(avg):.1f} %"
        if share:
            shares[name] = gap(avg)
        label = {"local": "local-only (own site)", "central": "centralized (pooled)"}.get(name, name)
        print(f"| {label} | " + " | ".join(f"{row[s]:.4f}" for s in sites) + f" | {avg:.4f} | {share} |")
    return shares


def print_table2(settings: list[dict]) -> None:
    print("| setting | clean (fedavg, no attackers) | fedavg | trimmed-mean (0.2) | median | krum (f = attackers) |")
    print("|---|---|---|---|---|---|")
    for s in settings:
        row = s["loss"]
        cells = [f"{row['clean']:.4f}"] + [f"{row[r]:.4f} ({100 * (row[r] / row['clean'] - 1):+.1f} %)" for r in ("fedavg", *ROBUST)]
        print(f"| {len(s['attackers'])} of {s['sites']} attacking ({', '.join(s['attackers'])}) | " + " | ".join(cells) + " |")


def goal(ok: bool, text: str) -> dict:
    print(f"{'PASS' if ok else 'MISS'}  {text}")
    return {"goal": text, "pass": bool(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "non-iid")
    parser.add_argument("--model", help="base model instead of the recipe's (a tiny one checks the script in seconds)")
    parser.add_argument("--steps", type=int, help="steps per round instead of the recipe's")
    parser.add_argument("--rounds", type=int, help="rounds of Table 1 instead of the recipe's")
    parser.add_argument("--attack-rounds", type=int, default=2, help="rounds of the attack study (default 2, to fit the CPU budget)")
    parser.add_argument("--attack", default="sign-flip:10", help="KIND:FACTOR every attacker uses (sign-flip, scale, noise)")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary folder, removed after)")
    parser.add_argument("--save", type=Path, help="write the JSON record here")
    args = parser.parse_args()

    import os

    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for module in ("peft", "transformers", "accelerate", "torch"):  # library deprecation chatter, not results
        warnings.filterwarnings("ignore", module=module)
    import torch
    from transformers.utils import logging as hf_logging

    from fedtune import models
    from fedtune.config import Attack, load_recipe

    hf_logging.set_verbosity_error()
    recipe, recipe_dir = load_recipe(args.recipe)
    plan = recipe.plan()
    if args.steps:
        plan["training"]["steps"] = args.steps
    rounds = args.rounds or recipe.rounds
    steps = plan["training"]["steps"]
    kind, _, factor = args.attack.partition(":")
    attack = Attack(kind=kind, factor=float(factor or 10))
    model = args.model or recipe.model
    inputs = {s.name: [recipe_dir / p for p in s.inputs] for s in recipe.sites}
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"# Federation quality — {model}, {', '.join(inputs)}; seq_len {plan['seq_len']}, LoRA r {plan['lora']['r']} "
          f"on {','.join(plan['lora']['target_modules'])}, {steps} steps × batch {plan['training']['batch_size']} per round; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"# Table 1: {rounds} rounds. Table 2: {args.attack_rounds} round(s) (fewer than Table 1's {rounds} to fit "
          f"the CPU budget), attack {attack.kind} × {attack.factor:g}." if args.attack_rounds < rounds else
          f"# Table 2: {args.attack_rounds} rounds, attack {attack.kind} × {attack.factor:g}.")

    five = Roster(work / "five", inputs, model, plan)
    base_model = models.load_base_model(five.config.base_model.id)
    sites = list(five.prepared)
    table1, versions = quality_study(five, rounds, steps, base_model)
    table1["local_mean"] = mean(table1["local"].values())
    table1["central_mean"] = mean(table1["central"].values())
    seconds1 = time.perf_counter() - STARTED

    # 1 of 5: the recipe's roster. Its round-1 updates and its clean run are Table 1's fedavg run.
    attacker5 = (sites[-1],)
    clean5 = versions["fedavg"][args.attack_rounds - 1] if args.attack_rounds <= rounds else None
    setting5 = attack_study(five, attacker5, args.attack_rounds, attack, base_model,
                            shared=five.folder / "shared" / "round1-AB" / "round-0001", clean=clean5)
    split = tuple(sites[:2])
    seven = Roster(work / "seven", split_inputs(work, inputs, split), model, plan)
    setting7 = attack_study(seven, tuple(f"{s}-b" for s in split), args.attack_rounds, attack, base_model, reuse=five)
    seconds = time.perf_counter() - STARTED

    print(f"\n## Table 1 — non-IID, {len(sites)} sites, eval loss after {rounds} rounds "
          f"(local-only: {rounds * steps} steps per site; centralized: {rounds * steps * len(sites)} steps)\n")
    shares = print_table1(table1, sites)
    print(f"\n## Table 2 — attackers ({attack.kind} × {attack.factor:g}), mean eval loss of the honest sites after "
          f"{args.attack_rounds} round(s); in brackets: change from the clean run\n")
    print_table2([setting5, setting7])
    print()
    fedavg_mean = mean(table1["fedavg"][s] for s in sites)
    best_exact = min(EXACT, key=lambda m: mean(table1[m][s] for s in sites))
    best = max(shares, key=shares.get)
    goals = [goal(mean(table1[best_exact][s] for s in sites) <= fedavg_mean,
                  f"an exact method at least as good as fedavg on mean eval loss (best exact: {best_exact})"),
             goal(shares[best] >= 0.9, f"the best method closes >= 90 % of the local-only -> centralized gap "
                                       f"({best}: {100 * shares[best]:.1f} %)")]
    for s in (setting5, setting7):
        row, label = s["loss"], f"{len(s['attackers'])} of {s['sites']}"
        for rule in ROBUST:
            goals.append(goal(row[rule] <= 1.05 * row["clean"], f"{label}: {rule} within 5 % of the clean run "
                                                                 f"({100 * (row[rule] / row['clean'] - 1):+.1f} %)"))
        goals.append(goal(row["fedavg"] >= 1.10 * row["clean"], f"{label}: fedavg hurt by >= 10 % "
                                                                f"({100 * (row['fedavg'] / row['clean'] - 1):+.1f} %)"))
    print(f"\ntotal {seconds / 60:.1f} min (Table 1 {seconds1 / 60:.1f} min, Table 2 {(seconds - seconds1) / 60:.1f} min)")

    if args.save:
        record = {"model": model, "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
                  "seq_len": plan["seq_len"], "lora": plan["lora"], "training": plan["training"], "rounds": rounds,
                  "attack_rounds": args.attack_rounds, "attack": attack.model_dump(), "sites": sites,
                  "table1": table1, "gap_closed": shares, "table2": [setting5, setting7], "goals": goals,
                  "seconds": round(seconds, 1), "threads": torch.get_num_threads()}
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.save}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
