"""What the coordinator's processes load, and how many threads a round's merge uses.

`fedtune aggregate` runs for real in a child process that writes sys.modules when it exits: the merge must
not pay for the model libraries (transformers, peft, datasets, …), and the help texts must not pay for torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtune.aggregate import round_threads
from fedtune.errors import BadInput

# Run `fedtune ARGS` in this interpreter; the module names loaded by exit go to the file given first.
CHILD = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from fedtune.cli import main
main()
"""

MODEL_LIBRARIES = {"transformers", "peft", "datasets", "pandas", "accelerate", "opacus", "dp_accounting", "flwr",
                   "sklearn", "scipy", "tokenizers"}


def loaded(tmp_path, *args: str, env: dict | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """(top-level packages imported, the finished process) of `fedtune ARGS`."""
    out = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert out.is_file(), done.stderr
    return {name.split(".")[0] for name in json.loads(out.read_text())}, done


@pytest.mark.slow
def test_a_fedavg_round_loads_neither_torch_nor_a_model_library(tmp_path, federation, round_one):
    """FedAvg is read, checked, merged (its factor-averaging error measured too) and signed with numpy alone."""
    _, folder = federation
    modules, done = loaded(tmp_path, "aggregate", "--config", str(folder / "federation.yaml"),
                           "--registry", str(folder / "registry"), "--updates", str(round_one))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((folder / "registry" / "v0001" / "manifest.json").read_text())
    assert "max" in manifest["reconstruction_error"]  # measured, not skipped
    assert "numpy" in modules  # the probe sees what the merge imported
    assert "torch" not in modules
    assert not modules & MODEL_LIBRARIES, f"fedtune aggregate imported {sorted(modules & MODEL_LIBRARIES)}"


@pytest.mark.slow
def test_a_coordinate_wise_round_loads_torch_and_no_model_library(tmp_path, federation, round_one):
    _, folder = federation
    modules, done = loaded(tmp_path, "aggregate", "--config", str(folder / "federation.yaml"), "--method", "median",
                           "--registry", str(folder / "registry"), "--updates", str(round_one))
    assert done.returncode == 0, done.stderr
    assert "torch" in modules  # the median runs on torch tensors
    assert not modules & MODEL_LIBRARIES, f"fedtune aggregate imported {sorted(modules & MODEL_LIBRARIES)}"


@pytest.mark.parametrize("args", [["--help"], ["aggregate", "--help"]])
def test_help_loads_no_torch_nor_the_schema(tmp_path, args):
    modules, done = loaded(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    if args[0] == "aggregate":
        assert "fedavg" in done.stdout  # the method list is there, from the registry of names
    heavy = {"torch", "numpy", "pydantic"} | MODEL_LIBRARIES  # the method list is plain data (fedtune.methods)
    assert not modules & heavy, sorted(modules & heavy)


def test_fedtune_threads_sets_the_merge_threads(monkeypatch):
    monkeypatch.setenv("FEDTUNE_THREADS", "3")
    assert round_threads() == (3, "FEDTUNE_THREADS=3")
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("FEDTUNE_THREADS", bad)
        with pytest.raises(BadInput, match="FEDTUNE_THREADS.*whole number of threads"):
            round_threads()


def test_without_fedtune_threads_the_idle_cores_are_used(monkeypatch):
    import os

    monkeypatch.delenv("FEDTUNE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    for load, threads in ((0.2, 7), (2.5, 5), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert round_threads() == (threads, f"8 cores, load {load:.2f}")


def test_a_round_runs_on_its_threads_and_restores_the_callers(tmp_path, federation, monkeypatch):
    """The thread count is the round's: a process that trains after merging (simulate) gets its own back."""
    import torch

    import fedtune.aggregate.engine as engine
    from fedtune.aggregate import aggregate_round

    config, folder = federation
    before = torch.get_num_threads()
    monkeypatch.setenv("FEDTUNE_THREADS", str(before + 1))
    seen = []
    merge_round = engine.aggregate_round

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return merge_round(*args, **kwargs)

    monkeypatch.setattr(engine, "aggregate_round", spy)
    with pytest.raises(BadInput, match="updates folder not found"):
        aggregate_round(config, folder / "registry", tmp_path / "updates" / "round-0001")
    assert seen == [before + 1]
    assert torch.get_num_threads() == before


def test_the_countries_config_accepts_without_phonenumbers_are_its_regions():
    """config.py skips loading phonenumbers for these; they must be regions it supports."""
    import phonenumbers

    from fedtune.config import PII_ID_COUNTRIES

    assert set(PII_ID_COUNTRIES) <= phonenumbers.SUPPORTED_REGIONS
