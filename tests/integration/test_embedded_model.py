"""The embedded default model, SmolLM2-135M-Instruct, end to end (slow: about a minute on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "data"


def test_embedded_round_loads_with_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune import models
    from fedtune.aggregate import aggregate_round
    from fedtune.data import prepare_site
    from fedtune.evaluate import evaluate
    from fedtune.federation import init_federation
    from fedtune.train import train_local

    config = init_federation(tmp_path / "fed", ["clinic", "bank"], None,
                             {"training": {"steps": 2, "batch_size": 2}, "aggregation": {"quorum": 2}})
    assert config.base_model.id == "embedded:SmolLM2-135M-Instruct"
    assert config.base_model.sha256 == models.fingerprint(config.base_model.id)
    registry = tmp_path / "fed" / "registry"
    prepared = {}
    for site, name in (("clinic", "clinic.jsonl"), ("bank", "bank.jsonl")):
        rows = [json.loads(line) for line in (QUICKSTART / name).read_text().splitlines()[:40]]
        prepared[site] = tmp_path / "prepared" / site
        card = prepare_site(config, site, [write_jsonl(tmp_path / name, rows)], prepared[site])
        assert card["tokenizer"]["chat_template"] is True and card["tokens"]["train"]["trained"] > 0
        train_local(config, site, prepared[site], registry, tmp_path / "updates")
    result = aggregate_round(config, registry, tmp_path / "updates" / "round-0001")
    assert result.version == "v0001"

    # A user with plain transformers + peft, no fedtune: load the base and the global version.
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model(config.base_model.id))
    base.eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2, 1]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, registry / "v0001")
        after = tuned(input_ids=ids).logits
    assert not base.config.to_dict().get("quantization_config")
    assert (after - before).abs().max() > 1e-4

    # The version's adapter config names the embedded base by a name transformers resolves offline, so peft's
    # one-call loader works too, and gives the same model.
    from peft import AutoPeftModelForCausalLM

    adapter_config = json.loads((registry / "v0001" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == models.loadable_name(config.base_model.id)
    assert not adapter_config["base_model_name_or_path"].startswith("embedded:")
    auto = AutoPeftModelForCausalLM.from_pretrained(registry / "v0001")
    with torch.no_grad():
        assert torch.allclose(auto(input_ids=ids).logits, after, atol=1e-5)

    scores = evaluate(config, registry / "v0001", list(prepared.values()))
    base_scores = evaluate(config, "base", list(prepared.values()))
    for site in prepared:
        assert scores["sites"][site]["loss"] < base_scores["sites"][site]["loss"]  # trained on these sites
        # Perplexity of the instruction model on this text is in a sane range (random init would be ~50,000).
        assert 1.0 < base_scores["sites"][site]["perplexity"] < 1000
