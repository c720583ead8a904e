"""The base model is an identity, not a path: each site keeps the weights where it likes and fedtune checks
that they are the federation's by fingerprint. Real files, the real CLI, the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_HUB_ID, run_cli


def _copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        shutil.copy(item.resolve(), target / item.name)
    return target


@pytest.fixture
def private_model(tiny_model, tmp_path) -> Path:
    """The tiny model in a plain folder outside any Hugging Face cache, as a site that fetched it by hand has it."""
    return _copy_model(tiny_model, tmp_path / "coordinator-disk" / "tiny-llama")


@pytest.fixture
def other_model(tiny_model, tmp_path) -> Path:
    """Same architecture and tokenizer, other weights: what a site gets with the wrong checkpoint."""
    from transformers import AutoModelForCausalLM

    folder = _copy_model(tiny_model, tmp_path / "elsewhere" / "tiny-llama-other")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.01)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _init(capsys, tmp_path, model: Path, *extra) -> Path:
    folder = tmp_path / "coordinator"
    code, out, err = run_cli(["init", folder, "--site", "clinic", "--site", "bank", "--model", model, "--lora-r", "4",
                              "--lora-alpha", "8", "--seq-len", "32", *extra], capsys)
    assert code == 0, err
    return folder / "federation.yaml"


def test_federation_records_the_id_and_fingerprint_never_the_path(tmp_path, private_model, capsys):
    config_path = _init(capsys, tmp_path, private_model, "--model-id", "acme/tiny-llama")
    text = config_path.read_text()
    assert str(private_model) not in text and str(tmp_path) not in text
    from fedtune.config import load_federation
    from fedtune.models import fingerprint_folder

    config = load_federation(config_path)
    assert config.base_model.id == "acme/tiny-llama"
    assert config.base_model.sha256 == fingerprint_folder(private_model)
    adapter_config = json.loads((config_path.parent / "registry" / "v0000" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/tiny-llama"


def test_a_folder_in_the_hugging_face_cache_is_named_by_its_hub_id(tmp_path, tiny_model, capsys):
    config_path = _init(capsys, tmp_path, tiny_model)
    assert f"id: {TINY_HUB_ID}" in config_path.read_text()


def test_two_sites_keep_the_model_at_different_paths(tmp_path, private_model, site_files, monkeypatch, capsys):
    config_path = _init(capsys, tmp_path, private_model, "--model-id", "acme/tiny-llama")
    clinic_model = _copy_model(private_model, tmp_path / "clinic" / "models" / "base")
    bank_model = _copy_model(private_model, tmp_path / "bank" / "opt" / "llm" / "weights")
    updates = tmp_path / "coordinator" / "updates"
    prepared = {}
    for site, how in (("clinic", ["--model", clinic_model]), ("bank", [])):
        if site == "bank":  # the bank names its folder once in the environment instead
            monkeypatch.setenv("FEDTUNE_MODEL_DIR", str(bank_model))
        prepared[site] = tmp_path / site / "prepared"
        code, _, err = run_cli(["prepare", "--config", config_path, "--site", site, "--input", site_files[site],
                                "--out", prepared[site], *how], capsys)
        assert code == 0, err
        code, _, err = run_cli(["train-local", "--config", config_path, "--site", site, "--data", prepared[site],
                                "--global", config_path.parent / "registry", "--out", updates, *how], capsys)
        assert code == 0, err
    code, out, err = run_cli(["aggregate", "--config", config_path, "--registry", config_path.parent / "registry",
                              "--updates", updates / "round-0001", "--json"], capsys)
    assert code == 0, err
    assert sorted(c["site"] for c in json.loads(out)["contributors"]) == ["bank", "clinic"]
    code, out, err = run_cli(["evaluate", "--config", config_path, "--adapter", config_path.parent / "registry" / "v0001",
                              "--data", prepared["clinic"], "--data", prepared["bank"], "--json"], capsys)
    assert code == 0, err
    assert set(json.loads(out)["sites"]) == {"clinic", "bank"}


def test_a_site_without_the_model_is_told_where_to_point(tmp_path, private_model, site_files, capsys):
    config_path = _init(capsys, tmp_path, private_model, "--model-id", "acme/tiny-llama")
    code, out, err = run_cli(["prepare", "--config", config_path, "--site", "clinic", "--input", site_files["clinic"],
                              "--out", tmp_path / "prepared"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: prepare: base model 'acme/tiny-llama' is not on this machine")
    assert "--model DIR" in err and "FEDTUNE_MODEL_DIR" in err and "hf download acme/tiny-llama" in err
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("command", ["prepare", "train-local", "evaluate"])
def test_other_weights_are_refused_by_fingerprint(tmp_path, private_model, other_model, site_files, command, capsys):
    config_path = _init(capsys, tmp_path, private_model, "--model-id", "acme/tiny-llama")
    prepared = tmp_path / "prepared"
    code, _, err = run_cli(["prepare", "--config", config_path, "--site", "clinic", "--input", site_files["clinic"],
                            "--out", prepared, "--model", private_model], capsys)
    assert code == 0, err
    args = {
        "prepare": ["prepare", "--config", config_path, "--site", "clinic", "--input", site_files["clinic"],
                    "--out", tmp_path / "again"],
        "train-local": ["train-local", "--config", config_path, "--site", "clinic", "--data", prepared, "--global",
                        config_path.parent / "registry", "--out", tmp_path / "outbox"],
        "evaluate": ["evaluate", "--config", config_path, "--adapter", "base", "--data", prepared],
    }[command]
    code, out, err = run_cli([*args, "--model", other_model], capsys)
    from fedtune.models import fingerprint_folder

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{command}: base model --model {other_model.resolve()} has fingerprint" in err
    assert fingerprint_folder(other_model)[:12] in err and fingerprint_folder(private_model)[:12] in err
    assert not (tmp_path / "again").exists() and not (tmp_path / "outbox").exists()


def test_fedtune_model_dir_with_other_weights_is_refused_by_name(tmp_path, private_model, other_model, site_files,
                                                                  monkeypatch, capsys):
    config_path = _init(capsys, tmp_path, private_model, "--model-id", "acme/tiny-llama")
    monkeypatch.setenv("FEDTUNE_MODEL_DIR", str(other_model))
    code, _, err = run_cli(["prepare", "--config", config_path, "--site", "clinic", "--input", site_files["clinic"],
                            "--dry-run"], capsys)
    assert code == 2 and f"base model FEDTUNE_MODEL_DIR {other_model.resolve()} has fingerprint" in err


@pytest.mark.parametrize("case", ["missing", "no-config", "bin-weights", "uncached-hub-id", "not-an-id", "garbage"])
def test_a_wrong_init_model_is_one_line(tmp_path, tiny_model, case, capsys):
    target = tmp_path / "model"
    if case == "missing":
        given = str(tmp_path / "no-such-folder")
    elif case == "no-config":
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"")
        given = str(target)
    elif case == "bin-weights":
        _copy_model(tiny_model, target)
        (target / "model.safetensors").rename(target / "pytorch_model.bin")
        given = str(target)
    elif case == "uncached-hub-id":
        given = "someone/not-downloaded-model"
    elif case == "not-an-id":
        given = "just some words"
    else:  # a folder with a config transformers cannot read as a causal LM
        _copy_model(tiny_model, target)
        (target / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
        given = str(target)
    code, out, err = run_cli(["init", tmp_path / "fed", "--site", "a", "--site", "b", "--model", given], capsys)
    assert code == 2, err
    # Progress lines may come first (a model that fails while loading); the problem itself is one line.
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in err and (case == "garbage" or len(lines) == 1)
    assert not (tmp_path / "fed" / "federation.yaml").exists() and not (tmp_path / "fed" / "registry").exists()


def test_autopeft_loads_a_version_by_the_base_it_names(tmp_path, tiny_model, capsys):
    """AutoPeftModelForCausalLM finds the base through adapter_config.json alone (here: the Hugging Face cache)."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    config_path = _init(capsys, tmp_path, tiny_model)
    version = config_path.parent / "registry" / "v0000"
    # v0000's B factors are zero; make the adapter do something so both loaders are compared on a real delta.
    from safetensors.torch import load_file, save_file

    tensors = {k: (torch.randn_like(v) if "lora_B" in k else v) for k, v in load_file(version / "adapter_model.safetensors").items()}
    trained = tmp_path / "trained"
    shutil.copytree(version, trained)
    save_file(tensors, trained / "adapter_model.safetensors")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    auto = AutoPeftModelForCausalLM.from_pretrained(trained).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert torch.allclose(auto(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)
        assert not torch.allclose(auto(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_fingerprint_follows_the_weights_not_a_claim(tmp_path, tiny_model, capsys):
    from fedtune import models

    folder = _copy_model(tiny_model, tmp_path / "m")
    honest = models.fingerprint_folder(folder)
    # A marker claiming the folder was converted from the embedded GGUF counts only for the weights it names.
    (folder / models.EMBEDDED_MARKER).write_text(json.dumps({"gguf_sha256": "e" * 64, "weights_sha256": "0" * 64}))
    assert models.fingerprint_folder(folder) == honest
    # Changed weights (same size, new contents) change the fingerprint, even with the on-disk hash memo.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    models._SHA_MEMO.clear()
    assert models.fingerprint_folder(folder) != honest
