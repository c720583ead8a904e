"""Real `fedtune aggregate` processes under faults: killed at random moments, racing each other, running out of
file size. tests/integration/test_registry_faults.py runs this file and judges what it observed.

    python tests/faultkit.py kills|race|faults WORLD OUT [--trials N] [--seed S]

WORLD holds fed/ (federation.yaml, coordinator.key, registry/ at v0000) and updates/round-0001; every trial works
on its own copy under OUT. The observations come out as one JSON object on the last line of stdout.

One interpreter serves every trial. It imports fedtune and torch but never runs a torch op itself: each command
runs in a child forked from it (forking after torch has started its thread pool can deadlock), so no trial pays
the seconds of a fresh import.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch  # noqa: F401  (imported once here, before any fork, so no child pays for it)

from fedtune import cli
import fedtune.registry as registry_module
from fedtune.aggregate import make_method, publish
from fedtune.config import load_federation
from fedtune.errors import FedtuneError
from fedtune.registry import Registry

ROUND = "round-0001"
NEXT = "v0001"
LEFTOVER = re.compile(r"^\..*\.(tmp|old|work)$")
VERSION = re.compile(r"^v\d{4,}$")
# What a kill can leave, in commit order: the test wants kills on both sides of the commit point.
STATES = ("nothing", "leftover", "published-unlogged", "logged-not-LATEST", "complete")
INSIDE_COMMIT = {"published-unlogged", "logged-not-LATEST"}


class Fed:
    """One trial's private copy of the federation."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "fed" / "federation.yaml"
        self.registry = root / "fed" / "registry"
        self.updates = root / "updates"
        self.round = self.updates / ROUND

    @classmethod
    def copy(cls, world: Path, dest: Path) -> Fed:
        dest.mkdir(parents=True)
        for part in ("fed", "updates"):
            shutil.copytree(world / part, dest / part, symlinks=True)
        return cls(dest)

    def aggregate_args(self) -> list[str]:
        return ["aggregate", "--config", str(self.config), "--registry", str(self.registry),
                "--updates", str(self.round)]


# --- children -------------------------------------------------------------------------------------------


def fork(body: Callable[[], int], gate: int | None = None) -> tuple[int, int]:
    """Run `body` in a forked child; returns its pid and the read end of a pipe carrying its stdout and stderr
    (a pipe, not a file, so a file-size limit in the child cannot swallow its messages).

    With `gate` the child waits for a byte on that pipe before it starts, so several can start together."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return pid, read_end
    code = 1
    try:
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        if gate is not None:
            os.read(gate, 1)
        code = body()
    except BaseException:  # what an uncaught error does to the real command: a traceback and exit 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def finish(pid: int, output: int) -> tuple[int, str]:
    """Read the child's output to its end, reap it: (exit code or minus the signal that ended it, output)."""
    chunks = []
    while chunk := os.read(output, 1 << 16):
        chunks.append(chunk)
    os.close(output)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def fedtune(args: list[str], prepare: Callable[[], None] | None = None) -> Callable[[], int]:
    """A child body running the real command line `fedtune ARGS` (after `prepare`)."""
    def body() -> int:
        if prepare is not None:
            prepare()
        sys.argv = ["fedtune", *args]
        try:
            cli.main()
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        return 0
    return body


def run(args: list[str], prepare: Callable[[], None] | None = None) -> tuple[int, str]:
    return finish(*fork(fedtune(args, prepare)))


def verify(fed: Fed) -> dict:
    """fedtune.audit.verify_registry on the registry as it is now, in a child (it may touch tensors)."""
    def body() -> int:
        from fedtune.audit import verify_registry

        try:
            report = verify_registry(fed.registry, load_federation(fed.config), fed.updates)
            payload = {"ok": report.get("ok"), "pending": report.get("pending", [])}
        except FedtuneError as problem:
            payload = {"ok": False, "error": str(problem), "exit_code": problem.exit_code}
        print(json.dumps(payload, default=str))
        return 0
    code, output = finish(*fork(body))
    try:
        return json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": output, "exit_code": code}


def verify_cli(fed_folder: Path) -> dict:
    """The real `fedtune verify --registry REG` in a fresh interpreter."""
    command = Path(sys.executable).parent / "fedtune"
    done = subprocess.run([str(command), "verify", "--registry", str(fed_folder / "registry")],
                          capture_output=True, text=True)
    return {"code": done.returncode, "output": done.stdout + done.stderr}


# --- what is on disk ------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry_state(registry: Path) -> dict:
    """Which step of the commit the registry shows (one of STATES) and what else lies there."""
    names = sorted(os.listdir(registry))
    data = (registry / "log.jsonl").read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    entries = [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]
    logged = sum(1 for entry in entries if entry.get("version") == NEXT)
    latest = (registry / "LATEST").read_text(errors="replace").strip()
    leftovers = [name for name in names if LEFTOVER.match(name)]
    if logged and latest == NEXT:
        state = "complete"
    elif logged:
        state = "logged-not-LATEST"
    elif (registry / NEXT).is_dir():
        state = "published-unlogged"
    elif leftovers or torn:
        state = "leftover"
    else:
        state = "nothing"
    return {"state": state, "leftovers": leftovers, "torn": torn, "next_lines": logged, "latest": latest,
            "versions": [name for name in names if VERSION.match(name)], "log_lines": len(entries)}


def tree(registry: Path) -> dict[str, str]:
    """Relative path → sha256 of every file, folders as "dir" (the lock file's holder note left out)."""
    out = {}
    for path in sorted(registry.rglob("*")):
        name = str(path.relative_to(registry))
        if name != ".lock":
            out[name] = "dir" if path.is_dir() else sha256(path)
    return out


def version_digest(folder: Path) -> dict | None:
    """A version's files by sha256 and its manifest without `created` (the only field a rerun changes, with
    the signature over it)."""
    if not (folder / "manifest.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("created", None)
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name not in ("manifest.json", "manifest.sig")}
    return {"files": files, "manifest": manifest}


# --- scenarios ------------------------------------------------------------------------------------------


def warm(world: Path) -> None:
    """Load, in this process, what every command would otherwise load again in each child (no torch op)."""
    config = load_federation(world / "fed" / "federation.yaml")
    make_method(config.aggregation.method, config.aggregation, seed=0)
    import numpy.ma  # noqa: F401  (numpy imports it on first use, inside the merge)


def reference(world: Path, out: Path, runs: int = 3) -> dict:
    """Uninterrupted runs: their durations (fork to exit), the time from the publish (the new version appearing
    under its final name) to LATEST naming it, and the version they write."""
    durations, commits, digests, codes = [], [], [], []
    for index in range(runs):
        fed = Fed.copy(world, out / f"reference-{index}")
        start = time.monotonic()
        pid, output = fork(fedtune(fed.aggregate_args()))
        published = watch(pid, (fed.registry / NEXT).is_dir)
        committed = watch(pid, lambda: (fed.registry / "LATEST").read_text().strip() == NEXT)
        code, _ = finish(pid, output)
        durations.append(time.monotonic() - start)
        commits.append(committed - published if published and committed else None)
        codes.append(code)
        digests.append(version_digest(fed.registry / NEXT))
    return {"durations": durations, "commits": commits, "codes": codes, "digest": digests[0],
            "same": all(d == digests[0] for d in digests)}


def watch(pid: int, seen: Callable[[], bool]) -> float | None:
    """The moment `seen()` turns true, polled every 0.2 ms; None if the child exits first. The child stays
    unreaped (its pid cannot be reused before `finish`)."""
    while True:
        if seen():
            return time.monotonic()
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return None
        time.sleep(0.0002)


def kills(world: Path, out: Path, trials: int, seed: int, min_inside: int = 3, max_trials: int = 100) -> dict:
    """SIGKILL `aggregate` at a random moment, then check the registry, rerun, check again.

    The first half of the kills come after a delay uniform over [0, 1.2 × the uninterrupted duration]. The
    commit takes a few percent of a run, and a run's length varies by more than that, so the second half is
    aimed at it: the delay starts when the new version is published (appears under its final name) and is
    uniform over [0, 1.2 × the uninterrupted time from the publish to LATEST]. Kills aimed that way go on past
    `trials` until `min_inside` have landed inside the commit (published but unlogged, or logged with LATEST
    behind), at most `max_trials` in all."""
    rng = random.Random(seed)
    ref = reference(world, out)
    duration = statistics.median(ref["durations"])
    commit = statistics.median([c for c in ref["commits"] if c is not None])
    results, snapshots, inside, index = [], {}, 0, 0
    while index < trials or (inside < min_inside and index < max_trials):
        late = index >= trials // 2
        delay = rng.uniform(0, 1.2 * (commit if late else duration))
        fed = Fed.copy(world, out / f"kill-{index:02d}")
        pid, output = fork(fedtune(fed.aggregate_args()))
        start = watch(pid, (fed.registry / NEXT).is_dir) if late else time.monotonic()
        if start is not None:
            time.sleep(max(0.0, start + delay - time.monotonic()))
        os.kill(pid, signal.SIGKILL)  # the child is not yet reaped, so its pid is still its own
        killed, _ = finish(pid, output)
        after_kill = registry_state(fed.registry)
        inside += after_kill["state"] in INSIDE_COMMIT
        if after_kill["state"] not in snapshots and after_kill["state"] != "nothing":
            snapshots[after_kill["state"]] = (index, snapshot(fed))
        verify_kill = verify(fed)
        code, message = run(fed.aggregate_args())
        results.append({
            "trial": index, "delay": round(delay, 5), "late": late, "exit_killed": killed,
            "after_kill": after_kill, "verify_after_kill": verify_kill, "rerun_code": code, "rerun_output": message,
            "after_rerun": registry_state(fed.registry), "verify_after_rerun": verify(fed),
            "digest": version_digest(fed.registry / NEXT),
        })
        index += 1
    # The real `fedtune verify` on the first registry each kind of kill left, once the timed part is over.
    checks = [{"state": state, "trial": index, **verify_cli(folder)} for state, (index, folder) in snapshots.items()]
    return {"seed": seed, "reference": ref, "duration": duration, "commit": commit, "trials": results,
            "cli_verify": checks}


def snapshot(fed: Fed) -> Path:
    """A copy of the federation folder (registry, federation.yaml, public key) as a kill left it."""
    folder = fed.root / "snapshot"
    shutil.copytree(fed.registry, folder / "registry", symlinks=True)
    for name in ("federation.yaml", "coordinator.pub"):
        shutil.copy2(fed.registry.parent / name, folder / name)
    return folder


def race(world: Path, out: Path, trials: int) -> dict:
    """Two `aggregate`s of the same round, released together."""
    ref = reference(world, out, runs=1)
    results = []
    for index in range(trials):
        fed = Fed.copy(world, out / f"race-{index:02d}")
        gate_read, gate_write = os.pipe()
        racers = [fork(fedtune(fed.aggregate_args()), gate=gate_read) for _ in range(2)]
        os.write(gate_write, b"go")
        codes, outputs = zip(*(finish(*racer) for racer in racers))
        os.close(gate_read)
        os.close(gate_write)
        results.append({"pids": [pid for pid, _ in racers], "codes": codes, "outputs": outputs,
                        "state": registry_state(fed.registry), "verify": verify(fed),
                        "digest": version_digest(fed.registry / NEXT)})
    return {"reference": ref, "trials": results}


def limit_file_size(limit: Callable[[], int]) -> None:
    """From now on no file of this process may grow past `limit()` bytes: the kernel fails such writes (EFBIG,
    or a short write) as it does on a full disk, and SIGXFSZ, which would kill the process, is ignored."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit(), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def at_step(owner, name: str, limit: Callable[[], int]) -> Callable[[], None]:
    """A child preparation: the file-size limit drops to `limit()` as `owner.name` starts — the first registry
    write of that step — so the round's earlier writes (the private copies of the updates) still succeed."""
    def prepare() -> None:
        original = getattr(owner, name)

        def limited(*args, **kwargs):
            limit_file_size(limit)
            return original(*args, **kwargs)
        setattr(owner, name, limited)
    return prepare


def faults(world: Path, out: Path) -> dict:
    """A file-size limit hit while writing the version, appending the log and moving LATEST; a version folder
    that appears mid-run. Each case is followed by the next command (a plain rerun)."""
    ref = reference(world, out, runs=1)
    cases = {}
    steps = {
        "version": lambda fed: at_step(publish, "save_tensors", lambda: 1024),
        # Room for part of the new line: the kernel writes that part and fails the rest (a torn line).
        "log": lambda fed: at_step(Registry, "append", lambda: (fed.registry / "log.jsonl").stat().st_size + 40),
        "latest": lambda fed: at_step(registry_module, "write_text_atomic", lambda: 3),
    }
    for case, prepare in steps.items():
        fed = Fed.copy(world, out / f"disk-{case}")
        before = tree(fed.registry)
        code, message = run(fed.aggregate_args(), prepare(fed))
        after = tree(fed.registry)
        state, checked = registry_state(fed.registry), verify(fed)
        rerun_code, rerun_message = run(fed.aggregate_args())
        cases[case] = {
            "code": code, "output": message, "state": state, "verify": checked,
            "changed": sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
            "rerun_code": rerun_code, "rerun_output": rerun_message, "after_rerun": registry_state(fed.registry),
            "verify_after_rerun": verify(fed), "digest": version_digest(fed.registry / NEXT),
        }
    return {"reference": ref, "disk": cases, "intruder": [intruder(world, out / f"intruder-{i}") for i in range(3)]}


def intruder(world: Path, out: Path) -> dict:
    """Someone makes an empty v0001 while `aggregate` is working on round 1 (after its start-up recovery)."""
    fed = Fed.copy(world, out)
    before = tree(fed.registry)
    pid, output = fork(fedtune(fed.aggregate_args()))
    made = False
    # The private work folder appears once the lock is held and recovery has run; the publish comes later.
    deadline = time.monotonic() + 30
    while not made and time.monotonic() < deadline:
        if any(name.endswith(".work") for name in os.listdir(fed.registry)):
            (fed.registry / NEXT).mkdir()
            made = True
        else:
            time.sleep(0.0005)
    code, message = finish(pid, output)
    after = tree(fed.registry)
    observed = {"made": made, "code": code, "output": message, "state": registry_state(fed.registry),
                "next_entries": sorted(os.listdir(fed.registry / NEXT)),
                "changed": sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
                "verify": verify(fed)}
    rerun_code, rerun_message = run(fed.aggregate_args())
    return {**observed, "rerun_code": rerun_code, "rerun_output": rerun_message,
            "after_rerun": registry_state(fed.registry), "verify_after_rerun": verify(fed),
            "digest": version_digest(fed.registry / NEXT)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["kills", "race", "faults"])
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warm(args.world)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.scenario == "kills":
        print(f"seed {args.seed}", flush=True)
        result = kills(args.world, args.out, args.trials, args.seed)
    elif args.scenario == "race":
        result = race(args.world, args.out, args.trials)
    else:
        result = faults(args.world, args.out)
    result["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
