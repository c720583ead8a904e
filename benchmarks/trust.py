"""What verification costs in a whole `fedtune aggregate` round: where its wall time goes, phase by phase.

    python benchmarks/trust.py                                     # 16 sites × 78.2 MB (smollm2-135m shapes), 3 runs
    python benchmarks/trust.py --preset tiny --sites 4 --repeat 1  # checks the script in seconds

The round is the one benchmarks/aggregate.py builds under --work (signed updates, a signed v0000, the
coordinator key beside the registry). Each run is a fresh `fedtune aggregate` process on warm page-cache
files, with the registry reset to v0000 before it. Two kinds of runs alternate:

  plain         `fedtune aggregate --config … --registry … --updates …` as a user runs it: wall time and
                peak RSS (ru_maxrss of that process alone, from wait4).
  instrumented  the same command through this script (`--phases OUT -- aggregate …`), which wraps the
                functions the engine calls with time.perf_counter and then runs fedtune's own CLI, so
                the engine runs exactly as in the plain run.

The content checks run on a thread pool (one worker per core); there the wall time of the pool is split
between read_private_copy (copied inside the kernel, then read once through a buffer: hashed and measured), delta_norm (finite + norm) and
the rest of check_tensors (header against the parent's) in proportion to the thread-seconds each took.
Everything else is sequential, so its wall time is measured directly. Shares are of the whole process's
wall time (interpreter start to exit). Last, read_private_copy runs alone over the round's files, and the same
reads + sha256 without the write, to show what writing the private copies costs. --save writes JSON
(benchmarks/results/trust_cpu.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

START = time.perf_counter()  # the instrumented runner's first moment: imports are timed from here
START_WALL = time.time()  # against the launch time its parent passes in LAUNCHED: the interpreter's own start
LAUNCHED = "FEDTUNE_BENCH_LAUNCHED"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SAVE = ROOT / "benchmarks" / "results" / "trust_cpu.json"

# (key, label) in the order a round runs them; "pool" rows split the content checks' wall time.
PHASES = [
    ("start", "interpreter start (before the first line of the script)"),
    ("imports", "imports (fedtune.cli, the engine)"),
    ("cli", "CLI parsing + load federation.yaml"),
    ("coordinator_key", "load coordinator.key (coordinator_signer)"),
    ("recover", "lock + recovery (Registry.recover)"),
    ("parent", "parent v0000: read manifest + verify its signature"),
    ("accepted", "replay history (Registry.accepted)"),
    ("read_envelope", "read + parse the manifests (read_envelope)"),
    ("check_signature", "VERIFY SIGNATURES (check_signature: canonical JSON + Ed25519)"),
    ("lineage", "lineage checks (check_lineage)"),
    ("read_private_copy", "read once from private copies, hashing (read_private_copy)"),
    ("delta_norm", "content checks: finite + norm (delta_norm)"),
    ("header", "content checks: keys/shapes vs parent (rest of check_tensors)"),
    ("merge", "merge (merge_tensors)"),
    ("check_merged", "check the merged version (check_merged)"),
    ("write", "write + commit (save, sha256, sign, fsync, publish, log, LATEST)"),
    ("cleanup", "remove the private copies"),
    ("exit", "exit (after the command returned: interpreter teardown)"),
    ("other", "everything else (method, weights, result line, in between)"),
]


# --------------------------------------------------------------------------------------- instrumented runner


class Clock:
    """Spans of wrapped calls, from any thread."""

    def __init__(self):
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def wrap(self, owner, name: str, key: str | None = None):
        original = getattr(owner, name)
        key = key or name

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with self._lock:
                    self.spans.setdefault(key, []).append((start, end))

        setattr(owner, name, timed)

    def total(self, key: str) -> float:
        return sum(end - start for start, end in self.spans.get(key, []))

    def count(self, key: str) -> int:
        return len(self.spans.get(key, []))

    def first(self, key: str) -> float:
        return min(start for start, _ in self.spans[key])

    def last(self, key: str) -> float:
        return max(end for _, end in self.spans[key])


def instrumented(out_path: Path, cli_args: list[str]) -> None:
    """Run `fedtune <cli_args>` in this process with the engine's steps timed; write the phases to `out_path`."""
    import fedtune.aggregate.engine as engine
    import fedtune.aggregate.publish as publish
    import fedtune.aggregate.validate as validate
    import fedtune.cli as cli
    import fedtune.wire.update as wire_update
    from fedtune.registry import Registry

    imported = time.perf_counter()
    clock = Clock()
    for name in ("aggregate_round", "_aggregate", "coordinator_signer", "read_version_manifest", "collect_round",
                 "merge_tensors", "check_merged"):
        clock.wrap(engine, name)
    for name in ("save_tensors", "sha256_file", "write_version_manifest", "_sync_folder"):
        clock.wrap(publish, name)
    for name in ("read_envelope", "check_signature", "check_lineage", "check_tensors", "read_private_copy", "delta_norm"):
        clock.wrap(validate, name)
    clock.wrap(wire_update, "verify", "ed25519_verify")  # what Envelope.signed_by calls
    for name in ("recover", "accepted", "publish", "commit"):
        clock.wrap(Registry, name)
    sys.argv = ["fedtune", *cli_args]
    code = 0
    try:
        cli.main()
    except SystemExit as done:
        code = done.code or 0
    finished = time.perf_counter()
    launched = float(os.environ.get(LAUNCHED, START_WALL))
    out_path.write_text(json.dumps({"exit_code": code, "started": START_WALL - launched,
                                    **phases_of(clock, imported, finished)}))
    sys.exit(code)


def phases_of(clock: Clock, imported: float, finished: float) -> dict:
    """Seconds per phase of one instrumented run (PHASES' keys, "other" excepted), plus counts and thread-seconds."""
    t = clock.total
    pool_wall = clock.last("check_tensors") - clock.first("check_tensors") if clock.count("check_tensors") else 0.0
    busy = t("check_tensors")
    part = (lambda seconds: pool_wall * seconds / busy) if busy > 0 else (lambda _s: 0.0)
    write_end = clock.last("_aggregate")
    phases = {
        "imports": imported - START,
        "cli": clock.first("aggregate_round") - imported,
        "coordinator_key": t("coordinator_signer"),
        "recover": t("recover"),
        "parent": clock.total("read_version_manifest"),
        "accepted": t("accepted"),
        "read_envelope": t("read_envelope"),
        "check_signature": t("check_signature"),
        "lineage": t("check_lineage"),
        "read_private_copy": part(t("read_private_copy")),
        "delta_norm": part(t("delta_norm")),
        "header": part(busy - t("read_private_copy") - t("delta_norm")),
        "merge": t("merge_tensors"),
        "check_merged": t("check_merged"),
        "write": write_end - clock.last("check_merged"),
        "cleanup": clock.last("aggregate_round") - write_end,
    }
    return {
        "phases": phases,
        "span": finished - START,  # this script's first statement to the CLI's return
        "aggregate_round": t("aggregate_round"),
        "collect_round": t("collect_round"),
        "content_pool_wall": pool_wall,
        "thread_seconds": {"check_tensors": busy, "read_private_copy": t("read_private_copy"), "delta_norm": t("delta_norm")},
        "signatures": {"check_signature_calls": clock.count("check_signature"),
                       "ed25519_verify_calls": clock.count("ed25519_verify"),
                       "ed25519_verify_seconds": t("ed25519_verify")},
        "write_parts": {name: t(name) for name in ("save_tensors", "sha256_file", "write_version_manifest", "_sync_folder",
                                                   "publish", "commit")},
    }


# --------------------------------------------------------------------------------------- the benchmark


def copy_anatomy(files: list[Path], work: Path) -> dict:
    """Where read_private_copy's time goes, one file after another on one core: the same reads and sha256 without the
    write, then read_private_copy itself writing its private copies into `work` (the file system the engine's
    copies go to), warm page cache both times."""
    import hashlib
    import shutil

    from fedtune.aggregate.updates import read_private_copy
    from fedtune.wire.update import COPY_CHUNK

    start = time.perf_counter()
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while block := handle.read(COPY_CHUNK):
                digest.update(block)
    read_hash = time.perf_counter() - start
    work.mkdir()
    try:
        start = time.perf_counter()
        for index, path in enumerate(files):
            read_private_copy(path, work / f"{index}.safetensors", 2 * path.stat().st_size, None)
        copied = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "read_sha256_seconds": read_hash,
            "read_private_copy_seconds": copied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", help="LoRA shapes (benchmarks/aggregate.py PRESETS)")
    parser.add_argument("--sites", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="plain and instrumented runs each (medians reported)")
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the runs [default: torch's own, one per "
                        "core]; 1 keeps the merge steady when other processes hold a core")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-bench-aggregate"), help="cache of generated rounds")
    parser.add_argument("--save", type=Path, nargs="?", const=DEFAULT_SAVE,
                        help=f"write the JSON record [default {DEFAULT_SAVE.relative_to(ROOT)}]")
    if sys.argv[1:2] == ["--phases"]:  # the instrumented runner: --phases OUT -- <fedtune arguments>
        instrumented(Path(sys.argv[2]), sys.argv[4:])
        return
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    import aggregate as bench
    import psutil

    if args.preset not in bench.PRESETS:
        sys.exit(f"--preset: choose one of {', '.join(bench.PRESETS)}")
    if not 1 <= args.sites <= bench.ROSTER:
        sys.exit(f"--sites: 1 to {bench.ROSTER}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    spec = bench.spec_of(args.preset)
    per_update = bench.update_bytes(spec)
    layout = bench.Layout(args.work, args.preset)
    bench.disk_check(layout, spec, args.sites, "--sites")
    say(f"{args.preset}: {len(bench.lora_keys(spec)) // 2} LoRA modules, r {spec['r']}, {per_update:,} bytes "
        f"({per_update / 1e6:.1f} MB) per update, {args.sites} sites; building the round under {layout.root}")
    built = bench.run_child({"kind": "build", "preset": args.preset, "sites": [args.sites], "work": str(args.work)}, env,
                            show_stderr=True)
    if "failed" in built:
        sys.exit("building the round failed")

    load_start = os.getloadavg()
    round_dir = layout.round_dir(args.sites)
    cli_args = ["aggregate", "--config", str(layout.config), "--registry", str(layout.registry), "--updates", str(round_dir)]
    fedtune_cli = Path(sys.executable).parent / "fedtune"
    plain_cmd = ([str(fedtune_cli)] if fedtune_cli.is_file() else [sys.executable, "-m", "fedtune.cli"]) + cli_args
    logs = layout.root / "logs"
    logs.mkdir(exist_ok=True)
    phases_file = logs / "phases.json"
    traced_cmd = [sys.executable, __file__, "--phases", str(phases_file), "--", *cli_args]
    shown = (f"OMP_NUM_THREADS={args.torch_threads} " if args.torch_threads else "") + " ".join(plain_cmd)
    say("command: " + shown)
    plain, traced = [], []
    for attempt in range(args.repeat):
        for kind, cmd in (("plain", plain_cmd), ("instrumented", traced_cmd)):
            bench.reset_registry(layout)
            bench.warm(layout.update_files(args.sites) + [layout.registry / "v0000" / bench.ADAPTER])
            phases_file.unlink(missing_ok=True)
            log = logs / f"trust-{kind}-{attempt}.log"
            wall, rss, code, others = bench.run_process(cmd, log, {**env, LAUNCHED: repr(time.time())})
            if code != 0:
                sys.exit(f"{kind} run failed ({code}):\n{log.read_text()[-3000:]}")
            run = {"seconds": wall, "peak_rss_mb": rss, "others_cpu_share": others}
            if kind == "instrumented":
                run.update(json.loads(phases_file.read_text()))
                run["phases"]["start"] = run.pop("started")
                run["phases"]["exit"] = wall - run["phases"]["start"] - run["span"]
                run["phases"]["other"] = wall - sum(run["phases"].values())
                traced.append(run)
            else:
                plain.append(run)
            say(f"  {kind:<12} run {attempt + 1}: {wall:6.2f} s   peak RSS {rss:6.0f} MB   others {100 * others:3.0f}% CPU")
    bench.reset_registry(layout)
    files = layout.update_files(args.sites)
    bench.warm(files)
    anatomy = copy_anatomy(files, layout.registry / ".copy-anatomy.work")

    record = {
        "preset": args.preset, "sites": args.sites, "update_bytes": per_update,
        "update_bytes_total": bench.cached_bytes(layout, args.sites), "cpu": f"{psutil.cpu_count()} cores",
        "torch_threads": args.torch_threads or "default", "load_average_at_start": load_start,
        "command": shown, "plain": plain, "instrumented": traced, "copy_anatomy": anatomy,
        "median": {
            "plain_seconds": statistics.median(r["seconds"] for r in plain),
            "plain_peak_rss_mb": max(r["peak_rss_mb"] for r in plain),
            "instrumented_seconds": statistics.median(r["seconds"] for r in traced),
            "phases": {key: statistics.median(r["phases"][key] for r in traced) for key, _ in PHASES},
            "ed25519_verify_seconds": statistics.median(r["signatures"]["ed25519_verify_seconds"] for r in traced),
        },
    }
    median = record["median"]
    share = median["phases"]["check_signature"] / median["instrumented_seconds"]
    record["goal"] = {"goal": "signature verification ≤ 1 % of the whole round",
                      "result": "PASS" if share <= 0.01 else "MISS", "share": share}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(record, indent=2) + "\n")
    report(record, args)


def report(record: dict, args) -> None:
    median, first = record["median"], record["instrumented"][0]
    wall = median["instrumented_seconds"]
    print(f"\n{record['sites']} sites × {record['update_bytes'] / 1e6:.1f} MB ({record['preset']} shapes), "
          f"{record['update_bytes_total'] / 1e9:.2f} GB of updates, {record['cpu']}, torch threads {record['torch_threads']}; "
          f"files in the page cache; load average {record['load_average_at_start'][0]:.1f} at the start")
    print(f"command: {record['command']}")
    plain_runs = ", ".join(f"{r['seconds']:.2f}" for r in record["plain"])
    traced_runs = ", ".join(f"{r['seconds']:.2f}" for r in record["instrumented"])
    print(f"plain runs: {plain_runs} s (median {median['plain_seconds']:.2f} s), "
          f"peak RSS {median['plain_peak_rss_mb']:.0f} MB; others used up to "
          f"{100 * max(r['others_cpu_share'] for r in record['plain'] + record['instrumented']):.0f} % of the CPU")
    print(f"instrumented runs: {traced_runs} s; "
          f"phases: median of {len(record['instrumented'])} run(s)\n")
    print(f"{'phase':<66} {'seconds':>8} {'share':>7}")
    print("-" * 83)
    for key, label in PHASES:
        seconds = median["phases"][key]
        print(f"{label:<66} {seconds:>8.4f} {100 * seconds / wall:>6.2f}%")
    print(f"{'whole process (median wall of the instrumented runs)':<66} {wall:>8.4f} {100:>6.2f}%")
    calls = first["signatures"]["ed25519_verify_calls"]
    verify = median["ed25519_verify_seconds"]
    print(f"\n  of the signature checks, Ed25519 verify itself: {verify:.4f} s ({calls} calls, "
          f"{1e6 * verify / max(1, calls):.0f} µs each)")
    print(f"  content checks ran on a pool: {first['content_pool_wall']:.3f} s wall for "
          f"{first['thread_seconds']['check_tensors']:.3f} thread-s (read_private_copy {first['thread_seconds']['read_private_copy']:.3f}, "
          f"delta_norm {first['thread_seconds']['delta_norm']:.3f}) in the first run; the rows above split its wall time")
    anatomy = record["copy_anatomy"]
    print(f"  read_private_copy alone, {anatomy['files']} files one after another: {anatomy['read_private_copy_seconds']:.2f} s "
          f"({anatomy['bytes'] / anatomy['read_private_copy_seconds'] / 1e9:.2f} GB/s); the same reads + sha256 without "
          f"writing the copy: {anatomy['read_sha256_seconds']:.2f} s ({anatomy['bytes'] / anatomy['read_sha256_seconds'] / 1e9:.2f} GB/s)")
    goal = record["goal"]
    print(f"\ngoal\n  {goal['result']:<6} {goal['goal']}: {100 * goal['share']:.3f} %")


if __name__ == "__main__":
    main()
