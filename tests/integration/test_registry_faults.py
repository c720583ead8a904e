"""The registry under real faults: `fedtune aggregate` killed at random moments, two of them racing, a full disk
while the version is written, the log appended or LATEST moved, and what an interrupted run leaves behind.

The process faults run in tests/faultkit.py (one interpreter that forks every command, so fifty kills do not
pay fifty torch imports); this module builds a federation with signed updates, runs it and judges what it saw.
Every registry is checked with fedtune.audit.verify_registry, and every version the next command ends with is
compared with an uninterrupted run's: the same adapter bytes, the same manifest apart from `created` (and the
signature over it).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

import fedkit
from conftest import run_cli, tree_digest

FAULTKIT = Path(__file__).parents[1] / "faultkit.py"
ADAPTER = "adapter_model.safetensors"
HIDDEN = re.compile(r"^\..*\.(tmp|old|work)$")
# Kill outcomes, in commit order (see faultkit.registry_state).
BEFORE_COMMIT = {"nothing", "leftover"}
INSIDE_COMMIT = {"published-unlogged", "logged-not-LATEST"}
ALREADY = "round 1 is already committed as v0001"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> fedkit.World:
    """clinic, bank and dev with keys on the roster, each with a signed update in round-0001; registry at v0000."""
    return fedkit.build_world(tmp_path_factory.mktemp("faults-world"), tiny_model, keys=True)


def faultkit(scenario: str, world: fedkit.World, out: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(FAULTKIT), scenario, str(world.root), str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def one_error_line(output: str) -> str:
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


def assert_finished(observed: dict, reference: dict, where: str) -> None:
    """The registry holds v0000 and the reference's v0001, committed once, nothing hidden left, verified."""
    state = observed["after_rerun"]
    assert state["state"] == "complete" and state["versions"] == ["v0000", "v0001"], (where, state)
    assert state["next_lines"] == 1 and state["log_lines"] == 2 and not state["torn"], (where, state)
    assert state["leftovers"] == [], (where, state)
    assert observed["verify_after_rerun"] == {"ok": True, "pending": []}, (where, observed["verify_after_rerun"])
    assert observed["digest"] == reference["digest"], where


# --- 1. SIGKILL at random moments -----------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_registry_the_next_command_finishes(world, tmp_path):
    seed = int(os.environ.get("FEDTUNE_FAULT_SEED", random.randrange(1 << 31)))
    print(f"\nkill delays drawn with seed {seed} (FEDTUNE_FAULT_SEED={seed} draws them again)")
    result = faultkit("kills", world, tmp_path, "--trials", "50", "--seed", str(seed))
    reference = result["reference"]
    assert reference["codes"] == [0, 0, 0] and reference["same"], reference  # uninterrupted runs agree
    trials = result["trials"]
    assert len(trials) >= 50

    for trial in trials:
        kill = trial["after_kill"]
        where = f"seed {seed}, kill {trial['trial']} ({'at the commit' if trial['late'] else 'in the run'}, " \
                f"after {trial['delay']} s) left {kill['state']}"
        assert trial["exit_killed"] in (-9, 0), where  # killed, or done before the signal came
        assert kill["next_lines"] <= 1 and kill["versions"] in (["v0000"], ["v0000", "v0001"]), (where, kill)
        # What the kill left is an honest registry, its unfinished parts reported as pending.
        checked = trial["verify_after_kill"]
        assert checked["ok"] is True, (where, checked)
        notes = " ".join(checked["pending"])
        assert all(name in notes for name in kill["leftovers"]), (where, checked)
        if kill["state"] == "published-unlogged":
            assert "v0001" in notes, (where, checked)
        if kill["state"] == "logged-not-LATEST":
            assert "LATEST" in notes, (where, checked)
        # The rerun finishes the commit (the round is then already committed) or makes the version anew.
        rerun = trial["rerun_output"]
        if kill["state"] in BEFORE_COMMIT:
            assert trial["rerun_code"] == 0 and rerun.startswith("wrote "), (where, rerun)
        else:
            assert trial["rerun_code"] == 2 and ALREADY in one_error_line(rerun), (where, rerun)
        assert_finished(trial, reference, where)

    states = collections.Counter(t["after_kill"]["state"] for t in trials)
    finished_first = sum(t["exit_killed"] == 0 for t in trials)
    print(f"{len(trials)} kills in {result['seconds']} s (uninterrupted run {result['duration'] * 1000:.0f} ms, "
          f"publish to LATEST {result['commit'] * 1000:.1f} ms): {dict(states)}; {finished_first} runs had exited "
          "before their kill")
    assert sum(states[s] for s in INSIDE_COMMIT) >= 3, states
    assert sum(states[s] for s in BEFORE_COMMIT) >= 3, states

    # The real command on a copy of the first registry each kind of kill left.
    cli = result["cli_verify"]
    print("fedtune verify --registry:", [(c["state"], c["code"]) for c in cli])
    assert len(cli) >= 3
    for check in cli:
        assert check["code"] == 0 and check["output"].startswith("verified "), check


# --- 2. two writers at once -----------------------------------------------------------------------------


HOLDER = re.compile(r"^error: .*: in use by `fedtune aggregate` \(pid (\d+) on (.+), since (\S+)\); "
                    r"wait for it to finish$")


@pytest.mark.slow
def test_two_concurrent_aggregates_write_one_version(world, tmp_path):
    result = faultkit("race", world, tmp_path, "--trials", "10")
    reasons = collections.Counter()
    for number, trial in enumerate(result["trials"]):
        where = f"race {number}: exit codes {trial['codes']}, outputs {trial['outputs']}, {trial['state']}"
        assert sorted(trial["codes"]) == [0, 2], where
        winner = trial["codes"].index(0)
        assert trial["outputs"][winner].startswith("wrote "), where
        line = one_error_line(trial["outputs"][1 - winner])
        holder = HOLDER.match(line)
        if holder:  # failed at once, naming the writer that holds the registry
            assert int(holder[1]) == trial["pids"][winner] and holder[2] == socket.gethostname(), where
            datetime.fromisoformat(holder[3])
            reasons["named the holder"] += 1
        else:  # started after the other had finished
            assert ALREADY in line, where
            reasons["round already committed"] += 1
        state = trial["state"]
        assert state["versions"] == ["v0000", "v0001"] and state["next_lines"] == 1, where
        assert state["state"] == "complete" and state["leftovers"] == [], where
        assert trial["verify"] == {"ok": True, "pending": []}, where
        assert trial["digest"] == result["reference"]["digest"], where
    print(f"\n{len(result['trials'])} races in {result['seconds']} s; the second writer: {dict(reasons)}")


# --- 3. a full disk -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(world, tmp_path_factory) -> dict:
    return faultkit("faults", world, tmp_path_factory.mktemp("faults-run"))


@pytest.mark.parametrize("step", ["version", "log", "latest"])
def test_full_disk_fails_in_one_line_and_the_next_command_recovers(faults, step):
    """The file-size limit (RLIMIT_FSIZE) fails the step's writes in the kernel, as a full disk does."""
    case = faults["disk"][step]
    line = one_error_line(case["output"])
    assert case["code"] == 2, case
    version_files = ["v0001", *(f"v0001/{name}" for name in ("adapter_config.json", ADAPTER, "manifest.json",
                                                               "manifest.sig"))]
    if step == "version":
        assert "could not write v0001" in line and "the registry is unchanged" in line, line
        assert case["changed"] == [] and case["state"]["state"] == "nothing", case
        assert case["verify"] == {"ok": True, "pending": []}
        assert case["rerun_code"] == 0 and case["rerun_output"].startswith("wrote "), case["rerun_output"]
    elif step == "log":
        # The kernel wrote part of the line: it was cut again, the log's bytes are what they were.
        assert "log.jsonl: could not be written" in line and "not committed" in line, line
        assert case["changed"] == version_files and case["state"]["state"] == "published-unlogged", case
        assert case["verify"]["ok"] is True and "v0001" in " ".join(case["verify"]["pending"]), case["verify"]
        assert case["rerun_code"] == 2 and ALREADY in one_error_line(case["rerun_output"])
    else:
        assert "LATEST: could not be moved to v0001" in line and "v0001 is committed" in line, line
        assert case["changed"] == ["log.jsonl", *version_files] and case["state"]["state"] == "logged-not-LATEST"
        assert case["verify"]["ok"] is True and "LATEST" in " ".join(case["verify"]["pending"]), case["verify"]
        assert case["rerun_code"] == 2 and ALREADY in one_error_line(case["rerun_output"])
    assert_finished(case, faults["reference"], step)


# --- 4. what an interrupted run leaves ------------------------------------------------------------------


def test_a_version_folder_appearing_mid_run_is_never_replaced(faults):
    for number, case in enumerate(faults["intruder"]):
        where = f"intruder {number}: exit {case['code']}, {case['output']!r}, {case['state']}, {case['changed']}"
        assert case["made"], where
        line = one_error_line(case["output"])
        assert case["code"] == 2 and line.endswith("v0001: appeared while this version was made; nothing was published")
        # The other folder is still there, empty; nothing else changed, nothing hidden was left.
        assert case["next_entries"] == [] and case["changed"] == ["v0001"], where
        assert case["state"]["leftovers"] == [] and case["state"]["next_lines"] == 0, where
        assert case["verify"]["ok"] is True and "v0001" in " ".join(case["verify"]["pending"]), where
        # The next command drops the unlogged, unsigned folder and makes the version.
        assert case["rerun_code"] == 0, where
        assert_finished(case, faults["reference"], where)


def aggregate(world: fedkit.World, capsys) -> tuple[int, str, str]:
    return run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                    "--updates", world.round1], capsys)


def verify(world: fedkit.World) -> dict:
    from fedtune.audit import verify_registry

    return verify_registry(world.registry, world.config, world.updates)


def manifest_without_created(folder: Path) -> dict:
    manifest = fedkit.read_manifest(folder)
    manifest.pop("created")
    return manifest


@pytest.fixture(scope="module")
def committed(world, tmp_path_factory) -> Path:
    """v0001 as an uninterrupted `fedtune aggregate` writes it."""
    from fedtune.aggregate import aggregate_round

    clone = fedkit.clone_world(world, tmp_path_factory.mktemp("faults-committed") / "w")
    return aggregate_round(clone.config, clone.registry, clone.round1).folder


def test_leftovers_of_a_killed_run_are_removed_by_the_next_command(world, committed, tmp_path, capsys):
    clone = fedkit.clone_world(world, tmp_path / "w")
    registry = clone.registry
    # What a run killed while writing leaves: its half-built version, its private copies of the updates and a
    # half-written LATEST.
    built = registry / ".v0001.4242.tmp"
    built.mkdir()
    (built / ADAPTER).write_bytes((committed / ADAPTER).read_bytes()[:1000])
    work = registry / ".round-0001.4242.work" / "bank"
    work.mkdir(parents=True)
    shutil.copy(clone.round1 / "bank" / ADAPTER, work / ADAPTER)
    (registry / ".LATEST.x1y2z3.tmp").write_text("v0")
    assert verify(clone)["ok"] is True

    code, out, err = aggregate(clone, capsys)
    assert code == 0, err
    assert [name for name in os.listdir(registry) if HIDDEN.match(name)] == []
    assert (registry / "LATEST").read_text() == "v0001\n"
    assert (registry / "v0001" / ADAPTER).read_bytes() == (committed / ADAPTER).read_bytes()
    assert verify(clone)["pending"] == []


def _torn_log(clone: fedkit.World, committed: Path) -> None:
    # The kill came mid-append: half of the version's line is in the log.
    line = (committed.parent / "log.jsonl").read_bytes().splitlines(keepends=True)[1]
    with open(clone.registry / "log.jsonl", "ab") as log:
        log.write(line[: len(line) // 2])


@pytest.mark.parametrize("torn", [False, True], ids=["unlogged", "torn-log-line"])
def test_a_published_but_unlogged_version_is_committed_by_the_next_command(world, committed, tmp_path, capsys, torn):
    clone = fedkit.clone_world(world, tmp_path / "w")
    shutil.copytree(committed, clone.registry / "v0001")  # the state a kill between publish and log leaves
    if torn:
        _torn_log(clone, committed)
    before = tree_digest(clone.registry)
    report = verify(clone)
    assert report["ok"] is True and any("v0001" in note for note in report["pending"]), report
    assert tree_digest(clone.registry) == before  # verify only reads

    code, _out, err = aggregate(clone, capsys)
    assert code == 2 and ALREADY in one_error_line(err)
    lines = (clone.registry / "log.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and lines[1].endswith(b"\n")
    entry = json.loads(lines[1])
    assert entry["version"] == "v0001" and entry["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert entry["manifest_sha256"] == fedkit.sha256(committed / "manifest.json")
    assert (clone.registry / "LATEST").read_text() == "v0001\n"
    assert tree_digest(clone.registry / "v0001") == tree_digest(committed)
    assert verify(clone)["pending"] == []


def _flip_adapter_byte(folder: Path) -> None:
    data = bytearray((folder / ADAPTER).read_bytes())
    data[-1] ^= 0x01
    (folder / ADAPTER).write_bytes(bytes(data))


def _drop_signature(folder: Path) -> None:
    (folder / "manifest.sig").unlink()


@pytest.mark.parametrize("damage", [_flip_adapter_byte, _drop_signature], ids=["adapter-byte", "signature-missing"])
def test_a_damaged_unlogged_version_is_dropped_and_made_again(world, committed, tmp_path, capsys, damage):
    clone = fedkit.clone_world(world, tmp_path / "w")
    shutil.copytree(committed, clone.registry / "v0001")
    damage(clone.registry / "v0001")
    report = verify(clone)
    assert report["ok"] is True and any("drops it" in note for note in report["pending"]), report

    code, _out, err = aggregate(clone, capsys)
    assert code == 0, err
    folder = clone.registry / "v0001"
    assert (folder / ADAPTER).read_bytes() == (committed / ADAPTER).read_bytes()
    assert manifest_without_created(folder) == manifest_without_created(committed)
    assert [name for name in os.listdir(clone.registry) if HIDDEN.match(name)] == []
    assert verify(clone)["pending"] == []
