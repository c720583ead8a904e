"""The README's walkthrough runs as written: its "Your own base model" and "your data" blocks are executed by
bash, with the tiny model standing in for the model folders they name."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MODEL_FOLDERS = ("/models/SmolLM2-360M-Instruct", "/srv/llm/smollm2", "/opt/weights/smollm2")


def _block_after(marker: str) -> str:
    """The first ```bash block after `marker` in the README."""
    start = README.index(marker)
    match = re.compile(r"```bash\n(.*?)```", re.S).search(README, start)
    assert match, f"no bash block after {marker!r}"
    return match.group(1)


def _bash(script: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=900)


def _stand_in(tiny_model: Path, root: Path) -> dict[str, str]:
    """Copies of the tiny model at three places, for the three folders the README names."""
    paths = {}
    for name in MODEL_FOLDERS:
        target = root / "disks" / name.strip("/")
        target.mkdir(parents=True)
        for item in tiny_model.iterdir():
            shutil.copy(item.resolve(), target / item.name)
        paths[name] = str(target)
    return paths


def test_your_own_base_model_walkthrough(tmp_path, tiny_model):
    script = _block_after("#### Your own base model")
    for name in MODEL_FOLDERS:
        assert name in script
    for name, path in _stand_in(tiny_model, tmp_path).items():
        script = script.replace(name, path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    result = _bash(script, work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 update(s) waiting" in result.stdout and "ready to aggregate" in result.stdout
    assert "wrote registry/v0001: 2 updates merged" in result.stdout
    manifest = json.loads((work / "coordinator" / "registry" / "v0001" / "manifest.json").read_text())
    assert sorted(c["site"] for c in manifest["contributors"]) == ["bank", "clinic"]
    assert manifest["base_model"]["id"] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert "/srv/" not in (work / "coordinator" / "federation.yaml").read_text()


def test_your_data_csv_walkthrough(tmp_path, tiny_model):
    from conftest import decoded_tokens
    from fedtune.models import load_tokenizer

    paths = _stand_in(tiny_model, tmp_path)
    init = _bash(f"fedtune init coordinator --site bank --site clinic --model {paths[MODEL_FOLDERS[0]]}", tmp_path)
    assert init.returncode == 0, init.stderr
    bank = tmp_path / "bank"
    bank.mkdir()
    shutil.copy(tmp_path / "coordinator" / "federation.yaml", bank)
    with open(bank / "questions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "answer"])
        for i in range(30):
            writer.writerow([i, f"What does overdraft fee tier {i} cost per month?",
                             f"Tier {i} of the overdraft fee costs {i + 3} euros per month."])
    script = _block_after("Your own data, e.g. a CSV")
    result = _bash(script, bank, env={"FEDTUNE_MODEL_DIR": paths[MODEL_FOLDERS[1]]})
    assert result.returncode == 0, result.stdout + result.stderr
    card = json.loads((bank / "prepared" / "data_card.json").read_text())
    assert card["records"]["read"] == 30 and card["records"]["kept"] == 30
    text = decoded_tokens(bank / "prepared", load_tokenizer(paths[MODEL_FOLDERS[1]]))
    assert "overdraft fee tier 7 cost" in text and "costs 10 euros per month" in text


def _blocks_between(start: str, end: str) -> list[str]:
    """Every ```bash block of the README between two headings."""
    section = README[README.index(start):README.index(end)]
    return re.compile(r"```bash\n(.*?)```", re.S).findall(section)


def test_three_parties_with_keys_log_verify_and_rollback(tmp_path, tiny_model):
    """The walkthrough's blocks in order — keys, init, the clinic's step and the same for the bank, the
    coordinator's round, log, verify and rollback — with the tiny model as the federation's base."""
    keys, init, site, coordinator = _blocks_between("## The same federation by hand, as three parties",
                                                     "`prepare` reads `.jsonl`")[:2] + _blocks_between(
        "**2. Each site**", "`prepare` reads `.jsonl`")[:1] + _blocks_between(
        "**3. Coordinator** — collect", "### Preparing a site's data")[:1]
    assert "fedtune init coordinator --site clinic" in init and "fedtune rollback" in coordinator
    bank = site.replace("clinic", "bank")
    script = "\n".join([keys, init.replace("fedtune init coordinator", f"fedtune init coordinator --model {tiny_model}"),
                        site, bank, coordinator])
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    result = _bash(script, work, env={"FEDTUNE_MODEL_DIR": str(tiny_model)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    registry = work / "coordinator" / "registry"
    v1 = json.loads((registry / "v0001" / "manifest.json").read_text())
    assert sorted(c["site"] for c in v1["contributors"]) == ["bank", "clinic"] and v1["rejected"] == []
    assert (work / "clinic" / "outbox" / "round-0001" / "clinic" / "manifest.sig").is_file()
    v2 = json.loads((registry / "v0002" / "manifest.json").read_text())
    assert v2["rolled_back_to"] == "v0000" and v2["parent"] == "v0001" and "regressed" in v2["reason"]
    assert (registry / "v0002" / "adapter_model.safetensors").read_bytes() == (
        registry / "v0000" / "adapter_model.safetensors").read_bytes()
    assert (registry / "LATEST").read_text().strip() == "v0002"
    key = (work / "coordinator" / "coordinator.key")
    assert key.is_file() and key.stat().st_mode & 0o777 == 0o600
    assert not (work / "clinic" / "coordinator.key").exists()
