"""`train-local --num-processes 2`: one site's update trained data-parallel over two CPU processes (gloo) on the
tiny model. The processes split each batch and DDP averages their gradients, so the update is the one a single
process trains on the same batches, up to rounding; process 0 alone masks, signs and writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedkit
from conftest import run_cli, tree_digest
from fedtune.aggregate import aggregate_round
from fedtune.errors import Waiting
from fedtune.train import compute_update, train_local
from fedtune.wire.update import read_envelope

ADAPTER = fedkit.ADAPTER
# With CUDA the processes take one GPU each and compute in bf16: these tests are of the CPU (gloo) path, float32.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
# Two processes sum the same per-token losses in another order than one process: float32 rounding, amplified a
# little by Adam's normalisation over 3 steps. Measured: max |difference| 3e-8 on deltas of size 3e-2.
ATOL = 1e-5


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """clinic, bank and dev with key pairs on the roster (updates must be signed), nothing trained yet."""
    return fedkit.build_world(tmp_path_factory.mktemp("dp"), tiny_model, train=False, keys=True)


def _key(world, site: str) -> Path:
    return world.root / "keys" / f"{site}.key"


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def _max_difference(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max(float((one[k] - two[k]).abs().max()) for k in one)


def test_two_processes_write_one_signed_update_the_coordinator_accepts(world, tmp_path):
    copy = fedkit.clone_world(world, tmp_path / "w")
    done = _cli("train-local", "--config", copy.config_path, "--site", "clinic", "--key", _key(copy, "clinic"),
                "--data", copy.prepared("clinic"), "--global", copy.registry, "--out", copy.updates,
                "--num-processes", "2", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)  # one JSON document: the other process printed nothing
    update = copy.round1 / "clinic"
    assert printed["update"] == str(update) and printed["signed"] is True
    assert sorted(p.name for p in copy.round1.iterdir()) == ["clinic"]  # no second or temporary folder
    assert sorted(p.name for p in update.iterdir()) == ["adapter_config.json", ADAPTER, "manifest.json",
                                                       "manifest.sig"]
    envelope = read_envelope(update)  # the update schema accepts it
    public = copy.config.site_key("clinic")
    assert envelope.signed_by(public)
    train = envelope.signed["train"]
    assert (train["steps"], train["batch_size"]) == (3, 4)  # batch_size: sequences per step over both processes
    assert train["processes"] == 2
    # Progress lines come from process 0 only.
    steps = [line for line in done.stderr.splitlines() if "step 3/3" in line]
    assert len(steps) == 1, done.stderr

    for site in ("bank", "dev"):
        train_local(copy.config, site, copy.prepared(site), copy.registry, copy.updates, key=_key(copy, site))
    result = aggregate_round(copy.config, copy.registry, copy.round1, strict=True)
    manifest = fedkit.read_manifest(result.folder)
    assert manifest["version"] == "v0001" and manifest["rejected"] == []
    assert sorted(c["site"] for c in manifest["contributors"]) == ["bank", "clinic", "dev"]


def test_two_processes_train_what_one_process_trains_on_the_same_batches(world, tmp_path):
    one = train_local(world.config, "dev", world.prepared("dev"), world.registry, tmp_path / "one",
                      key=_key(world, "dev"))
    two = train_local(world.config, "dev", world.prepared("dev"), world.registry, tmp_path / "two",
                      key=_key(world, "dev"), num_processes=2)
    # The same group of two started by torchrun (as accelerate launch does on GPUs): train-local finds it from the
    # environment the launcher sets, and process 1 writes and prints nothing.
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fedtune.cli",
         "train-local", "--config", world.config_path, "--site", "dev", "--key", _key(world, "dev"), "--data",
         world.prepared("dev"), "--global", world.registry, "--out", tmp_path / "again"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert launched.returncode == 0, launched.stderr
    assert len(launched.stdout.strip().splitlines()) == 1 and launched.stdout.startswith("wrote ")
    assert sum("step 3/3" in line for line in launched.stderr.splitlines()) == 1
    again = tmp_path / "again" / "round-0001" / "dev"
    d1, d2, d3 = (load_file(str(folder / ADAPTER)) for folder in (one, two, again))

    assert _max_difference(d1, d2) < ATOL
    m1, m2 = fedkit.read_manifest(one), fedkit.read_manifest(two)
    assert "processes" not in m1["train"] and m2["train"]["processes"] == 2
    assert m2["train"]["loss_first"] == pytest.approx(m1["train"]["loss_first"], rel=1e-5)
    assert m2["train"]["loss_last"] == pytest.approx(m1["train"]["loss_last"], rel=1e-5)
    # A rerun of the same two-process training, however launched, is identical to the bit.
    assert all(torch.equal(d2[k], d3[k]) for k in d2)
    assert fedkit.read_manifest(again)["train"]["processes"] == 2

    # The tolerance means something: one process training on batches half the size lands far away, as two
    # processes would if each trained on its own half without averaging, or both on the same half.
    half = train_local(world.config, "dev", world.prepared("dev"), world.registry, tmp_path / "half",
                       key=_key(world, "dev"), batch_size=2)
    assert _max_difference(d1, load_file(str(half / ADAPTER))) > 100 * ATOL


def test_secure_aggregation_masks_once_the_delta_of_the_group(tiny_model, tmp_path):
    """clinic trains over two processes and masks; the unmasked sum is the FedAvg of the plain deltas, clinic's as
    one process trains it: process 0 masked the group's delta, once."""
    from fedtune.privacy.secagg_site import answer_unmask, site_weight

    clip = 0.5
    world = fedkit.build_world(tmp_path / "secure", tiny_model, train=False, keys=True,
                               overrides={"privacy": {"secure_aggregation": True}, "aggregation": {"clip_norm": clip}})
    sites = ("bank", "clinic", "dev")
    for site in sites:
        train_local(world.config, site, world.prepared(site), world.registry, world.updates, key=_key(world, site),
                    num_processes=2 if site == "clinic" else 1)
    assert sorted(p.name for p in world.round1.iterdir()) == list(sites)
    assert read_envelope(world.round1 / "clinic").signed["secagg"]["participants"] == list(sites)
    with pytest.raises(Waiting):
        aggregate_round(world.config, world.registry, world.round1)
    for site in sites:
        answer_unmask(world.config, site, _key(world, site), world.round1)
    result = aggregate_round(world.config, world.registry, world.round1)

    # The plain deltas, trained from v0000 as the round was (the registry's LATEST is now v0001).
    plain = {site: compute_update(world.config, site, world.prepared(site), world.registry / "v0000")
             for site in sites}
    parent = load_file(str(world.registry / "v0000" / ADAPTER))
    total, weights = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in parent.items()}, 0.0
    for update in plain.values():
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.tensors.values())))
        weight = site_weight(world.config, update.fields["num_examples"], update.fields["num_tokens"])
        weights += weight
        for key, tensor in update.tensors.items():
            total[key] += weight * min(1.0, clip / norm) * tensor.double()
    got = load_file(str(result.folder / ADAPTER))
    step = 2.0 ** -fedkit.read_manifest(result.folder)["secure_aggregation"]["scale_bits"]
    assert max(float((got[k].double() - parent[k].double() - total[k] / weights).abs().max())
               for k in parent) < ATOL + len(sites) * step / weights


def test_a_failure_inside_the_processes_is_one_line_and_leaves_nothing(world, tmp_path, capsys):
    # The data card is read inside each process (after the parent's checks): bank's data for clinic is refused there.
    copy = fedkit.clone_world(world, tmp_path / "w")
    code, out, err = run_cli(["train-local", "--config", copy.config_path, "--site", "clinic", "--key",
                              _key(copy, "clinic"), "--data", copy.prepared("bank"), "--global", copy.registry,
                              "--out", copy.updates, "--num-processes", "2"], capsys)
    assert code == 2 and out == "", err
    assert err.strip().splitlines() == [f"error: {copy.prepared('bank') / 'data_card.json'}: prepared for site "
                                        "'bank', not 'clinic'"]
    assert not copy.updates.exists()


def test_combinations_that_cannot_work_are_refused_before_any_process_starts(world, tmp_path, capsys):
    copy = fedkit.clone_world(world, tmp_path / "w")
    before = tree_digest(copy.root)
    base = ["train-local", "--config", copy.config_path, "--site", "clinic", "--key", _key(copy, "clinic"),
            "--data", copy.prepared("clinic"), "--global", copy.registry, "--out", copy.updates]
    code, _, err = run_cli([*base, "--num-processes", "2", "--batch-size", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: train-local --num-processes 2: the processes split each step's batch "
                          "(--batch-size, else training.batch_size: 1), so it needs at least 2 sequences; give "
                          "--batch-size 2 or more, or fewer processes")
    assert tree_digest(copy.root) == before


def test_local_dp_is_refused_with_several_processes(tiny_model, tmp_path):
    from fedtune.errors import BadInput

    privacy = {"mode": "local", "local": {"noise_multiplier": 1.0, "example_clip_norm": 0.5, "target_epsilon": 40.0}}
    local = fedkit.build_world(tmp_path / "local", tiny_model, train=False, keys=True, overrides={"privacy": privacy})
    before = tree_digest(local.root)
    with pytest.raises(BadInput, match=r"--num-processes 2: privacy.mode local clips and noises each record's own "
                                       r"gradient \(Opacus\), which fedtune runs in one process only; give "
                                       r"--num-processes 1"):
        train_local(local.config, "clinic", local.prepared("clinic"), local.registry, local.updates,
                    key=_key(local, "clinic"), num_processes=2)
    assert tree_digest(local.root) == before  # no ledger entry, no update


def test_a_launched_group_of_another_size_is_refused(world, tmp_path, monkeypatch):
    # What `torchrun --nproc-per-node 3 … --num-processes 2` would give each process.
    from fedtune.errors import BadInput

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BadInput, match=r"--num-processes 2: this is one of 3 processes a launcher started"):
        train_local(world.config, "clinic", world.prepared("clinic"), world.registry, tmp_path / "u",
                    key=_key(world, "clinic"), num_processes=2)
    assert not (tmp_path / "u").exists()


def test_accumulation_warmup_and_fedprox_split_the_same_way(tiny_model, tmp_path):
    """Two micro-batches per step, a learning-rate warm-up and FedProx's proximal term: the schedule steps once per
    optimizer step (not once per process) and the proximal gradient is counted once, so two processes still train
    what one does."""
    world = fedkit.build_world(tmp_path / "w", tiny_model, train=False,
                               overrides={"training": {"steps": 4, "batch_size": 4, "lr": 0.01, "grad_accum": 2,
                                                       "warmup_steps": 2, "prox_mu": 0.1}})
    one = train_local(world.config, "bank", world.prepared("bank"), world.registry, tmp_path / "one")
    two = train_local(world.config, "bank", world.prepared("bank"), world.registry, tmp_path / "two", num_processes=2)
    assert _max_difference(load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))) < ATOL
