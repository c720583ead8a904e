"""Secure aggregation over files: masked updates, the unmask request and the sites' answers, dropouts at both
stages, and what a dishonest coordinator or a tampered file can and cannot do."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from scipy import stats

import fedkit
from conftest import run_cli
from fedtune.aggregate import aggregate_round
from fedtune.errors import BadInput, Waiting
from fedtune.privacy.secagg import WEIGHT_KEY, combine_seed, keystream, pair_seed, round_plan
from fedtune.privacy.secagg_site import answer_unmask, mask_update, site_weight
from fedtune.train import compute_update
from fedtune.wire import SigningKey
from fedtune.wire.secagg import REQUEST_FILE, document_sha256, response_path, write_request
from fedtune.wire.tensors import pad_rank
from fedtune.wire.update import read_envelope, write_update

ADAPTER = "adapter_model.safetensors"
EXTRA = {"lab": ("clinic", 40), "shop": ("bank", 48)}
SITES = ("bank", "clinic", "dev", "lab", "shop")
CLIP = 0.5


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """Five sites with key pairs, secure aggregation on (t = 3), nothing trained yet."""
    return fedkit.build_world(tmp_path_factory.mktemp("secure"), tiny_model, extra_sites=EXTRA, train=False,
                              keys=True, overrides={"privacy": {"secure_aggregation": True},
                                                    "aggregation": {"clip_norm": CLIP}})


@pytest.fixture(scope="module")
def computed(world):
    """Each site's round-1 update in memory (its plain delta), trained once for every scenario."""
    return {site: compute_update(world.config, site, world.prepared(site), world.registry) for site in SITES}


def _key(world, site) -> SigningKey:
    return SigningKey.load(world.root / "keys" / f"{site}.key")


def _parent(world) -> dict:
    return fedkit.read_manifest(world.registry / "v0000")


def _send(world, computed, sites):
    """Mask and write the updates of `sites` (what train-local does after training)."""
    for site in sites:
        update = computed[site]
        files = mask_update(world.config, _key(world, site), _parent(world), site,
                            {k: v.clone() for k, v in update.tensors.items()}, update.fields, update.adapter_config)
        write_update(world.updates / "round-0001" / site, files)


def _answer(world, sites):
    for site in sites:
        answer_unmask(world.config, site, world.root / "keys" / f"{site}.key", world.round1)


def _expected(world, computed, sites) -> dict[str, torch.Tensor]:
    """Plain weighted FedAvg of the same clipped deltas: parent + Σ ω_k clip(δ_k) / Σ ω_k."""
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    total, weights = {}, 0.0
    for site in sites:
        update = computed[site]
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.tensors.values())))
        scale = min(1.0, CLIP / norm)
        weight = site_weight(world.config, update.fields["num_examples"], update.fields["num_tokens"])
        weights += weight
        for key, tensor in update.tensors.items():
            total[key] = total.get(key, 0) + weight * scale * pad_rank(tensor.double(), key, world.config.lora.r)
    return {k: parent[k].double() + total.get(k, 0) / weights for k in parent}


def _version_tensors(world, version="v0001"):
    return {k: v.double() for k, v in load_file(str(world.registry / version / ADAPTER)).items()}


def _run(world, computed, tmp_path, send, answer):
    """A fresh copy of the federation; `send` sites mask and send, aggregate asks, `answer` sites answer."""
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, send)
    with pytest.raises(Waiting, match="waiting for unmask answers"):
        aggregate_round(copy.config, copy.registry, copy.round1)
    _answer(copy, answer)
    return copy, aggregate_round(copy.config, copy.registry, copy.round1)


def test_unmasked_sum_is_the_weighted_fedavg_of_the_clipped_updates(world, computed, tmp_path):
    copy, result = _run(world, computed, tmp_path, SITES, SITES)
    got, want = _version_tensors(copy), _expected(copy, computed, SITES)
    step = 2.0 ** -result.secure_aggregation["scale_bits"]
    weights = result.secure_aggregation["weight_total"]
    for key in want:
        # each site's value is rounded once: the mean is off by at most n·step/2 over Σω
        assert torch.allclose(got[key], want[key], rtol=0, atol=len(SITES) * step / weights + 1e-7), key
    manifest = fedkit.read_manifest(result.folder)
    assert result.rejected == [] and manifest["rejected"] == []  # the answers' folder is not an update
    record = manifest["secure_aggregation"]
    assert record["survivors"] == sorted(SITES) and record["dropped"] == [] and record["threshold"] == 3
    assert record["modulus_bits"] == 64  # count-weighted: ω = n/10⁶ needs 20 more fractional bits than 32 hold
    # the coordinator saw no site's weight, size or norm, and no loss left a site
    for contributor in manifest["contributors"]:
        assert contributor["weight"] is None and contributor["norm"] is None and contributor["num_examples"] is None
    for site in SITES:
        sent = read_envelope(copy.round1 / site).signed
        assert sent["num_examples"] is None and sent["train"]["loss_first"] is None


@pytest.mark.parametrize("dropped", [("dev",), ("dev", "shop")])
def test_sites_that_drop_before_sending_are_unmasked_away(world, computed, tmp_path, dropped):
    survivors = [s for s in SITES if s not in dropped]
    copy, result = _run(world, computed, tmp_path, survivors, survivors)
    got, want = _version_tensors(copy), _expected(copy, computed, survivors)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    assert result.secure_aggregation["dropped"] == sorted(dropped)
    answer = json.loads(response_path(copy.round1, survivors[0]).read_text())["document"]
    assert sorted(answer["pairwise_seeds"]) == sorted(dropped)  # seeds with the dropped ones only
    assert not set(answer["self_mask_shares"]) & set(dropped)  # never a dropped site's self-mask share


@pytest.mark.parametrize("silent", [("bank",), ("bank", "lab")])
def test_sites_that_drop_before_unmasking_are_rebuilt_from_shares(world, computed, tmp_path, silent):
    copy, result = _run(world, computed, tmp_path, SITES, [s for s in SITES if s not in silent])
    got, want = _version_tensors(copy), _expected(copy, computed, SITES)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    assert result.secure_aggregation["unanswered"] == sorted(silent)


def test_a_masked_update_alone_looks_uniform_and_uncorrelated(world, computed, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    masked = load_numpy(str(copy.round1 / "clinic" / ADAPTER))
    words = np.concatenate([masked[k].reshape(-1) for k in sorted(masked) if k != WEIGHT_KEY])
    # chi-square over the top byte of every word: uniform integers fill the 256 bins evenly
    counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    # against the true delta, the masked integers (as signed values) show no correlation
    delta = torch.cat([pad_rank(computed["clinic"].tensors[k], k, 4).reshape(-1) for k in sorted(computed["clinic"].tensors)])
    signed = words.view(np.int64).astype(np.float64)
    r = np.corrcoef(signed, delta.double().numpy())[0, 1]
    assert abs(r) < 5 / np.sqrt(len(words))
    # the control: the same test on the unmasked fixed-point values does see the delta
    plan = round_plan(copy.config, _parent(copy))
    plain = plan.encoding.encode(delta.double().numpy()).view(np.int64).astype(np.float64)
    assert np.corrcoef(plain, delta.double().numpy())[0, 1] > 0.99


def test_fewer_than_t_answers_wait_and_write_nothing(world, computed, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    with pytest.raises(Waiting):
        aggregate_round(copy.config, copy.registry, copy.round1)
    _answer(copy, ["bank", "clinic"])  # t = 3
    before = sorted(p.name for p in copy.registry.iterdir())
    with pytest.raises(Waiting, match="2 of the 3 unmask answers"):
        aggregate_round(copy.config, copy.registry, copy.round1)
    assert sorted(p.name for p in copy.registry.iterdir()) == before
    assert (copy.registry / "LATEST").read_text().strip() == "v0000"


def test_when_a_site_dropped_every_sender_must_answer(world, computed, tmp_path):
    """Only a survivor (and the dropped site) knows their pairwise seed: the round waits for every sender."""
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, ["bank", "clinic", "dev", "lab"])
    with pytest.raises(Waiting):
        aggregate_round(copy.config, copy.registry, copy.round1)
    _answer(copy, ["bank", "clinic", "dev"])
    with pytest.raises(Waiting, match="waiting for lab"):
        aggregate_round(copy.config, copy.registry, copy.round1)
    _answer(copy, ["lab"])
    assert aggregate_round(copy.config, copy.registry, copy.round1).version == "v0001"


def test_a_coordinator_that_lies_about_a_dropout_cannot_unmask_the_late_update(world, computed, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    coordinator = SigningKey.load(copy.fed / "coordinator.key")
    parent = _parent(copy)
    survivors = [s for s in SITES if s != "dev"]

    def request(alive, dropped):
        return {"format": "fedtune.unmask-request/1", "federation": copy.config.name, "round": 1,
                "parent": {"version": "v0000", "sha256": parent["adapter_sha256"]}, "participants": list(SITES),
                "survivors": [{"site": s, "manifest_sha256": document_sha256(read_envelope(copy.round1 / s).signed),
                               "nonce": read_envelope(copy.round1 / s).manifest.nonce} for s in alive],
                "dropped": dropped, "threshold": 3, "created": "2026-01-01T00:00:00+00:00"}

    # dev's update is there, but the coordinator says it dropped: the others reveal their pairwise seeds with dev
    write_request(copy.round1, request(survivors, ["dev"]), coordinator)
    _answer(copy, survivors)
    result = aggregate_round(copy.config, copy.registry, copy.round1)
    assert any(r["site"] == "dev" and "arrived after the unmask request" in r["reason"] for r in result.rejected)
    # everything it now holds about dev: the masked update and every pairwise seed with it
    answers = {s: json.loads(response_path(copy.round1, s).read_text())["document"] for s in survivors}
    masked = load_numpy(str(copy.round1 / "dev" / ADAPTER))
    keys = sorted(k for k in masked if k != WEIGHT_KEY) + [WEIGHT_KEY]
    words = np.concatenate([masked[k].reshape(-1) for k in keys])
    for site, answer in answers.items():
        stream = keystream(bytes.fromhex(answer["pairwise_seeds"]["dev"]), len(words), 64)
        words = words - stream if "dev" < site else words + stream
    plan = round_plan(copy.config, parent)
    delta = torch.cat([pad_rank(computed["dev"].tensors[k], k, 4).reshape(-1) for k in sorted(computed["dev"].tensors)])
    left = words[:-1].view(np.int64).astype(np.float64)
    assert abs(np.corrcoef(left, delta.double().numpy())[0, 1]) < 5 / np.sqrt(len(left))  # dev's self-mask remains
    # with the seeds right, the only thing left is dev's self-mask: removing the right one would give the delta
    # back — and a second request calling dev a survivor (to collect its self-mask's shares) is refused
    (copy.round1 / REQUEST_FILE).unlink()
    shutil.rmtree(copy.round1 / "_answers")
    write_request(copy.round1, request(SITES, []), coordinator)
    for site in survivors:
        with pytest.raises(BadInput, match="already answered another unmask request"):
            answer_unmask(copy.config, site, copy.root / "keys" / f"{site}.key", copy.round1)
    # dev itself, told it survived, answers — with one share of its own seed, never the seed: t = 3 are needed
    answer_unmask(copy.config, "dev", copy.root / "keys" / "dev.key", copy.round1)
    own = json.loads(response_path(copy.round1, "dev").read_text())["document"]
    assert set(own) == {"format", "federation", "round", "site", "request_sha256", "self_mask_shares",
                        "pairwise_seeds", "created"}
    commitment = read_envelope(copy.round1 / "dev").signed["secagg"]["self_mask_commitment"]
    assert combine_seed([bytes.fromhex(own["self_mask_shares"]["dev"])], 1, commitment) is None
    assert plan.encoding.modulus_bits == 64


def test_tampered_answers_and_shares_are_refused(world, computed, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    with pytest.raises(Waiting):
        aggregate_round(copy.config, copy.registry, copy.round1)
    _answer(copy, ["bank", "clinic", "dev"])
    # a share edited in an answer (the signature no longer covers it)
    path = response_path(copy.round1, "dev")
    answer = json.loads(path.read_text())
    share = answer["document"]["self_mask_shares"]["lab"]
    answer["document"]["self_mask_shares"]["lab"] = share[:-1] + ("0" if share[-1] != "0" else "1")
    path.write_text(json.dumps(answer))
    warnings = []
    with pytest.raises(Waiting, match="2 of the 3"):
        aggregate_round(copy.config, copy.registry, copy.round1, warn=warnings.append)
    assert any("dev.json" in w and "signature" in w for w in warnings)
    # an update's sealed shares altered after signing: the site holding one cannot use it, the sha256 says why
    shares = copy.round1 / "shop" / "secagg_shares.json"
    shares.write_text(shares.read_text().replace('"round": 1', '"round": 1 '))
    _answer(copy, ["lab"])
    answer = json.loads(response_path(copy.round1, "lab").read_text())["document"]
    assert "shop" not in answer["self_mask_shares"]
    # and the coordinator will not unmask a round whose survivor's shares changed after the request
    with pytest.raises(BadInput, match="survivor shop.*secagg_shares.json: does not match"):
        aggregate_round(copy.config, copy.registry, copy.round1)
    assert (copy.registry / "LATEST").read_text().strip() == "v0000"


def test_an_update_with_altered_shares_is_left_out_before_the_request(world, computed, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    shares = copy.round1 / "lab" / "secagg_shares.json"
    document = json.loads(shares.read_text())
    del document["shares"]["bank"]
    shares.write_text(json.dumps(document))
    warnings = []
    with pytest.raises(Waiting):
        aggregate_round(copy.config, copy.registry, copy.round1, warn=warnings.append)
    assert any("lab" in w and "secagg_shares.json" in w for w in warnings)
    assert json.loads((copy.round1 / REQUEST_FILE).read_text())["document"]["dropped"] == ["lab"]


def test_distributed_dp_noise_survives_in_the_released_sum(world, computed, tmp_path):
    """Each site adds N(0, (zC)²/m); the released mean of n sites carries std zC/n — nobody saw less noise."""
    z, clip = 200.0, 1e-4
    copy = fedkit.clone_world(world, tmp_path / "w")
    text = (copy.fed / "federation.yaml").read_text()
    data = __import__("yaml").safe_load(text)
    data["privacy"].update({"mode": "distributed", "clip_norm": clip, "noise_multiplier": z})
    data["aggregation"]["quorum"] = 5
    (copy.fed / "federation.yaml").write_text(__import__("yaml").safe_dump(data))
    from fedtune.config import load_federation
    from fedtune.privacy.dp_fedavg import privatize_update

    config = load_federation(copy.fed / "federation.yaml")
    copy.config = config
    for site in SITES:
        update = computed[site]
        delta = {k: v.clone() for k, v in update.tensors.items()}
        fields = {**update.fields, "privacy": privatize_update(config, delta)}
        write_update(copy.round1 / site, mask_update(config, _key(copy, site), _parent(copy), site, delta, fields,
                                                     update.adapter_config))
    with pytest.raises(Waiting):
        aggregate_round(config, copy.registry, copy.round1)
    _answer(copy, SITES)
    result = aggregate_round(config, copy.registry, copy.round1)
    parent = load_file(str(copy.registry / "v0000" / ADAPTER))
    got = load_file(str(result.folder / ADAPTER))
    noise = torch.cat([(got[k].double() - parent[k].double()).reshape(-1) for k in got])
    # 896 coordinates: the std's relative standard error is 1/√(2·896) ≈ 2.4 %, so 12 % is five of them — and a
    # release that carried only one site's share of the noise (std ÷ √5) would be 55 % short
    assert abs(float(noise.std()) / (z * clip / 5) - 1) < 0.12
    assert noise.numel() == 896
    assert result.secure_aggregation["modulus_bits"] == 32  # fixed weights: 32-bit words suffice


def test_cli_round_waits_then_completes(world, computed, tmp_path, capsys):
    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, SITES)
    cfg = str(copy.fed / "federation.yaml")
    aggregate = ["aggregate", "--config", cfg, "--registry", copy.registry, "--updates", copy.round1]
    code, stdout, _ = run_cli(aggregate, capsys)
    assert code == 3 and stdout.startswith("waiting: ") and "fedtune unmask" in stdout
    code, stdout, _ = run_cli(["status", "--registry", copy.registry, "--updates", copy.updates, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["unmask"]["not_answered"] == sorted(SITES)
    for site in SITES[:3]:
        code, stdout, stderr = run_cli(["unmask", "--config", cfg, "--site", site, "--key",
                                        copy.root / "keys" / f"{site}.key", "--round", copy.round1], capsys)
        assert code == 0, stderr
        assert "answer for round 1" in stdout
    code, stdout, stderr = run_cli([*aggregate, "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["secure_aggregation"]["unanswered"] == ["lab", "shop"]
    code, stdout, stderr = run_cli(["verify", "--registry", copy.registry, "--updates", copy.updates], capsys)
    assert code == 0, stdout + stderr
    code, stdout, stderr = run_cli(["log", "--registry", copy.registry], capsys)
    assert code == 0, stderr
    assert "v0001" in stdout
    code, stdout, stderr = run_cli(["log", "--registry", copy.registry, "--json"], capsys)
    rows = json.loads(stdout)
    rows = rows["entries"]
    assert rows[-1]["secure_aggregation"]["survivors"] == sorted(SITES)
    # the request the version was unmasked with is part of the audit trail: an edited one fails verify
    request = copy.round1 / REQUEST_FILE
    request.write_text(request.read_text().replace('"threshold": 3', '"threshold": 4'))
    code, stdout, stderr = run_cli(["verify", "--registry", copy.registry, "--updates", copy.updates], capsys)
    assert code == 1 and "unmask_request.json" in stdout + stderr and "signature" in stdout + stderr


def test_an_unmasked_update_is_rejected_under_secure_aggregation(world, computed, tmp_path):
    from fedtune.wire.update import encode_update

    copy = fedkit.clone_world(world, tmp_path / "w")
    _send(copy, computed, ["bank", "clinic", "dev"])
    plain = computed["lab"]
    write_update(copy.round1 / "lab", encode_update(plain.tensors, plain.fields, plain.adapter_config,
                                                    _key(copy, "lab")))
    warnings = []
    with pytest.raises(Waiting):
        aggregate_round(copy.config, copy.registry, copy.round1, warn=warnings.append)
    assert any("lab" in w and "not masked" in w for w in warnings)
    request = json.loads((copy.round1 / REQUEST_FILE).read_text())["document"]
    assert request["dropped"] == ["lab", "shop"]


def test_pairwise_seeds_differ_per_round_and_pair(world):
    parent = _parent(world)
    plan = round_plan(world.config, parent)
    bank, clinic = _key(world, "bank"), _key(world, "clinic")
    exchange = {s.name: s.exchange_key for s in world.config.sites}
    seed = pair_seed(bank, "bank", "clinic", exchange["clinic"], plan.ctx)
    assert seed == pair_seed(clinic, "clinic", "bank", exchange["bank"], plan.ctx)  # both ends agree
    assert seed != pair_seed(bank, "bank", "dev", exchange["dev"], plan.ctx)
    later = round_plan(world.config, {**parent, "round": 1, "version": "v0001"})
    assert seed != pair_seed(bank, "bank", "clinic", exchange["clinic"], later.ctx)
