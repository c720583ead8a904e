"""The command line as a user meets it: fast help without torch, help for a bare command, errors as JSON,
warnings at init, the coordinator's status, presets and the key reference."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, run_cli

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["init", "prepare", "train-local", "aggregate", "evaluate", "export", "simulate", "status"]


def _imported_modules(*args: str) -> set[str]:
    """Top-level modules a `fedtune ARGS` process imports, read from `python -X importtime`."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedtune.cli", *args], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    modules = set()
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", line)
        if match:
            modules.add(match.group(1).split(".")[0])
    return modules


@pytest.mark.parametrize("args", [["--help"], *[[command, "--help"] for command in COMMANDS]])
def test_help_imports_no_torch(args):
    modules = _imported_modules(*args)
    assert "typer" in modules  # the measurement sees imports at all
    assert not {"torch", "transformers", "peft", "datasets", "presidio_analyzer"} & modules


def test_a_real_command_does_import_torch():
    # The same measurement on code that loads the torch merge: it must see torch, or the test above proves nothing.
    assert "torch" in _imported_modules("--version") | _imported_modules_of("import fedtune.aggregate.merge")


def _imported_modules_of(code: str) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            timeout=120)
    return {m.group(1).split(".")[0] for m in re.finditer(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", result.stderr)}


def test_bare_fedtune_prints_help_not_an_error(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 0
    assert "Usage" in out and "prepare" in out and "error" not in err


def _help_text(command: str, capsys) -> str:
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    # Rich wraps help into a bordered table: read it as one line of words.
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())


def test_help_describes_arguments_and_defaults(capsys):
    text = _help_text("init", capsys)
    # Typer with click 8.5 drops an Argument's own help, so each command's docstring describes its positionals.
    assert "FOLDER: the new federation's folder" in text
    assert "default: embedded:SmolLM2-135M-Instruct" in text
    text = _help_text("train-local", capsys)
    assert "default: training.steps" in text and "FEDTUNE_MODEL_DIR" in text
    assert "RECIPE: a recipe folder holding recipe.yaml" in _help_text("simulate", capsys)


@pytest.mark.parametrize("args", [
    ["evaluate", "--config", "{tmp}/missing.yaml", "--adapter", "base", "--data", "{tmp}"],
    ["status", "--registry", "{tmp}/registry"],
    ["aggregate", "--config", "{tmp}/missing.yaml", "--registry", "r", "--updates", "u", "--bogus"],
])
def test_errors_are_json_when_json_is_asked_for(tmp_path, capsys, args):
    code, out, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--json"], capsys)
    assert code == 2
    record = json.loads(out)
    assert record["exit_code"] == 2 and record["error"] and "\n" not in record["error"]
    assert err == ""


def test_init_warns_when_the_roster_is_below_the_quorum(tmp_path, tiny_model, capsys):
    code, out, err = run_cli(["init", tmp_path / "fed", "--site", "solo", "--model", tiny_model, "--seq-len", "32"],
                             capsys)
    assert code == 0
    assert "warning: the roster has 1 site(s), fewer than aggregation.quorum 2" in err
    code, out, err = run_cli(["init", tmp_path / "fed2", "--site", "solo", "--model", tiny_model, "--json"], capsys)
    assert json.loads(out)["warnings"] and code == 0


def test_status_shows_what_the_round_waits_for(federation, round_one, tmp_path, capsys):
    _, folder = federation
    updates = folder / "updates"
    shutil.copytree(round_one.parent, updates)
    shutil.rmtree(updates / "round-0001" / "dev")
    code, out, err = run_cli(["status", "--registry", folder / "registry", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["latest"]["version"] == "v0000" and report["round"] == 1 and report["quorum"] == 2
    assert report["waiting"]["sites"] == ["bank", "clinic"] and report["waiting"]["missing"] == ["dev"]
    assert report["ready"] is True
    (updates / "round-0001" / "intruder").mkdir()
    (updates / "round-0001" / "intruder" / "manifest.json").write_text("{}")
    code, out, err = run_cli(["status", "--registry", folder / "registry"], capsys)
    assert "round 1: 2 update(s) waiting" in out and "ready to aggregate" in out and "not yet sent: dev" in out
    assert "intruder" in err


def test_status_counts_missing_updates_below_the_quorum(federation, capsys):
    _, folder = federation
    code, out, err = run_cli(["status", "--registry", folder / "registry"], capsys)
    assert code == 0, err
    assert "0 update(s) waiting" in out and "2 more needed" in out


def test_prepare_refuses_a_folder_with_files_unless_overwrite(federation, site_files, tmp_path, capsys):
    _, folder = federation
    out_dir = tmp_path / "prepared"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    args = ["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input", site_files["clinic"],
            "--out", out_dir]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err and err.startswith("error: ")
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]
    code, out, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["data_card.json", "eval.parquet", "eval_tasks.parquet", "train.parquet"]


def test_aggregate_says_what_the_reconstruction_error_means(federation, round_one, capsys):
    _, folder = federation
    code, out, err = run_cli(["aggregate", "--config", folder / "federation.yaml", "--registry", folder / "registry",
                              "--updates", round_one], capsys)
    assert code == 0, err
    assert "reconstruction error ‖ΔW* − B′A′‖/‖ΔW*‖" in out and "0 = exact" in out
    assert "fedavg averages A and B separately" in out


# ---- presets and the key reference ----

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert {p.stem for p in PRESETS} >= {"cpu-demo", "gpu-8b", "robust-untrusted", "strict-pii"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_each_preset_documents_itself_and_loads(preset):
    from fedtune.federation import load_preset

    text = preset.read_text()
    head = [line for line in text.splitlines() if line.startswith("#")]
    assert len(head) >= 2, "a preset starts with comments: its purpose and the command that uses it"
    assert any(f"fedtune init" in line and f"--from configs/{preset.name}" in line for line in head)
    load_preset(preset)


@pytest.mark.parametrize("preset", ["strict-pii", "robust-untrusted"])
def test_init_from_a_preset(tmp_path, tiny_model, capsys, preset):
    from fedtune.config import load_federation

    sites = [arg for name in "abcde" for arg in ("--site", name)]
    code, out, err = run_cli(["init", tmp_path / "fed", "--from", ROOT / "configs" / f"{preset}.yaml", *sites,
                              "--model", tiny_model, "--seq-len", "32"], capsys)
    assert code == 0, err
    config = load_federation(tmp_path / "fed" / "federation.yaml")
    if preset == "strict-pii":
        # "strict" is at least the default policy: every default country, and more.
        from fedtune.config import DEFAULT_PII_COUNTRIES

        assert set(config.data.pii.countries) > set(DEFAULT_PII_COUNTRIES)
        assert set(config.data.pii.patterns) == {"MRN", "ACCOUNT"}
    else:
        assert config.aggregation.method == "trimmed-mean" and config.aggregation.quorum == 4
    assert config.seq_len == 32  # the command line wins over the preset


@pytest.mark.parametrize("content,problem", [
    ("sites: [a]\n", "a preset does not set sites"),
    ("lora: {rank: 4}\n", "lora.rank: unknown key"),
    ("base_model: {id: x/y, sha256: abc}\n", "base_model.sha256 comes from the weights"),
    ("aggregation: {quorum: 0}\n", "aggregation.quorum"),
])
def test_a_bad_preset_is_one_line(tmp_path, tiny_model, capsys, content, problem):
    preset = tmp_path / "preset.yaml"
    preset.write_text(content)
    code, out, err = run_cli(["init", tmp_path / "fed", "--from", preset, "--site", "a", "--site", "b",
                              "--model", tiny_model], capsys)
    assert code == 2 and problem in err and err.count("\n") == 1
    assert not (tmp_path / "fed").exists()


def test_every_federation_key_is_explained(capsys):
    from fedtune.explain import reference

    rows = list(reference())
    missing = [path for path, _, _, meaning in rows if not meaning]
    assert not missing, f"keys without a description in fedtune/config.py: {missing}"
    code, out, _ = run_cli(["init", "--explain"], capsys)
    assert code == 0
    for path, *_ in rows:
        assert re.search(rf"^{re.escape(path)}  \(", out, re.M), path
    # The README's reference is the generated one, not a hand-kept copy.
    from fedtune.explain import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text()


def test_init_then_train_with_the_cpu_demo_preset_values(tmp_path, tiny_model, site_files, capsys):
    """A preset's values reach the federation file and the stages (here the demo's training settings)."""
    from fedtune.config import load_federation

    code, _, err = run_cli(["init", tmp_path / "fed", "--from", ROOT / "configs" / "cpu-demo.yaml", "--site", "clinic",
                            "--site", "bank", "--model", tiny_model, "--seq-len", "32",
                            "--lora-r", str(TINY_OVERRIDES["lora"]["r"])], capsys)
    assert code == 0, err
    config = load_federation(tmp_path / "fed" / "federation.yaml")
    assert config.training.steps == 20 and config.lora.r == 4 and config.base_model.id != "embedded:SmolLM2-135M-Instruct"
