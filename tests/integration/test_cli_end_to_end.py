"""The three parties' workflow, each command a separate `fedtune` process, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FEDTUNE = [sys.executable, "-m", "fedtune.cli"]


def fedtune(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*FEDTUNE, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def test_three_parties_by_hand(tmp_path, tiny_model, site_files):
    # The coordinator starts the federation and sends federation.yaml + v0000 to the sites.
    coord = tmp_path / "coordinator"
    ok(fedtune("init", coord, "--site", "clinic", "--site", "bank", "--model", tiny_model, "--lora-r", "4",
               "--lora-alpha", "8", "--target-modules", "q_proj,v_proj", "--seq-len", "32", cwd=tmp_path))
    config = coord / "federation.yaml"
    assert (coord / "registry" / "LATEST").read_text().strip() == "v0000"

    sites = {}
    for site in ("clinic", "bank"):
        home = tmp_path / site
        home.mkdir()
        shutil.copy(config, home / "federation.yaml")
        shutil.copytree(coord / "registry" / "v0000", home / "v0000")
        card = json.loads(ok(fedtune("prepare", "--config", "federation.yaml", "--site", site, "--input",
                                     site_files[site], "--out", "prepared", "--json", cwd=home)).stdout)
        assert card["site"] == site and card["records"]["kept"] == 40
        update = json.loads(ok(fedtune("train-local", "--config", "federation.yaml", "--site", site, "--data",
                                       "prepared", "--global", "v0000", "--out", "outbox", "--steps", "3",
                                       "--json", cwd=home)).stdout)
        assert update["round"] == 1 and update["train"]["steps"] == 3
        sites[site] = home / "outbox" / "round-0001" / site
        # Only the update crosses the boundary: no raw text, no prepared tokens.
        assert sorted(p.name for p in sites[site].iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "manifest.json"]

    inbox = coord / "updates" / "round-0001"
    for site, folder in sites.items():
        shutil.copytree(folder, inbox / site)
    result = ok(fedtune("aggregate", "--config", "federation.yaml", "--registry", "registry", "--updates",
                        "updates/round-0001", "--json", cwd=coord))
    merged = json.loads(result.stdout)
    assert merged["version"] == "v0001" and merged["rejected"] == []
    assert sorted(c["site"] for c in merged["contributors"]) == ["bank", "clinic"]
    assert (coord / "registry" / "LATEST").read_text().strip() == "v0001"

    v1 = load_file(coord / "registry" / "v0001" / "adapter_model.safetensors")
    v0 = load_file(coord / "registry" / "v0000" / "adapter_model.safetensors")
    assert any(not torch.equal(v1[k], v0[k]) for k in v0)

    # Any site evaluates the new version on its own eval split.
    home = tmp_path / "clinic"
    shutil.copytree(coord / "registry" / "v0001", home / "v0001")
    base = json.loads(ok(fedtune("evaluate", "--config", "federation.yaml", "--adapter", "base", "--data",
                                 "prepared", "--json", cwd=home)).stdout)
    tuned = json.loads(ok(fedtune("evaluate", "--config", "federation.yaml", "--adapter", "v0001", "--data",
                                  "prepared", "--json", cwd=home)).stdout)
    assert base["adapter"] == "base" and tuned["adapter"] == "v0001"
    assert set(tuned["sites"]) == {"clinic"}
    metrics = tuned["sites"]["clinic"]
    assert metrics["tokens"] > 0 and metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert metrics["loss"] < base["sites"]["clinic"]["loss"]  # v0001 learnt from the clinic's own data

    # The human-readable forms print where they wrote / a table.
    table = ok(fedtune("evaluate", "--config", "federation.yaml", "--adapter", "v0001", "--data", "prepared", cwd=home))
    assert "clinic" in table.stdout and "perplexity" in table.stdout


def test_help_lists_commands_and_methods(tmp_path):
    top = ok(fedtune("--help", cwd=tmp_path)).stdout
    for command in ("init", "prepare", "train-local", "aggregate", "evaluate", "simulate"):
        assert command in top
    agg = ok(fedtune("aggregate", "--help", cwd=tmp_path)).stdout
    assert "fedavg" in agg and "trimmed-mean" in agg


def test_missing_file_is_one_line_exit_2(tmp_path):
    result = fedtune("prepare", "--config", tmp_path / "nope.yaml", "--site", "a", "--input", "x.jsonl",
                     "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.yaml" in lines[0]
    assert not (tmp_path / "out").exists()
