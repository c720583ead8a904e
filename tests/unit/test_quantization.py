"""lora.quantization (QLoRA): a site-side choice of how the frozen base is held. It parses, it leaves the adapter's
recorded shape (and so every version manifest and every comparison of one) as it was, and a site without a CUDA GPU
or bitsandbytes is refused with one line before any model is loaded. The 4-bit training itself needs a GPU:
benchmarks/qlora_gpu.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tree_digest
from fedtune import qlora
from fedtune.config import FederationConfig, federation_to_yaml, load_federation, parse_model
from fedtune.errors import BadInput
from fedtune.wire.manifests import LoraShape, VersionManifest

REPO = Path(__file__).resolve().parents[2]
SHAPE = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
needs_refusal = pytest.mark.skipif(not qlora.missing(), reason="this machine has a CUDA GPU and bitsandbytes")


def _quantized_copy(folder: Path, dest: Path) -> Path:
    """A site's copy of federation.yaml that sets lora.quantization: 4bit (nothing else differs)."""
    data = yaml.safe_load((folder / "federation.yaml").read_text())
    data["lora"]["quantization"] = "4bit"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def test_quantization_is_none_unless_set_and_only_none_or_4bit(federation):
    config, _ = federation
    assert config.lora.quantization == "none"
    data = config.model_dump(mode="json", by_alias=True)
    quantized = parse_model(FederationConfig, {**data, "lora": {**data["lora"], "quantization": "4bit"}}, "fed.yaml")
    assert quantized.lora.quantization == "4bit"
    with pytest.raises(BadInput, match=r"fed.yaml: lora.quantization: Input should be 'none' or '4bit'"):
        parse_model(FederationConfig, {**data, "lora": {**data["lora"], "quantization": "8bit"}}, "fed.yaml")


def test_the_federation_file_is_unchanged_unless_a_site_quantizes(federation, tmp_path):
    config, folder = federation
    text = federation_to_yaml(config)
    assert "quantization" not in text  # files written before the setting existed read the same
    assert "quantization" not in (folder / "federation.yaml").read_text()
    quantized = load_federation(_quantized_copy(folder, tmp_path / "site" / "federation.yaml"))
    assert quantized.lora.quantization == "4bit"
    assert "quantization: 4bit" in federation_to_yaml(quantized)


def test_the_recorded_shape_leaves_quantization_out(federation, tmp_path):
    config, folder = federation
    quantized = load_federation(_quantized_copy(folder, tmp_path / "site" / "federation.yaml"))
    assert config.lora.shape() == quantized.lora.shape() == SHAPE
    assert set(SHAPE) == set(LoraShape.model_fields)  # what a version manifest's schema holds
    from fedtune.federation import global_manifest

    manifest = global_manifest(quantized, 0, "0" * 64, parent=None, method="seeded-init")
    assert manifest["lora"] == SHAPE
    VersionManifest.model_validate(manifest)


def test_a_site_that_quantizes_takes_and_verifies_the_same_versions(federation, round_one, tmp_path):
    """Versions made by a coordinator without the setting check under a site's 4-bit copy, and the other way round."""
    from fedtune.aggregate import aggregate_round
    from fedtune.registry import checked_version
    from fedtune.verify import verify_registry, verify_version

    config, folder = federation
    registry = folder / "registry"
    quantized = load_federation(_quantized_copy(folder, tmp_path / "site" / "federation.yaml"))
    v0_dir, v0 = checked_version(registry, quantized)
    assert v0["lora"] == SHAPE and v0_dir.name == "v0000"
    # The coordinator merges under the quantized copy: its version records the same shape.
    result = aggregate_round(quantized, registry, round_one)
    v1 = yaml.safe_load((result.folder / "manifest.json").read_text())
    assert v1["lora"] == SHAPE
    for either in (config, quantized):
        assert checked_version(registry, either)[1]["version"] == "v0001"
        assert verify_registry(registry, either)["ok"] is True
        verify_version(result.folder, either)


@needs_refusal
def test_train_local_refuses_4bit_here_before_loading_anything(federation, prepared, tmp_path, capsys):
    _, folder = federation
    config_path = _quantized_copy(folder, tmp_path / "site" / "federation.yaml")
    before = tree_digest(folder)
    # --model names no folder at all: the refusal comes first, so nothing looked for the model, let alone loaded it.
    code, out, err = run_cli(["train-local", "--config", config_path, "--site", "clinic", "--data",
                              prepared["clinic"], "--global", folder / "registry", "--out", tmp_path / "updates",
                              "--model", tmp_path / "no-such-model", "--num-processes", "2"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: train-local: lora.quantization is 4bit (QLoRA), which needs ")
    import torch

    assert ("a CUDA GPU (none is visible to torch)" in lines[0]) == (not torch.cuda.is_available())
    if "bitsandbytes" in " ".join(qlora.missing()):
        assert 'bitsandbytes (not installed: pip install "fedtune[qlora]")' in lines[0]
    assert lines[0].endswith("or set lora.quantization: none in this site's federation.yaml (the update is the same "
                             "LoRA delta either way)")
    assert not (tmp_path / "updates").exists() and tree_digest(folder) == before


@needs_refusal
def test_loading_the_base_in_4bit_is_refused_here(tiny_model):
    from fedtune import models

    with pytest.raises(BadInput, match=r"lora.quantization is 4bit \(QLoRA\), which needs"):
        models.load_base_model(str(tiny_model), quantization="4bit")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_benchmark_fails_cleanly_without_a_gpu():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "qlora_gpu.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: qlora_gpu.py needs a CUDA GPU (torch sees none); run it on a machine with one"]
