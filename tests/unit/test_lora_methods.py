"""LoRA-aware aggregation on real trained updates: svd and stack against peft's add_weighted_adapter
and a dense SVD, FFA's exactness, fedavg's recorded inexactness, heterogeneous ranks end to end
through the CLI, the weight cap, norm clipping, server optimizers and FedProx."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedkit
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.aggregate.engine import site_weights
from fedtune.aggregate.lora import refactor
from fedtune.aggregate.server import ServerOptimizer
from fedtune.config import AggregationSettings
from fedtune.errors import BadInput

ADAPTER = fedkit.ADAPTER
SITES = ["bank", "clinic", "dev"]


@pytest.fixture(scope="module")
def world3(tiny_model, tmp_path_factory):
    return fedkit.build_world(tmp_path_factory.mktemp("lora3"), tiny_model)


@pytest.fixture
def world(world3, tmp_path):
    return fedkit.clone_world(world3, tmp_path / "w")


def _layers(tensors: dict) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors})


def _site_products(parent_dir, round_dir, sites, scaling):
    """{layer: [(p_k, ΔW_k)]}: each site's whole local product s·B_k A_k in float64."""
    parent = load_file(str(parent_dir / ADAPTER))
    manifests = {s: fedkit.read_manifest(round_dir / s) for s in sites}
    total = sum(m["num_examples"] for m in manifests.values())
    out = {}
    for layer in _layers(parent):
        a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        items = []
        for site in sites:
            delta = load_file(str(round_dir / site / ADAPTER))
            rank = manifests[site]["lora"]["r"]
            a = parent[a_key][:rank].double() + delta.get(a_key, torch.zeros(1)).double()
            b = parent[b_key][:, :rank].double() + delta[b_key].double()
            items.append((manifests[site]["num_examples"] / total, scaling * b @ a))
        out[layer] = items
    return out


def _target(items) -> torch.Tensor:
    return sum(p * product for p, product in items)


def _version_products(version_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(str(version_dir / ADAPTER))
    cfg = json.loads((version_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    return {layer: scaling * tensors[f"{layer}.lora_B.weight"].double() @ tensors[f"{layer}.lora_A.weight"].double()
            for layer in _layers(tensors)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- refactoring against peft

@pytest.mark.parametrize("ranks", [(4, 4, 4), (4, 2, 3)])
def test_refactor_matches_peft_add_weighted_adapter(tiny_model, ranks):
    """svd and stack (cat) give the same products B′A′ as peft's add_weighted_adapter, ranks mixed or not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = [f"site{i}" for i in range(len(ranks))]
    model = None
    for name, rank in zip(names, ranks):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base, config, adapter_name=name) if model is None else model
        if name != names[0]:
            model.add_adapter(name, config)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for name in names:
                torch.nn.init.normal_(module.lora_A[name].weight, std=0.3)
                torch.nn.init.normal_(module.lora_B[name].weight, std=0.3)
    weights = [0.2, 0.3, 0.5]
    model.add_weighted_adapter(names, weights, "svd", combination_type="svd", svd_rank=4)
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    checked = 0
    for module in model.modules():
        if not hasattr(module, "lora_B"):
            continue
        bs = [module.lora_B[n].weight.detach() for n in names]
        as_ = [module.scaling[n] * module.lora_A[n].weight.detach() for n in names]
        w = torch.tensor(weights, dtype=torch.float64)
        for combination, rank in (("svd", 4), ("cat", None)):
            ours_b, ours_a, error = refactor(bs, as_, w, rank)
            theirs = module.get_delta_weight(combination).double()
            assert _rel(ours_b @ ours_a, theirs) < 1e-5, combination
            if combination == "cat":
                assert error == 0.0 and ours_a.shape[0] == sum(ranks)
        checked += 1
    assert checked == 4  # q_proj and v_proj of two layers


def test_refactor_error_is_the_tail_of_the_singular_values():
    generator = torch.Generator().manual_seed(1)
    bs = [torch.randn(40, 3, generator=generator) for _ in range(4)]
    as_ = [torch.randn(3, 24, generator=generator) for _ in range(4)]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    dense = sum(float(p) * b.double() @ a.double() for p, b, a in zip(w, bs, as_))
    sigma = torch.linalg.svdvals(dense)
    for rank in (1, 3, 5, 12):
        b, a, error = refactor(bs, as_, w, rank)
        tail = float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert error == pytest.approx(tail, rel=1e-6, abs=1e-12)
        assert _rel(b @ a, dense) == pytest.approx(tail, rel=1e-6, abs=1e-10)
        assert torch.allclose(a @ a.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)  # orthonormal rows of A′


# ---------------------------------------------------------------- the methods on real updates

def test_svd_version_is_the_best_rank_r_fit_and_records_its_error(world):
    result = aggregate_round(world.config, world.registry, world.round1, method="svd")
    scaling = world.config.lora.alpha / world.config.lora.r
    expected = _site_products(world.registry / "v0000", world.round1, SITES, scaling)
    got = _version_products(result.folder)
    manifest = fedkit.read_manifest(result.folder)
    assert manifest["method"] == "svd" and manifest["rank"] == world.config.lora.r
    for layer, items in expected.items():
        target = _target(items)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        r = world.config.lora.r
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert _rel(got[layer], best) < 1e-5, layer
        tail = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert manifest["reconstruction_error"]["per_layer"][layer] == pytest.approx(tail, rel=1e-4, abs=1e-7)
    errors = manifest["reconstruction_error"]
    assert errors["max"] == max(errors["per_layer"].values()) > 0


def test_stack_is_exact_grows_the_rank_and_loads_in_peft(world, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = aggregate_round(world.config, world.registry, world.round1, method="stack")
    scaling = world.config.lora.alpha / world.config.lora.r
    expected = _site_products(world.registry / "v0000", world.round1, SITES, scaling)
    got = _version_products(result.folder)
    for layer, items in expected.items():
        assert _rel(got[layer], _target(items)) < 1e-5, layer
    manifest = fedkit.read_manifest(result.folder)
    assert manifest["rank"] == 3 * world.config.lora.r
    assert manifest["reconstruction_error"]["max"] < 1e-6
    cfg = json.loads((result.folder / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] / cfg["r"] == pytest.approx(scaling)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.folder)
    module = model.base_model.model.model.layers[0].self_attn.q_proj
    layer = next(k for k in expected if k.endswith("layers.0.self_attn.q_proj"))
    assert _rel(module.get_delta_weight("default").double(), _target(expected[layer])) < 1e-5


def test_next_round_starts_from_the_stacked_versions_best_truncation(world):
    aggregate_round(world.config, world.registry, world.round1, method="stack")
    from fedtune.train import train_local

    folder = train_local(world.config, "bank", world.prepared("bank"), world.registry, world.updates)
    delta = fedkit.load_tensors(folder)
    assert all(t.shape[0 if ".lora_A." in k else 1] == world.config.lora.r for k, t in delta.items())


def test_fedavg_records_how_inexact_it_is(world):
    result = aggregate_round(world.config, world.registry, world.round1)
    scaling = world.config.lora.alpha / world.config.lora.r
    expected = _site_products(world.registry / "v0000", world.round1, SITES, scaling)
    got = _version_products(result.folder)
    per_layer = fedkit.read_manifest(result.folder)["reconstruction_error"]["per_layer"]
    for layer, items in expected.items():
        direct = _rel(got[layer], _target(items))
        assert per_layer[layer] == pytest.approx(direct, rel=1e-4)
        assert per_layer[layer] > 1e-6  # A drifted apart, so averaging factors is not the mean of products


def test_ffa_trains_b_only_and_is_exact(tiny_model, tmp_path):
    world = fedkit.build_world(tmp_path / "ffa", tiny_model, overrides={"aggregation": {"method": "ffa"}})
    for site in SITES:
        assert fedkit.read_manifest(world.round1 / site)["trained"] == "B"
        assert all(".lora_B." in k for k in fedkit.load_tensors(world.round1 / site))
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    result = aggregate_round(world.config, world.registry, world.round1)
    merged = load_file(str(result.folder / ADAPTER))
    for key in parent:
        if ".lora_A." in key:
            assert torch.equal(merged[key], parent[key])  # A stays at the seeded init
    scaling = world.config.lora.alpha / world.config.lora.r
    expected = _site_products(world.registry / "v0000", world.round1, SITES, scaling)
    got = _version_products(result.folder)
    for layer, items in expected.items():
        assert _rel(got[layer], _target(items)) < 1e-6
    assert fedkit.read_manifest(result.folder)["reconstruction_error"]["max"] < 1e-6


def test_ffa_rejects_an_update_that_trained_a(world):
    warnings: list[str] = []
    with pytest.raises(BadInput, match="0 valid update"):
        aggregate_round(world.config, world.registry, world.round1, method="ffa", warn=warnings.append)
    assert len(warnings) == 3 and all("ffa needs A frozen" in w for w in warnings)
    assert not (world.registry / "v0001").exists()


# ---------------------------------------------------------------- heterogeneous ranks

def test_mixed_ranks_end_to_end_through_the_cli(tiny_model, tmp_path, capsys):
    """bank trains rank 2 of the federation's 4: round 1 with svd (exact), round 2 with fedavg (zero-padded)."""
    from conftest import TOPICS, site_records, write_jsonl

    fed = tmp_path / "fed"
    code, _, err = run_cli(["init", fed, "--site", "clinic", "--site", "bank:2", "--site", "dev", "--model", tiny_model,
                            "--lora-r", "4", "--lora-alpha", "8", "--seq-len", "32"], capsys)
    assert code == 0, err
    config_path = fed / "federation.yaml"
    for site in TOPICS:
        raw = write_jsonl(tmp_path / "raw" / f"{site}.jsonl", site_records(site, 40))
        code, _, err = run_cli(["prepare", "--config", config_path, "--site", site, "--input", raw,
                                "--out", tmp_path / "prepared" / site], capsys)
        assert code == 0, err

    def train_round():
        for site in TOPICS:
            code, _, err = run_cli(["train-local", "--config", config_path, "--site", site, "--data",
                                    tmp_path / "prepared" / site, "--global", fed / "registry", "--out",
                                    tmp_path / "updates", "--steps", "3", "--json"], capsys)
            assert code == 0, err

    train_round()
    bank = fedkit.load_tensors(tmp_path / "updates" / "round-0001" / "bank")
    assert {t.shape[0 if ".lora_A." in k else 1] for k, t in bank.items()} == {2}
    assert fedkit.read_manifest(tmp_path / "updates" / "round-0001" / "bank")["lora"]["r"] == 2
    code, out, err = run_cli(["aggregate", "--config", config_path, "--registry", fed / "registry", "--updates",
                              tmp_path / "updates" / "round-0001", "--method", "svd", "--json"], capsys)
    assert code == 0, err
    v1 = fed / "registry" / "v0001"
    expected = _site_products(fed / "registry" / "v0000", tmp_path / "updates" / "round-0001", list(TOPICS), 2.0)
    got = _version_products(v1)
    for layer, items in expected.items():
        target = _target(items)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        assert _rel(got[layer], (u[:, :4] * s[:4]) @ vh[:4]) < 1e-5
    assert {c["site"]: c["rank"] for c in json.loads(out)["contributors"]} == {"bank": 2, "clinic": 4, "dev": 4}

    train_round()  # bank now starts from the first two (largest) components of v0001
    code, out, err = run_cli(["aggregate", "--config", config_path, "--registry", fed / "registry", "--updates",
                              tmp_path / "updates" / "round-0002", "--json"], capsys)
    assert code == 0, err
    v1_tensors, v2_tensors = fedkit.load_tensors(v1), fedkit.load_tensors(fed / "registry" / "v0002")
    deltas = {s: fedkit.load_tensors(tmp_path / "updates" / "round-0002" / s) for s in TOPICS}
    weights = {c["site"]: c["weight"] for c in json.loads(out)["contributors"]}
    for key, parent in v1_tensors.items():
        padded = []
        for site in TOPICS:
            d = deltas[site][key]
            pad = torch.zeros_like(parent)
            pad[tuple(slice(0, n) for n in d.shape)] = d
            padded.append(weights[site] * pad.double())
        assert torch.allclose(v2_tensors[key].double(), parent.double() + sum(padded), atol=1e-6), key
    assert v2_tensors[key].shape == parent.shape  # served at the federation's rank


# ---------------------------------------------------------------- weights, clipping, server optimizers

def test_weight_cap_redistributes_the_excess():
    weights = site_weights([700, 200, 100], weighted=True, cap=0.5)
    np.testing.assert_allclose(weights, [0.5, 1 / 3, 1 / 6])
    weights = site_weights([970, 10, 10, 10], weighted=True, cap=0.3)
    np.testing.assert_allclose(weights, [0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3])
    assert weights.sum() == pytest.approx(1.0)
    # A cap three sites cannot share is raised to 1/3: the weights become equal.
    np.testing.assert_allclose(site_weights([5, 1, 1], weighted=True, cap=0.2), [1 / 3] * 3)


def test_weight_cap_and_clipping_in_a_round(world):
    counts = {s: fedkit.read_manifest(world.round1 / s)["num_examples"] for s in SITES}
    fedkit.forge_update(world.round1 / "bank", num_examples=100 * sum(counts.values()))
    norms = {s: float(torch.cat([t.flatten() for t in fedkit.load_tensors(world.round1 / s).values()]).norm()) for s in SITES}
    clip = min(norms.values()) / 2
    result = aggregate_round(world.config, world.registry, world.round1, max_weight=0.4, clip_norm=clip)
    by_site = {c["site"]: c for c in result.contributors}
    assert by_site["bank"]["weight"] == pytest.approx(0.4)
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    merged = load_file(str(result.folder / ADAPTER))
    for key in parent:
        expected = parent[key].double() + sum(
            by_site[s]["weight"] * (clip / norms[s]) * fedkit.load_tensors(world.round1 / s)[key].double() for s in SITES)
        assert torch.allclose(merged[key].double(), expected, atol=1e-6)
    assert all(by_site[s]["clip_scale"] == pytest.approx(clip / norms[s], rel=1e-5) for s in SITES)
    params = fedkit.read_manifest(result.folder)["params"]
    assert params["clip_norm"] == clip and params["max_weight"] == 0.4


def test_fedavgm_with_lr_one_and_no_momentum_is_fedavg(world, tmp_path):
    other = fedkit.clone_world(world, tmp_path / "other")
    plain = aggregate_round(world.config, world.registry, world.round1)
    momentum = aggregate_round(other.config, other.registry, other.round1, server_opt="fedavgm", server_lr=1.0,
                               server_momentum=0.0)
    a, b = fedkit.load_tensors(plain.folder), fedkit.load_tensors(momentum.folder)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert (momentum.folder / "server_state.safetensors").is_file()


def _reference_server_steps(name, deltas, lr, b1, b2, tau):
    m = np.zeros_like(deltas[0])
    v = np.zeros_like(deltas[0])
    x = np.zeros_like(deltas[0])
    for d in deltas:
        if name == "fedavgm":
            m = b1 * m + d
            x = x + lr * m
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d**2
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimizer_steps_follow_reddi_et_al(name):
    settings = AggregationSettings(server_opt=name, server_lr=0.05, server_momentum=0.8, server_beta2=0.95, server_tau=1e-3)
    optimizer = ServerOptimizer.from_settings(settings)
    generator = torch.Generator().manual_seed(3)
    deltas = [torch.randn(5, 7, generator=generator) * 0.01 for _ in range(3)]
    state: dict = {}
    x = torch.zeros(5, 7)
    for d in deltas:
        x = x + optimizer.step("k", d.clone(), state)
    expected = _reference_server_steps(name, [d.numpy().astype(np.float64) for d in deltas], 0.05, 0.8, 0.95, 1e-3)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_server_state_carries_over_to_the_next_round(world):
    first = aggregate_round(world.config, world.registry, world.round1, server_opt="fedadam", server_lr=0.01)
    manifest = fedkit.read_manifest(first.folder)
    assert manifest["params"]["server_opt"] == "fedadam" and manifest["server_state_sha256"] == fedkit.sha256(
        first.folder / "server_state.safetensors")
    # Round 2: the same deltas again (re-labelled: new bytes, same values, else they would be replays), so the
    # moments after two steps are known in closed form.
    round2 = world.updates / "round-0002"
    v1_sha = manifest["adapter_sha256"]
    for site in SITES:
        fedkit.copy_update(world.round1 / site, round2 / site)
        fedkit.forge_update(round2 / site, tensors=fedkit.load_tensors(round2 / site), metadata={"round": "2"},
                            round=2, parent={"version": "v0001", "sha256": v1_sha})
    second = aggregate_round(world.config, world.registry, round2, server_opt="fedadam", server_lr=0.01)
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    weights = {c["site"]: c["weight"] for c in first.contributors}
    merged = fedkit.load_tensors(second.folder)
    for key in parent:
        delta = sum(weights[s] * fedkit.load_tensors(world.round1 / s)[key].double() for s in SITES).numpy()
        expected = parent[key].double().numpy() + _reference_server_steps("fedadam", [delta, delta], 0.01, 0.9, 0.99, 1e-3)
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_server_optimizers_refuse_refactoring_methods(world):
    with pytest.raises(BadInput, match="re-factors the adapter"):
        aggregate_round(world.config, world.registry, world.round1, method="svd", server_opt="fedadam")


# ---------------------------------------------------------------- FedProx

def test_fedprox_keeps_the_update_closer_to_the_global_version(tiny_model, tmp_path):
    from fedtune.config import load_federation
    from fedtune.train import train_local

    world = fedkit.build_world(tmp_path / "prox", tiny_model, train=False)
    plain = train_local(world.config, "clinic", world.prepared("clinic"), world.registry, tmp_path / "plain")
    text = world.config_path.read_text().replace("prox_mu: 0.0", "prox_mu: 1000.0")
    assert "prox_mu: 1000.0" in text
    world.config_path.write_text(text)
    prox = train_local(load_federation(world.config_path), "clinic", world.prepared("clinic"), world.registry,
                       tmp_path / "prox")

    def norm(folder):
        return float(torch.cat([t.flatten() for t in fedkit.load_tensors(folder).values()]).norm())

    assert norm(prox) < 0.8 * norm(plain)
