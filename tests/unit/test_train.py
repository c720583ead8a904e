"""fedtune.train.train_local: the update folder and its manifest, the delta, determinism, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import fedkit
from conftest import tree_digest
from fedtune.errors import BadInput
from fedtune.wire import UPDATE_FORMAT
from fedtune.train import train_local

ADAPTER = fedkit.ADAPTER


def _train_parquet(prepared_dir):
    table = pq.read_table(prepared_dir / "train.parquet")
    labels = np.array(table.column("labels").to_pylist())
    return table.num_rows, int((labels != -100).sum())


def test_update_folder_and_manifest(federation, prepared, tmp_path):
    config, folder = federation
    registry = folder / "registry"
    v0 = fedkit.read_manifest(registry / "v0000")

    update = train_local(config, "clinic", prepared["clinic"], registry, tmp_path / "updates")

    assert update == tmp_path / "updates" / "round-0001" / "clinic"
    assert sorted(p.name for p in update.iterdir()) == ["adapter_config.json", ADAPTER, "manifest.json"]
    assert [p.name for p in update.parent.iterdir()] == ["clinic"]  # no temporary folder left behind
    manifest = fedkit.read_manifest(update)
    rows, trained_tokens = _train_parquet(prepared["clinic"])
    assert manifest["format"] == UPDATE_FORMAT == "fedtune.update/2"
    assert manifest["site"] == "clinic" and manifest["round"] == 1
    assert manifest["parent"] == {"version": "v0000", "sha256": v0["adapter_sha256"]}
    assert v0["adapter_sha256"] == fedkit.sha256(registry / "v0000" / ADAPTER)
    assert manifest["base_model"] == {"id": config.base_model.id, "sha256": config.base_model.sha256}
    assert manifest["lora"] == {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    assert manifest["num_examples"] == rows and rows > 1
    assert manifest["num_tokens"] == trained_tokens > 0
    train = manifest["train"]
    assert train["steps"] == config.training.steps == 3
    assert train["lr"] == config.training.lr == 0.01
    assert train["batch_size"] == 4
    for key in ("loss_first", "loss_last"):
        assert isinstance(train[key], float) and math.isfinite(train[key])
        # A random-init model over a 400-token vocabulary starts near ln(400) ≈ 6.
        assert 3 < train[key] < 8
    assert isinstance(train["seconds"], float) and 0 <= train["seconds"] < 120
    assert manifest["sha256"] == fedkit.sha256(update / ADAPTER)
    assert manifest["privacy"] == {"mechanism": None}
    assert manifest["fedtune_version"] and manifest["created"]
    adapter_config = json.loads((update / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8.0)
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]


def test_delta_has_the_global_layout_and_moves_lora_b(federation, prepared, tmp_path):
    config, folder = federation
    registry = folder / "registry"
    update = train_local(config, "bank", prepared["bank"], registry, tmp_path / "updates")
    delta = load_file(str(update / ADAPTER))
    parent = load_file(str(registry / "v0000" / ADAPTER))

    assert delta.keys() == parent.keys()
    assert {k: (v.shape, v.dtype) for k, v in delta.items()} == {k: (v.shape, v.dtype) for k, v in parent.items()}
    assert len(delta) == 2 * 2 * 2  # 2 layers × (q_proj, v_proj) × (A, B)
    b_keys = [k for k in delta if "lora_B" in k]
    assert b_keys and all(delta[k].abs().max() > 1e-6 for k in b_keys)
    assert all(parent[k].abs().max() == 0 for k in b_keys)  # v0000's B is zero, so B's delta is B itself
    assert all(torch.isfinite(v).all() for v in delta.values())


def test_delta_is_local_adapter_minus_parent(federation, prepared, tmp_path):
    """Loading parent + delta with plain peft reproduces what the site trained: the update changes the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.adapter import write_adapter

    config, folder = federation
    registry = folder / "registry"
    update = train_local(config, "dev", prepared["dev"], registry, tmp_path / "updates")
    parent = load_file(str(registry / "v0000" / ADAPTER))
    delta = load_file(str(update / ADAPTER))
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    write_adapter(local_dir, {k: parent[k] + delta[k] for k in parent}, config)
    x = torch.arange(1, 33).reshape(1, 32)
    with torch.no_grad():
        before = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model.id), registry / "v0000")
        after = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model.id), local_dir)
        assert (after(input_ids=x).logits - before(input_ids=x).logits).abs().max() > 1e-4


def test_training_is_deterministic(federation, prepared, tmp_path):
    config, folder = federation
    first = train_local(config, "clinic", prepared["clinic"], folder / "registry", tmp_path / "a")
    second = train_local(config, "clinic", prepared["clinic"], folder / "registry", tmp_path / "b")
    one, two = load_file(str(first / ADAPTER)), load_file(str(second / ADAPTER))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    m1, m2 = fedkit.read_manifest(first), fedkit.read_manifest(second)
    assert m1["sha256"] == m2["sha256"]
    assert (m1["train"]["loss_first"], m1["train"]["loss_last"]) == (m2["train"]["loss_first"], m2["train"]["loss_last"])


def test_a_second_update_for_the_same_site_and_round_is_refused(federation, prepared, tmp_path):
    config, folder = federation
    update = train_local(config, "clinic", prepared["clinic"], folder / "registry", tmp_path / "updates")
    before = tree_digest(tmp_path / "updates")
    with pytest.raises(BadInput, match=r"round-0001/clinic: already exists; this site has already sent an update for round 1"):
        train_local(config, "clinic", prepared["clinic"], folder / "registry", tmp_path / "updates")
    assert tree_digest(tmp_path / "updates") == before
    assert update.is_dir()


def test_site_not_on_the_roster_is_refused(federation, prepared, tmp_path):
    config, folder = federation
    with pytest.raises(BadInput, match=r"site 'nobody' is not on the roster \(clinic, bank, dev\)"):
        train_local(config, "nobody", prepared["clinic"], folder / "registry", tmp_path / "updates")
    assert not (tmp_path / "updates").exists()


def test_data_prepared_for_another_site_is_refused(federation, prepared, tmp_path):
    config, folder = federation
    with pytest.raises(BadInput, match=r"data_card.json: prepared for site 'bank', not 'clinic'"):
        train_local(config, "clinic", prepared["bank"], folder / "registry", tmp_path / "updates")
    assert not (tmp_path / "updates" / "round-0001" / "clinic").exists()


def test_overrides_are_used_and_recorded(federation, prepared, tmp_path):
    config, folder = federation
    update = train_local(config, "dev", prepared["dev"], folder / "registry", tmp_path / "updates",
                         steps=1, lr=0.005, batch_size=2)
    train = fedkit.read_manifest(update)["train"]
    assert (train["steps"], train["lr"], train["batch_size"]) == (1, 0.005, 2)
    assert train["loss_first"] == train["loss_last"]  # one step: the first loss is the last
    default = train_local(config, "dev", prepared["dev"], folder / "registry", tmp_path / "default")
    assert fedkit.read_manifest(default)["train"]["steps"] == 3
    assert fedkit.read_manifest(default)["train"]["loss_first"] != fedkit.read_manifest(default)["train"]["loss_last"]


@pytest.mark.parametrize("override", [{"steps": 0}, {"lr": 0.0}, {"batch_size": 0}, {"lr": -1.0}])
def test_bad_overrides_are_refused(federation, prepared, tmp_path, override):
    config, folder = federation
    (key,) = override
    with pytest.raises(BadInput, match=f"train-local: {key}: Input should be greater than"):
        train_local(config, "dev", prepared["dev"], folder / "registry", tmp_path / "updates", **override)
    assert not (tmp_path / "updates").exists()


def test_round_two_trains_from_the_latest_version(federation, round_one, prepared, tmp_path):
    from fedtune.aggregate import aggregate_round

    config, folder = federation
    registry = folder / "registry"
    aggregate_round(config, registry, round_one)
    v1 = fedkit.read_manifest(registry / "v0001")
    update = train_local(config, "bank", prepared["bank"], registry, tmp_path / "updates")
    manifest = fedkit.read_manifest(update)
    assert update.parent.name == "round-0002"
    assert manifest["round"] == 2 and manifest["parent"] == {"version": "v0001", "sha256": v1["adapter_sha256"]}
    # A version folder may be named instead of the registry: v0000 again means round 1.
    again = train_local(config, "bank", prepared["bank"], registry / "v0000", tmp_path / "elsewhere")
    assert fedkit.read_manifest(again)["round"] == 1
    assert fedkit.read_manifest(again)["parent"]["version"] == "v0000"


@pytest.fixture
def lora_model(tiny_model):
    """The tiny model wrapped in a LoRA with non-zero B, so the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    from fedtune import models

    torch.manual_seed(0)
    return get_peft_model(models.load_base_model(str(tiny_model)),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_loss_on_labelled_positions_equals_the_models_own_loss(lora_model):
    """The loop projects only labelled positions onto the vocabulary; the loss must not change."""
    from fedtune.train import causal_lm_loss

    model = lora_model
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 15:] = -100
    labels[2] = -100  # a row with nothing to learn
    ours = causal_lm_loss(model, ids, labels)
    theirs = model(input_ids=ids, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_damaged_parent_version_is_refused(federation, prepared, tmp_path):
    config, folder = federation
    adapter = folder / "registry" / "v0000" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    from safetensors.torch import save_file

    save_file(tensors, adapter)
    with pytest.raises(BadInput, match="does not match the sha256 in its manifest"):
        train_local(config, "dev", prepared["dev"], folder / "registry", tmp_path / "updates")
    assert not (tmp_path / "updates").exists()


def test_models_outside_the_plain_head_list_take_the_full_forward(lora_model, monkeypatch):
    from fedtune import models
    from fedtune.train import causal_lm_loss

    model = lora_model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    fast = causal_lm_loss(model, ids, labels).item()
    monkeypatch.setattr(models, "PLAIN_HEAD_MODELS", set())
    full = causal_lm_loss(model, ids, labels).item()
    assert full == pytest.approx(fast, rel=1e-6)
    assert full == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-6)
