"""fedtune.evaluate: token-weighted loss and perplexity, checked against the HF model's own loss."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import fedkit
from fedtune.errors import BadInput
from fedtune.evaluate import evaluate


def _eval_split(prepared_dir):
    table = pq.read_table(prepared_dir / "eval.parquet")
    ids = torch.tensor(np.array(table.column("input_ids").to_pylist()), dtype=torch.long)
    labels = torch.tensor(np.array(table.column("labels").to_pylist()), dtype=torch.long)
    return ids, labels


def _hf_loss(model, prepared_dir):
    """Token-weighted mean of the HF model's own loss (it shifts the labels), one row at a time."""
    ids, labels = _eval_split(prepared_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(len(ids)):
            n = int((labels[row, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=ids[row : row + 1], labels=labels[row : row + 1]).loss.item()
            total, count = total + loss * n, count + n
    return total / count, count


def test_base_model_metrics_per_site(federation, prepared, tiny_model):
    from transformers import AutoModelForCausalLM

    config, _ = federation
    result = evaluate(config, "base", [prepared[s] for s in ("clinic", "bank", "dev")])

    assert result["adapter"] == "base"
    assert list(result["sites"]) == ["clinic", "bank", "dev"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for site, metrics in result["sites"].items():
        assert set(metrics) == {"loss", "perplexity", "tokens"}
        expected_loss, expected_tokens = _hf_loss(model, prepared[site])
        _ids, labels = _eval_split(prepared[site])
        assert metrics["tokens"] == expected_tokens == int((labels[:, 1:] != -100).sum()) > 0
        # The shift matters: counting unshifted labels gives another number whenever a row starts labelled.
        assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
        assert 3 < metrics["loss"] < 8  # random init over ~400 tokens: about ln(400)


def test_loss_does_not_depend_on_the_batch_size(federation, prepared):
    config, _ = federation
    one = evaluate(config, "base", [prepared["dev"]], batch_size=1)["sites"]["dev"]
    many = evaluate(config, "base", [prepared["dev"]], batch_size=64)["sites"]["dev"]
    odd = evaluate(config, "base", [prepared["dev"]], batch_size=3)["sites"]["dev"]
    assert one["tokens"] == many["tokens"] == odd["tokens"]
    assert one["loss"] == pytest.approx(many["loss"], abs=1e-5)
    assert odd["loss"] == pytest.approx(many["loss"], abs=1e-5)


def test_a_trained_version_scores_differently_from_base(federation, prepared, round_one):
    from fedtune.aggregate import aggregate_round

    config, folder = federation
    result = aggregate_round(config, folder / "registry", round_one)
    data = [prepared[s] for s in ("clinic", "bank", "dev")]
    base = evaluate(config, "base", data)
    trained = evaluate(config, result.folder, data)
    assert trained["adapter"] == "v0001"
    for site in ("clinic", "bank", "dev"):
        assert trained["sites"][site]["tokens"] == base["sites"][site]["tokens"]
        assert abs(trained["sites"][site]["loss"] - base["sites"][site]["loss"]) > 1e-5
        assert trained["sites"][site]["perplexity"] == pytest.approx(math.exp(trained["sites"][site]["loss"]))


def test_preloaded_base_model_is_given_back_without_lora(federation, prepared, round_one):
    from peft.tuners.lora import LoraLayer

    from fedtune.aggregate import aggregate_round
    from fedtune.models import load_base_model

    config, folder = federation
    version = aggregate_round(config, folder / "registry", round_one).folder
    model = load_base_model(config.base_model.id)
    x = torch.arange(1, 33).reshape(1, 32)
    with torch.no_grad():
        logits_before = model(input_ids=x).logits.clone()
    modules_before = [name for name, _ in model.named_modules()]

    fresh = evaluate(config, version, [prepared["bank"]])
    reused = evaluate(config, version, [prepared["bank"]], base_model=model)

    assert reused["sites"]["bank"]["loss"] == pytest.approx(fresh["sites"]["bank"]["loss"], abs=1e-6)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not any("lora" in name for name, _ in model.named_modules())
    assert [name for name, _ in model.named_modules()] == modules_before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, logits_before, atol=0, rtol=0)
    # Reused again as the base, it scores as the base.
    base = evaluate(config, "base", [prepared["bank"]])
    again = evaluate(config, "base", [prepared["bank"]], base_model=model)
    assert again["sites"]["bank"]["loss"] == pytest.approx(base["sites"]["bank"]["loss"], abs=1e-6)
    assert abs(again["sites"]["bank"]["loss"] - reused["sites"]["bank"]["loss"]) > 1e-5


def test_refusals(federation, prepared, round_one, tmp_path):
    from fedtune.aggregate import aggregate_round

    config, folder = federation
    with pytest.raises(BadInput, match="give at least one --data folder"):
        evaluate(config, "base", [])
    with pytest.raises(BadInput, match="data_card.json: file not found"):
        evaluate(config, "base", [tmp_path / "nowhere"])
    version = aggregate_round(config, folder / "registry", round_one).folder
    other = tmp_path / "v0001"
    shutil.copytree(version, other)
    manifest = fedkit.read_manifest(other)
    manifest["base_model"]["sha256"] = "f" * 64
    fedkit.write_manifest(other, manifest)
    with pytest.raises(BadInput, match="not the coordinator's signature"):
        evaluate(config, other, [prepared["dev"]])
    fedkit.sign_version(other, folder / "coordinator.key")  # signed by the coordinator, yet for another model
    with pytest.raises(BadInput, match="built on another base model"):
        evaluate(config, other, [prepared["dev"]])
