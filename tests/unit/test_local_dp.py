"""Record-level DP-SGD (privacy.mode local): Opacus's per-sample gradients of the LoRA weights are each row's own
gradient, every row is clipped, the site's ledger composes ε over its rounds as the accountant does, and the
budget and a damaged ledger stop a run before it trains."""

from __future__ import annotations

import copy
import json
import stat

import pytest
import torch

from fedtune.config import FederationConfig, TrainingSettings, parse_model
from fedtune.errors import BadInput
from fedtune.models import IGNORE
from fedtune.privacy import local
from fedtune.privacy.accountant import epsilon, epsilon_of

CARD = {"packing_mode": "whole-records"}
ROWS, SEQ = 10, 16


def _peft(tiny_model, trains: str = "AB"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(tiny_model)
    # A and B both random, so both factors have non-zero gradients.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    for name, param in model.named_parameters():
        param.requires_grad = "lora_B" in name or ("lora_A" in name and trains == "AB")
    return model


def _rows(seed: int = 0):
    """Rows with different numbers of labelled tokens, one with none (it must contribute a zero gradient)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (ROWS, SEQ), generator=generator)
    labels = ids.clone()
    for row in range(ROWS):
        labels[row, : 2 + row] = IGNORE
    labels[3] = IGNORE
    return ids, labels


def _config(accountant: str = "rdp", **local_settings) -> FederationConfig:
    privacy = {"mode": "local", "rounds": 3, "accountant": accountant,
               "local": {"noise_multiplier": 1.0, **local_settings}}
    return parse_model(FederationConfig, {"sites": [{"name": "clinic"}], "privacy": privacy}, "federation.yaml")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("trains", ["AB", "B"])
def test_per_sample_gradients_match_one_row_at_a_time(tiny_model, trains):
    from opacus import GradSampleModule

    model = _peft(tiny_model, trains)
    reference = copy.deepcopy(model)
    ids, labels = _rows()
    private = GradSampleModule(model)  # what make_private wraps the model in: hooks mode, mean reduction
    local.row_losses(private._module, ids, labels).mean().backward()
    samples = {n.removeprefix("_module."): p.grad_sample for n, p in private.named_parameters() if p.requires_grad}
    assert len(samples) == (8 if trains == "AB" else 4) and all(s.shape[0] == ROWS for s in samples.values())

    params = dict(reference.named_parameters())
    for row in range(ROWS):
        reference.zero_grad()
        local.row_losses(reference, ids[row : row + 1], labels[row : row + 1]).sum().backward()
        for name, sample in samples.items():
            torch.testing.assert_close(sample[row], params[name].grad, atol=1e-6, rtol=1e-4)
    assert all(float(s[3].abs().max()) == 0.0 for s in samples.values())  # the row without labels
    assert all(float(s[0].abs().max()) > 0 for s in samples.values())


def test_every_row_is_clipped_before_the_noise(tiny_model, monkeypatch):
    """With every row sampled (q = 1) and negligible noise, the gradient AdamW receives is Σ clip_C(g_i) / N,
    computed here by plain autograd one row at a time; rows whose gradient is far above C are cut to C."""
    clip = 0.01
    model = _peft(tiny_model)
    reference = copy.deepcopy(model)
    ids, labels = _rows()
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters() if p.requires_grad}
    norms = []
    for row in range(ROWS):
        reference.zero_grad()
        local.row_losses(reference, ids[row : row + 1], labels[row : row + 1]).sum().backward()
        grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        norms.append(norm)
        for name, grad in grads.items():
            expected[name] += grad * min(1.0, clip / (norm + 1e-6)) / ROWS
    assert sorted(norms)[1] > 10 * clip  # clipping is what the comparison below tests

    seen = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    settings = TrainingSettings(steps=1, batch_size=ROWS, lr=1e-3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    local.dp_train_loop(model, ids.numpy(), labels.numpy(), settings, 1e-6, clip)
    got = dict(zip(names, seen[0]))
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-4)
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in got.values())))
    assert total <= clip + 1e-6


def test_noise_is_os_seeded_whatever_the_torch_seed(tiny_model):
    ids, labels = _rows()
    settings = TrainingSettings(steps=2, batch_size=4, lr=1e-2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _peft(tiny_model)
        torch.manual_seed(0)
        runs.append(_trainable(local.dp_train_loop(model, ids.numpy(), labels.numpy(), settings, 1.0, 1.0).model))
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_step_that_samples_no_row_still_adds_its_noise(tiny_model, monkeypatch):
    ids, labels = _rows()
    monkeypatch.setattr(local, "_poisson_batches", lambda loader: iter([(ids[:0], labels[:0])]))
    model = _peft(tiny_model)
    before = _trainable(model)
    result = local.dp_train_loop(model, ids.numpy(), labels.numpy(), TrainingSettings(steps=1, lr=1e-2), 1.0, 1.0)
    assert result.losses == [0.0] and result.tokens == 0
    after = _trainable(result.model)
    assert all(not torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_runs_compose_into_one_account(accountant):
    """Runs with the same z and q are one longer run; different runs compose to more than either alone."""
    assert epsilon_of([(1.0, 0.1, 2), (1.0, 0.1, 3)], 1e-5, accountant) == epsilon(1.0, 0.1, 5, 1e-5, accountant)
    mixed = epsilon_of([(1.0, 0.1, 5), (2.0, 0.3, 5)], 1e-5, accountant)
    assert mixed > max(epsilon(1.0, 0.1, 5, 1e-5, accountant), epsilon(2.0, 0.3, 5, 1e-5, accountant))
    assert epsilon_of([], 1e-5, accountant) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_ledger_composes_epsilon_over_rounds(tiny_model, tmp_path, accountant):
    config = _config(accountant)
    settings = TrainingSettings(steps=2, batch_size=4, lr=1e-3)
    ids, labels = _rows()
    q = local.sample_rate(ROWS, 4)
    assert q == pytest.approx(1 / 3)  # Opacus: one over the number of batches of the expected size
    for round_number in (1, 2, 3):
        result, record = local.train_private(_peft(tiny_model), ids.numpy(), labels.numpy(), settings, config, CARD,
                                             tmp_path, round=round_number, parent=f"v{round_number - 1:04d}")
        assert len(result.losses) == 2
        assert record == {"mechanism": "local", "example_clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": q,
                          "steps": 2, "rounds": round_number, "delta": 1e-5, "accountant": accountant,
                          "epsilon": pytest.approx(epsilon(1.0, q, 2 * round_number, 1e-5, accountant), rel=1e-9)}
    ledger = tmp_path / local.LEDGER_FILE
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    entries = json.loads(ledger.read_text())["entries"]
    assert [(e["round"], e["parent"], e["steps"], e["federation"]) for e in entries] == [
        (1, "v0000", 2, "federation"), (2, "v0001", 2, "federation"), (3, "v0002", 2, "federation")]
    assert "seed" not in ledger.read_text()


def test_calibrated_noise_meets_the_budget_and_the_budget_stops_the_next_round(tiny_model, tmp_path):
    config = _config(noise_multiplier=None, target_epsilon=4.0)
    settings = TrainingSettings(steps=2, batch_size=4, lr=1e-3)
    ids, labels = _rows()
    spent = []
    for round_number in (1, 2, 3):
        _, record = local.train_private(_peft(tiny_model), ids.numpy(), labels.numpy(), settings, config, CARD,
                                        tmp_path, round=round_number, parent="v0000")
        spent.append(record["epsilon"])
    ledger = json.loads((tmp_path / local.LEDGER_FILE).read_text())
    z = ledger["calibration"]["noise_multiplier"]
    assert {e["noise_multiplier"] for e in ledger["entries"]} == {z}  # chosen on round 1, kept after
    assert spent[0] < spent[1] < spent[2] <= 4.0 and spent[2] > 3.9  # privacy.rounds 3 planned: all of it used

    before = (tmp_path / local.LEDGER_FILE).read_bytes()
    model = _peft(tiny_model)
    weights = _trainable(model)
    with pytest.raises(BadInput, match=r"privacy_ledger.json: round 4 would take this site's record-level ε to "
                                       r"\d+\.\d+, past privacy.local.target_epsilon 4.0") as err:
        local.train_private(model, ids.numpy(), labels.numpy(), settings, config, CARD, tmp_path, round=4, parent="v3")
    assert "\n" not in str(err.value)
    assert (tmp_path / local.LEDGER_FILE).read_bytes() == before
    assert all(torch.equal(p, weights[n]) for n, p in _trainable(model).items())  # nothing was trained


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ('{"format": "fedtune.privacy_ledger/1", "entries": [], "extra": 1}', "extra: unknown key"),
    (json.dumps({"format": "fedtune.privacy_ledger/1", "entries": [{"round": 1, "steps": -2}]}), "entries.0"),
    (json.dumps([1, 2]), "restore the ledger from a backup"),
])
def test_a_damaged_ledger_is_one_clear_error(tiny_model, tmp_path, text, fragment):
    (tmp_path / local.LEDGER_FILE).write_text(text)
    ids, labels = _rows()
    with pytest.raises(BadInput) as err:
        local.train_private(_peft(tiny_model), ids.numpy(), labels.numpy(), TrainingSettings(steps=1), _config(), CARD,
                            tmp_path, round=1, parent="v0000")
    message = str(err.value)
    assert message.startswith(str(tmp_path / local.LEDGER_FILE)) and fragment in message and "\n" not in message


def test_data_packed_across_rows_is_refused(tiny_model, tmp_path):
    ids, labels = _rows()
    with pytest.raises(BadInput, match="data_card.json: prepared with records split across rows; prepare again under "
                                       "privacy.mode local"):
        local.train_private(_peft(tiny_model), ids.numpy(), labels.numpy(), TrainingSettings(steps=1), _config(), {},
                            tmp_path, round=1, parent="v0000")
    assert not (tmp_path / local.LEDGER_FILE).exists()
