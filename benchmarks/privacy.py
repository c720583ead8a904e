"""Privacy study: what each differential-privacy mode costs in quality and buys against two attacks.

    python benchmarks/privacy.py --save benchmarks/results/privacy_cpu.json     # ~85 min on 2 cores
    python benchmarks/privacy.py --report benchmarks/results/privacy_cpu.json   # reprint a record
    python benchmarks/privacy.py --model PATH --steps 2 --rounds 1 --candidates 200 --only none,local-8
                                                            # a tiny local model: checks the script in a minute

Setup: recipes/non-iid (five sites, five domains, the embedded SmolLM2-135M-Instruct, LoRA r 8 on q_proj/v_proj,
3 rounds of 10 steps of batch 4), every site planting a canary 25 times (`prepare --canaries 1 --canary-repeats
25`: planted 5 times, a canary is not memorized in 30 steps even without DP) in its training split; the audit
covers three sites (clinic, bank, pharmacy) to fit the 2 cores.
Runs: no DP; central and distributed site-level DP-FedAvg and local record-level DP-SGD, each at ε ≈ 8 and
ε ≈ 1 (δ = 1e-5, over the rounds run; central/distributed calibrate z at init, local sites on their first round).
Each run is a whole `fedtune simulate` in its own process (its peak memory is its own), then `fedtune audit`'s
stage function on the last version: canary exposure among 10⁴ candidates and the loss-based membership
inference AUC (train rows vs held-out rows, the version's loss minus the base model's).

Reported per run: ε of the last version (for local: the largest site ε), mean eval loss and its improvement
over the base model as a share of the no-DP run's, mean exposure and its ratio to the no-DP run's, mean MIA
AUC, seconds of training per round (the sites' own timers, summed) with the ratio to the no-DP run, and peak
RSS. The goals (issue: at ε ≤ 8, exposure ≤ 1/3 of no-DP, AUC ≤ 0.55, ≥ 50 % of the no-DP improvement) are
checked and printed, met or not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "non-iid" / "recipe.yaml"
DELTA = 1e-5
CHANCE_EXPOSURE = 3.0  # above this mean the no-DP run's canaries were learnt (chance: log2 e ≈ 1.44)


def settings(name: str, rounds: int, clip: float, example_clip: float) -> dict:
    """federation.yaml's privacy section of a run named MODE or MODE-EPSILON."""
    if name == "none":
        return {"mode": "none"}
    mode, target = name.rsplit("-", 1)
    if mode == "local":
        return {"mode": "local", "rounds": rounds, "delta": DELTA,
                "local": {"example_clip_norm": example_clip, "target_epsilon": float(target), "delta": DELTA}}
    return {"mode": mode, "rounds": rounds, "clip_norm": clip, "target_epsilon": float(target), "delta": DELTA}


def run_one(args) -> dict:
    """One simulate + audit, in this process; returns its record."""
    import yaml

    from fedtune import models
    from fedtune.config import load_federation
    from fedtune.privacy.exposure import audit_sites
    from fedtune.simulate import simulate

    work = Path(args.work) / args.one
    recipe = yaml.safe_load(RECIPE.read_text())
    for site in recipe["sites"]:
        site["inputs"] = [str((RECIPE.parent / p).resolve()) for p in site["inputs"]]
    recipe["name"] = f"privacy-{args.one}"
    recipe["rounds"] = args.rounds
    recipe["training"]["steps"] = args.steps
    if args.model:
        recipe["model"] = args.model
    recipe["privacy"] = settings(args.one, args.rounds, args.clip_norm, args.example_clip_norm)
    recipe["canaries"] = {"count": args.canaries, "repeats": args.repeats}
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "out"

    def log(message: str) -> None:
        print(f"[{args.one}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = simulate(work / "recipe.yaml", out, log=log)
    simulate_seconds = time.perf_counter() - started
    config = load_federation(out / "federation.yaml")
    sites = [s.name for s in config.sites]
    train_seconds = []
    for round_dir in sorted((out / "updates").glob("round-*")):
        manifests = [json.loads(p.read_text()) for p in round_dir.glob("*/manifest.json")]
        train_seconds.append(sum(m["train"]["seconds"] for m in manifests))
    last = report["rounds"][-1]["version"] if report["rounds"] else "v0000"
    model_dir = Path(args.model) if args.model and Path(args.model).is_dir() else None
    base = models.load_base_model(models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "audit"))
    started = time.perf_counter()
    audited = [s for s in sites if s in args.audit_sites.split(",")] if args.audit_sites else sites
    audit = audit_sites(config, last, [out / "prepared" / s for s in audited], registry=out / "registry",
                        model_dir=model_dir, candidates=args.candidates, base_model=base, log=log)
    audit_seconds = time.perf_counter() - started
    manifest = json.loads((out / "registry" / last / "manifest.json").read_text())
    return {
        "run": args.one, "privacy": recipe["privacy"], "version": last, "rounds_run": len(report["rounds"]),
        "stopped": report.get("stopped"), "epsilon": (manifest.get("privacy") or {}).get("epsilon"),
        "privacy_record": manifest.get("privacy"),
        "base": report["base"], "eval": report["rounds"][-1]["eval"] if report["rounds"] else report["base"],
        "epsilon_by_round": [r.get("epsilon") for r in report["rounds"]],
        "audit": audit, "train_seconds_per_round": train_seconds, "simulate_seconds": round(simulate_seconds, 1),
        "audit_seconds": round(audit_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(record: dict) -> list[dict]:
    """One row per run, with the ratios to the no-DP run."""
    runs = record["runs"]
    reference = runs.get("none")
    rows = []
    for name, run in runs.items():
        base = mean(run["base"].values())
        loss = mean(run["eval"].values())
        exposures = [e for site in run["audit"]["sites"].values() for e in (site.get("exposure") or [])]
        aucs = [site.get("mia_auc") for site in run["audit"]["sites"].values()]
        seconds = mean(run["train_seconds_per_round"])
        row = {"run": name, "epsilon": run["epsilon"], "rounds": run["rounds_run"], "eval_loss": loss,
               "improvement": base - loss, "exposure": mean(exposures), "mia_auc": mean(aucs),
               "train_seconds_per_round": seconds, "peak_rss_mb": run["peak_rss_mb"]}
        if reference is not None:
            ref_exposures = [e for s in reference["audit"]["sites"].values() for e in (s.get("exposure") or [])]
            ref_improvement = mean(reference["base"].values()) - mean(reference["eval"].values())
            ref_seconds = mean(reference["train_seconds_per_round"])
            row["improvement_share"] = row["improvement"] / ref_improvement if ref_improvement > 0 else None
            row["exposure_ratio"] = row["exposure"] / mean(ref_exposures) if ref_exposures and mean(ref_exposures) else None
            row["seconds_ratio"] = seconds / ref_seconds if ref_seconds else None
        if name != "none" and run["epsilon"] is not None and run["epsilon"] <= 8 + 1e-6:
            # A canary nobody learnt sits at a random rank (exposure ≈ log2 e ≈ 1.44, sd ≈ 1.4 per canary): when the
            # no-DP run's canaries are there too, there is no exposure for DP to reduce and the goal cannot be judged.
            memorized = reference is not None and (mean(ref_exposures) or 0) > CHANCE_EXPOSURE
            row["goals"] = {
                "exposure_third": (row.get("exposure_ratio") is not None and row["exposure_ratio"] <= 1 / 3)
                if memorized else None,
                "mia_auc_0.55": row["mia_auc"] is not None and row["mia_auc"] <= 0.55,
                "half_improvement": row.get("improvement_share") is not None and row["improvement_share"] >= 0.5,
            }
        rows.append(row)
    return rows


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(record: dict) -> None:
    rows = summarize(record)
    print(f"\nprivacy study: {record['recipe']}, {record['rounds']} rounds × {record['steps']} steps, "
          f"{record['canaries']} {'canary' if record['canaries'] == 1 else 'canaries'} × {record['repeats']} per site, {record['candidates']} candidates, δ {DELTA}")
    print("| run | ε (last version) | mean eval loss | improvement (share of no-DP) | mean exposure (× no-DP) | "
          "MIA AUC | train s/round (× no-DP) | peak RSS MB | goals at ε ≤ 8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        goals = row.get("goals")
        verdict = "—" if goals is None else ", ".join(
            f"{k} {'n/a (no-DP canaries at chance)' if v is None else 'met' if v else 'missed'}" for k, v in goals.items())
        print(f"| {row['run']} | {fmt(row['epsilon'], '.2f')} | {fmt(row['eval_loss'], '.4f')} | "
              f"{fmt(row['improvement'], '.4f')} ({fmt(row.get('improvement_share'), '.0%')}) | "
              f"{fmt(row['exposure'], '.2f')} ({fmt(row.get('exposure_ratio'), '.2f')}) | {fmt(row['mia_auc'])} | "
              f"{fmt(row['train_seconds_per_round'], '.1f')} ({fmt(row.get('seconds_ratio'), '.2f')}) | "
              f"{fmt(row['peak_rss_mb'], '.0f')} | {verdict} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", help="write the JSON record here")
    parser.add_argument("--report", help="reprint the table of a saved record and exit")
    parser.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--only", help="comma-separated runs (default: all)")
    parser.add_argument("--model", help="base model id or folder (default: the recipe's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--canaries", type=int, default=1, help="canaries per site")
    parser.add_argument("--repeats", type=int, default=25, help="times each canary is planted")
    parser.add_argument("--audit-sites", default="clinic,bank,pharmacy",
                        help="sites audited (each canary costs ~80 s at 10⁴ candidates on 2 cores); empty: all")
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--clip-norm", type=float, default=0.5, help="C of the site-level modes")
    parser.add_argument("--example-clip-norm", type=float, default=1.0, help="per-record clip of local DP-SGD")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this one and print its record
    args = parser.parse_args()
    if args.report:
        print_table(json.loads(Path(args.report).read_text()))
        return
    if args.one:
        print(json.dumps(run_one(args)))
        return
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="fedtune-privacy-"))
    # The ε ≈ 8 runs first: they carry the goals.
    names = ["none", "local-8", "central-8", "distributed-8", "local-1", "central-1", "distributed-1"]
    if args.only:
        names = [n for n in args.only.split(",") if n]
    record = {"recipe": "recipes/non-iid", "model": args.model or "embedded:SmolLM2-135M-Instruct",
              "rounds": args.rounds, "steps": args.steps, "canaries": args.canaries, "repeats": args.repeats,
              "candidates": args.candidates, "audit_sites": args.audit_sites, "clip_norm": args.clip_norm,
              "example_clip_norm": args.example_clip_norm,
              "machine": f"{__import__('os').cpu_count()} CPU cores", "runs": {}}
    started = time.perf_counter()
    for name in names:
        print(f"--- {name}", file=sys.stderr, flush=True)
        child = [sys.executable, __file__, "--one", name, "--work", str(work), "--rounds", str(args.rounds),
                 "--steps", str(args.steps), "--canaries", str(args.canaries), "--repeats", str(args.repeats),
                 "--candidates", str(args.candidates), "--clip-norm", str(args.clip_norm),
                 "--example-clip-norm", str(args.example_clip_norm), "--audit-sites", args.audit_sites,
                 *(["--model", args.model] if args.model else [])]
        done = subprocess.run(child, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"error: run {name} failed (exit {done.returncode}); its log is above")
        record["runs"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        if args.save:  # keep what is done so far
            Path(args.save).write_text(json.dumps(record, indent=2) + "\n")
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["summary"] = summarize(record)
    if args.save:
        Path(args.save).write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)


if __name__ == "__main__":
    main()
