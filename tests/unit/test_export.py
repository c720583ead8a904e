"""fedtune.export: a global version as a peft adapter folder or merged into a plain transformers model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fedkit
from conftest import TINY_HUB_ID, run_cli, tree_digest
from fedtune import models
from fedtune.export import EXPORT_FILE, export_version

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """A federation with v0001 aggregated from one trained round; the tests only read it."""
    from fedtune.aggregate import aggregate_round

    world = fedkit.build_world(tmp_path_factory.mktemp("export"), tiny_model)
    assert aggregate_round(world.config, world.registry, world.round1).version == "v0001"
    return world


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _version_logits(world, version: str = "v0001") -> torch.Tensor:
    """The version as fedtune itself loads it (evaluate's way): the base model plus the adapter."""
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(models.load_base_model(str(_base(world))), world.registry / version))


def _base(world) -> Path:
    return models.locate_base(world.config.base_model.id, world.config.base_model.sha256, None, "test")


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}


def _export_cli(world, out: Path, *extra, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test printed before is not the command's output
    return run_cli(["export", "--config", world.config_path, "--out", out, *extra], capsys)


def test_adapter_export_loads_with_plain_peft(world, tiny_model, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    out.mkdir()  # an existing empty folder is fine
    code, stdout, err = _export_cli(world, out, "--version", "latest", "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["version"] == "v0001" and result["merged"] is False and result["dtype"] == "fp32"

    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", EXPORT_FILE, "manifest.json"]
    manifest = fedkit.read_manifest(out)
    assert manifest == fedkit.read_manifest(world.registry / "v0001")
    # Uncast, the adapter is the version's file itself, so the folder is still a valid version.
    assert fedkit.sha256(out / "adapter_model.safetensors") == manifest["adapter_sha256"]
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["federation"] == world.config.name and record["adapter_sha256"] == manifest["adapter_sha256"]
    assert record["base_model"] == {"id": world.config.base_model.id, "sha256": world.config.base_model.sha256}

    expected = _version_logits(world)
    assert (expected - _logits(models.load_base_model(str(tiny_model)))).abs().max() > 1e-4
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    torch.testing.assert_close(_logits(plain), expected, atol=0, rtol=0)

    # AutoPeftModelForCausalLM finds the base by adapter_config.json's name for it: the tiny model's hub id, which
    # the session's Hugging Face cache holds as a download would.
    named = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == models.loadable_name(world.config.base_model.id) == TINY_HUB_ID
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(auto), expected, atol=0, rtol=0)


def test_adapter_export_casts_to_the_dtype(world, tmp_path):
    from peft import PeftModel

    out = export_version(world.config, str(world.registry / "v0001"), tmp_path / "bf16", dtype="bf16")
    exported = fedkit.load_tensors(out)
    original = fedkit.load_tensors(world.registry / "v0001")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert exported[key].dtype == torch.bfloat16
        assert torch.equal(exported[key], value.to(torch.bfloat16))
    assert json.loads((out / EXPORT_FILE).read_text())["dtype"] == "bf16"
    model = PeftModel.from_pretrained(models.load_base_model(str(_base(world))), out)
    torch.testing.assert_close(_logits(model), _version_logits(world), atol=2e-2, rtol=2e-2)


# Loads the merged folder in a separate interpreter in which fedtune and peft cannot be imported, and saves
# its logits and what it loaded.
PLAIN_LOAD = """
import json, sys
sys.modules["peft"] = None
sys.modules["fedtune"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids)).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"class": type(model).__name__, "dtype": str(model.dtype),
                  "lora": [n for n, _ in model.named_parameters() if "lora" in n],
                  "chat": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)}))
"""


def _load_plainly(folder: Path, tmp_path: Path) -> tuple[dict, torch.Tensor]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    logits_file = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(IDS.tolist()), str(logits_file)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), torch.load(logits_file).float()


def test_merged_export_is_a_plain_transformers_model(world, tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, err = _export_cli(world, out, "--version", "v0001", "--merge", capsys=capsys)
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}: v0001 merged into {world.config.base_model.id} (fp32)"
    for stage in ("loading the base model", "merging v0001", "writing fp32 weights"):
        assert stage in err

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", EXPORT_FILE} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", models.EMBEDDED_MARKER}
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["merged"] is True and record["dtype"] == "fp32" and record["version"] == "v0001"
    assert record["adapter_sha256"] == fedkit.read_manifest(world.registry / "v0001")["adapter_sha256"]

    loaded, logits = _load_plainly(out, tmp_path)
    assert loaded["class"] == "LlamaForCausalLM" and loaded["dtype"] == "torch.float32" and loaded["lora"] == []
    torch.testing.assert_close(logits, _version_logits(world), atol=1e-5, rtol=1e-5)
    base = AutoTokenizer.from_pretrained(tiny_model)
    assert loaded["chat"] == base.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert AutoTokenizer.from_pretrained(out)("What code is used?")["input_ids"] == base("What code is used?")["input_ids"]


def test_merged_bf16_export_has_bf16_weights(world, tmp_path):
    out = export_version(world.config, "v0001", tmp_path / "merged-bf16", merge=True, dtype="bf16",
                         registry=world.registry)
    assert _dtypes(out / "model.safetensors") == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, logits = _load_plainly(out, tmp_path)
    assert loaded["dtype"] == "torch.bfloat16"
    expected = _version_logits(world)
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1 %.
    assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: ")
    return lines[0]


def _other_model(folder: Path):
    """A model of the tiny model's shape with other weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    return model


@pytest.mark.parametrize("case", ["non-empty out", "unknown version", "tampered adapter", "other base model"])
def test_refusals_write_nothing(case, world, tiny_model, tmp_path, capsys):
    out = tmp_path / "exports" / "out"
    args = ["--version", "v0001"]
    if case == "non-empty out":
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("keep me")
        expected = f"{out}: already exists and is not an empty folder"
    elif case == "unknown version":
        args = ["--version", "v0042"]
        expected = "has no version v0042 (LATEST is v0001)"
    elif case == "tampered adapter":
        copy = tmp_path / "copy" / "v0001"
        shutil.copytree(world.registry / "v0001", copy)
        fedkit.forge_update(copy, tensors=fedkit.with_value(copy, 0.5), rehash=False)
        args = ["--version", copy, "--merge"]
        expected = "adapter_model.safetensors: does not match the sha256 in its manifest"
    else:
        other = tmp_path / "other-model"
        _other_model(tiny_model).save_pretrained(other)
        args = ["--version", "v0001", "--merge", "--model", other]
        expected = "the federation expects"
    before = tree_digest(world.root), fedkit.tree_entries(world.root)
    parent_before = fedkit.tree_entries(tmp_path)

    code, stdout, err = _export_cli(world, out, *args, capsys=capsys)

    assert code == 2, err
    assert expected in _one_error_line(err)
    assert stdout == ""
    assert (tree_digest(world.root), fedkit.tree_entries(world.root)) == before
    assert fedkit.tree_entries(tmp_path) == parent_before  # no output folder, no leftover temporary one


def test_stage_refusals(world, tiny_model, tmp_path):
    from fedtune.errors import BadInput

    with pytest.raises(BadInput, match="not a registry .*give the registry with --registry DIR"):
        export_version(world.config, "latest", tmp_path / "out", registry=tmp_path)
    with pytest.raises(BadInput, match="--version nowhere/v0001: no such folder, and not a version name"):
        export_version(world.config, "nowhere/v0001", tmp_path / "out", registry=world.registry)
    with pytest.raises(BadInput, match="give one of bf16, fp16, fp32"):
        export_version(world.config, "latest", tmp_path / "out", registry=world.registry, dtype="int8")
    # The same weights under a config that says they are quantized: merging into them would not be a full
    # precision model, so it is refused rather than saved with the claim removed.
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="config.json: a quantized model; --merge needs the base in full precision"):
        export_version(world.config, "latest", tmp_path / "out", registry=world.registry, merge=True,
                       model_dir=quantized)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_model_exports_merged(tmp_path):
    """SmolLM2 (dequantized from the embedded GGUF) merged with a trained version, in fp32 and bf16."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import write_jsonl
    from fedtune.aggregate import aggregate_round
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation
    from fedtune.train import train_local

    quickstart = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "data"
    config = init_federation(tmp_path / "fed", ["clinic", "bank"], None,
                             {"training": {"steps": 2, "batch_size": 2}, "aggregation": {"quorum": 2}})
    registry = tmp_path / "fed" / "registry"
    for site in ("clinic", "bank"):
        rows = [json.loads(line) for line in (quickstart / f"{site}.jsonl").read_text().splitlines()[:24]]
        prepare_site(config, site, [write_jsonl(tmp_path / f"{site}.jsonl", rows)], tmp_path / "prepared" / site)
        train_local(config, site, tmp_path / "prepared" / site, registry, tmp_path / "updates")
    assert aggregate_round(config, registry, tmp_path / "updates" / "round-0001").version == "v0001"

    weights = models.locate_base(config.base_model.id, config.base_model.sha256, None, "test")
    ids = AutoTokenizer.from_pretrained(weights)("The patient was coded with essential hypertension.",
                                                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(models.load_base_model(weights), registry / "v0001")(input_ids=ids).logits
        base = models.load_base_model(weights)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4

    for dtype, torch_dtype, tolerance in (("fp32", torch.float32, 1e-4), ("bf16", torch.bfloat16, 0.05)):
        out = export_version(config, "latest", tmp_path / f"merged-{dtype}", merge=True, dtype=dtype, registry=registry)
        stored = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in stored and stored["dtype"] == str(torch_dtype).removeprefix("torch.")
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch_dtype and not getattr(model, "is_quantized", False)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        assert (logits - expected).abs().max() <= tolerance * expected.abs().max()

    # The adapter alone: its config names the embedded model by its name in the local Hugging Face cache.
    adapter = export_version(config, "v0001", tmp_path / "adapter", registry=registry)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        models.loadable_name(config.base_model.id))
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter)(input_ids=ids).logits
    torch.testing.assert_close(auto, expected, atol=1e-5, rtol=1e-5)
