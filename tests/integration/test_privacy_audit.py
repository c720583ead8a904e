"""`fedtune audit` on cases whose answer is known: a canary trained to memorization has exposure close to
log2(R+1), canaries the model never saw average log2 e ≈ 1.44, an adapter overfit to a site's train rows tells
them from its held-out rows (AUC near 1) and one trained on other records does not (AUC 0.5 within its chance
spread); then the command line end to end and its refusals.

The tests use a roomier model than the session's tiny one (hidden 128 instead of 32, same tokenizer): the tiny
one cannot memorize rows of random words through LoRA, and an overfit adapter is the point of the test. Records
are random word sequences, so train and held-out rows come from one distribution and only training separates them.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES, WORDS, hub_snapshot, run_cli, write_jsonl

from fedtune.privacy.canaries import CANARIES_FILE
from fedtune.privacy.exposure import audit_sites

ROOMY_HUB_ID = "fedtune-tests/roomy-llama"
VOCAB = WORDS + ["code", "chapter", "loan", "account", "tests", "booleans", "asthma", "fracture", "escrow", "limit"]
SETTINGS = {
    "seq_len": 64,
    "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    "training": {"steps": 3, "batch_size": 8, "lr": 0.005},
    # Half the records held out, so the membership test has ~100 rows on each side; random records have no
    # near copies to find.
    "data": {"eval_fraction": 0.5, "dedup": {"near": False}},
}
CANDIDATES = 2000


def random_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"What is the {rng.choice(VOCAB)} {rng.choice(VOCAB)} rule?",
             "output": " ".join(rng.choice(VOCAB) for _ in range(6)) + "."} for _ in range(count)]


def roomy_model(tiny_model):
    """A 2-layer Llama of hidden size 128 with the tiny model's tokenizer, in the session's Hugging Face cache."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = hub_snapshot(ROOMY_HUB_ID)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def lab(tiny_model, tmp_path_factory):
    """clinic (160 random records, 2 canaries planted 10 times each), bank (400 other random records, no
    canaries), dev (60 records, 24 canaries); the adapter `over` is trained 400 steps on clinic's train split
    alone (~45 passes over it), so it has seen neither bank's records nor dev's canaries."""
    from fedtune.baselines import train_baseline
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation

    root = tmp_path_factory.mktemp("audit")
    settings = json.loads(json.dumps(TINY_OVERRIDES)) | json.loads(json.dumps(SETTINGS))
    config = init_federation(root / "fed", ["clinic", "bank", "dev"], str(roomy_model(tiny_model)), settings)
    data = {site: root / "prepared" / site for site in ("clinic", "bank", "dev")}
    prepare_site(config, "clinic", [write_jsonl(root / "clinic.jsonl", random_records(160, 1))], data["clinic"],
                 canaries=2, canary_repeats=10)
    prepare_site(config, "bank", [write_jsonl(root / "bank.jsonl", random_records(400, 2))], data["bank"])
    prepare_site(config, "dev", [write_jsonl(root / "dev.jsonl", random_records(60, 3))], data["dev"], canaries=24)
    over = train_baseline(config, [data["clinic"]], root / "fed" / "registry" / "v0000", 400, root / "over", "over")
    return {"config": config, "data": data, "over": over}


@pytest.fixture(scope="module")
def overfit_audit(lab):
    return audit_sites(lab["config"], lab["over"], [lab["data"]["clinic"]], candidates=CANDIDATES)


def test_memorized_canaries_rank_first(overfit_audit):
    clinic = overfit_audit["sites"]["clinic"]
    top = math.log2(CANDIDATES + 1)
    assert overfit_audit["exposure_max"] == pytest.approx(top)
    assert clinic["canaries"] == 2 and clinic["repeats"] == 10 and len(clinic["exposure"]) == 2
    # Rank 1 of 2001 is exposure log2(2001) ≈ 10.97; allow the secret a near tie or one rival.
    assert all(e >= top - 1 for e in clinic["exposure"]), clinic
    assert clinic["exposure_mean"] == pytest.approx(sum(clinic["exposure"]) / 2)


def test_overfit_adapter_tells_members_from_held_out_rows(overfit_audit):
    """~50 rows a side: chance would give 0.5 ± 0.06, so above 0.8 is the adapter, not the draw."""
    clinic = overfit_audit["sites"]["clinic"]
    assert clinic["mia_rows"]["members"] == clinic["mia_rows"]["non_members"] >= 40
    assert clinic["mia_auc"] > 0.8, clinic


def test_untouched_canaries_average_log2_e(lab):
    """Secrets a model never saw rank uniformly among the candidates: E[exposure] = log2(R+1) − E[log2 rank]
    ≈ log2 e ≈ 1.44 with std ≈ 1.44 per canary, so the mean of 24 is 1.44 ± 0.3 (the bounds are ~7σ above and
    ~4σ below). Under the base model, and under `over`, which never saw dev's canaries."""
    for adapter in ("base", lab["over"]):
        result = audit_sites(lab["config"], adapter, [lab["data"]["dev"]], candidates=1000)
        dev = result["sites"]["dev"]
        assert dev["canaries"] == 24 and 0.3 < dev["exposure_mean"] < 3.5, dev["exposure"]
    base = audit_sites(lab["config"], "base", [lab["data"]["bank"]])["sites"]["bank"]
    assert base["mia_auc"] == 0.5 and any("no signal" in note for note in base["notes"])


def test_adapter_trained_on_other_records_has_chance_auc(lab):
    """`over` trained on none of bank's rows, train or held out, so their scores are exchangeable and the AUC is
    0.5 ± sqrt((n+m+1)/(12nm)) (≈ 0.04 at ~100 rows a side): 4 standard deviations allowed. bank has no
    canaries: exposure is null with a note saying how to get it."""
    result = audit_sites(lab["config"], lab["over"], [lab["data"]["bank"]])
    bank = result["sites"]["bank"]
    n = bank["mia_rows"]["members"]
    assert n >= 80 and bank["mia_chance_std"] == pytest.approx(math.sqrt((2 * n + 1) / (12 * n * n)))
    assert abs(bank["mia_auc"] - 0.5) < 4 * bank["mia_chance_std"], bank
    assert bank["exposure"] is None and bank["exposure_mean"] is None and bank["canaries"] == 0
    assert any(CANARIES_FILE in note and "--canaries" in note for note in bank["notes"])


# --- the command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fed_cli(tiny_model, tmp_path_factory):
    """A tiny federation: clinic prepared with one canary planted three times, bank without canaries; clinic
    trained round 1 alone and the coordinator merged it as v0001."""
    from conftest import site_records

    from fedtune.aggregate import aggregate_round
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation
    from fedtune.train import train_local

    root = tmp_path_factory.mktemp("audit-cli")
    settings = json.loads(json.dumps(TINY_OVERRIDES)) | {"seq_len": 64}
    config = init_federation(root / "fed", ["clinic", "bank"], str(tiny_model), settings)
    prepare_site(config, "clinic", [write_jsonl(root / "clinic.jsonl", site_records("clinic", 60))], root / "clinic",
                 canaries=1, canary_repeats=3)
    prepare_site(config, "bank", [write_jsonl(root / "bank.jsonl", site_records("bank", 40))], root / "bank")
    train_local(config, "clinic", root / "clinic", root / "fed" / "registry", root / "updates")
    aggregate_round(config, root / "fed" / "registry", root / "updates" / "round-0001", quorum=1)
    return {"root": root, "cfg": root / "fed" / "federation.yaml"}


def test_cli_prepare_with_canaries_then_audit_json(fed_cli, tmp_path, capsys):
    from conftest import site_records

    root, cfg = fed_cli["root"], fed_cli["cfg"]
    raw = write_jsonl(tmp_path / "clinic.jsonl", site_records("clinic", 60))
    code, out, _ = run_cli(["prepare", "--config", cfg, "--site", "clinic", "--input", raw,
                            "--out", tmp_path / "clinic", "--canaries", 1, "--canary-repeats", 3], capsys)
    assert code == 0 and "canaries: 1 planted in train, 3 copies each" in out

    code, out, err = run_cli(["audit", "--config", cfg, "--adapter", "v0001", "--data", tmp_path / "clinic",
                              "--data", root / "bank", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["adapter"] == "v0001" and result["candidates"] == 10_000
    clinic, bank = result["sites"]["clinic"], result["sites"]["bank"]
    assert clinic["canaries"] == 1 and clinic["repeats"] == 3 and len(clinic["exposure"]) == 1
    assert 0 <= clinic["exposure"][0] <= math.log2(10_001) and 1 <= clinic["ranks"][0] <= 10_001
    assert 0 <= clinic["mia_auc"] <= 1 and bank["exposure"] is None and 0 <= bank["mia_auc"] <= 1
    assert "canary 1/1: exposure" in err and "membership inference" in err  # progress on stderr

    code, out, err = run_cli(["audit", "--config", cfg, "--adapter", "base", "--data", root / "bank"], capsys)
    assert code == 0 and "audit of base" in out and "0.500" in out and "no canaries.json" in err


@pytest.mark.parametrize("case", ["missing-folder", "not-on-roster", "foreign-canaries", "few-candidates",
                                  "unknown-version", "same-site-twice"])
def test_cli_audit_refuses_bad_input(fed_cli, tmp_path, capsys, case):
    root, cfg = fed_cli["root"], fed_cli["cfg"]
    args = ["audit", "--config", cfg, "--adapter", "base"]
    if case == "missing-folder":
        args += ["--data", tmp_path / "nowhere"]
        expected = "not a prepared folder"
    elif case == "not-on-roster":
        folder = shutil.copytree(root / "bank", tmp_path / "mallory")
        card = json.loads((folder / "data_card.json").read_text())
        (folder / "data_card.json").write_text(json.dumps({**card, "site": "mallory"}))
        args += ["--data", folder]
        expected = "site 'mallory' is not on the roster"
    elif case == "foreign-canaries":
        folder = shutil.copytree(root / "bank", tmp_path / "bank")
        shutil.copy(root / "clinic" / CANARIES_FILE, folder / CANARIES_FILE)
        args += ["--data", folder]
        expected = "holds the canaries of site 'clinic'"
    elif case == "few-candidates":
        args += ["--data", root / "clinic", "--candidates", "100"]
        expected = "--candidates"
    elif case == "unknown-version":
        args = ["audit", "--config", cfg, "--adapter", "v0009", "--data", root / "clinic"]
        expected = "has no version v0009"
    else:
        args += ["--data", root / "clinic", "--data", root / "clinic"]
        expected = "a second prepared folder for site 'clinic'"
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    code, out, _ = run_cli(args + ["--json"], capsys)
    assert code == 2 and expected in json.loads(out)["error"]
