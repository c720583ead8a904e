"""The trust commands as a coordinator and its sites use them: keys, a roster with keys, signed rounds, the
registry's log, `fedtune verify` against every kind of tampering (and every state an interrupted command
leaves), rollback, and roster changes — each through the real command line on the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import TOPICS, site_records, write_jsonl
from fedkit import run_fedtune as fedtune
from fedtune.config import load_federation
from fedtune.registry import Registry, coordinator_signer
from fedtune.wire.codec import canonical_json, pretty_json
from fedtune.wire.keys import SigningKey

SITES = list(TOPICS)  # clinic, bank, dev
TRAIN = ["--steps", "3", "--batch-size", "4", "--lr", "0.01"]


def signing_line(pub: Path) -> str:
    """The Ed25519 line of a NAME.pub (its first; the second is the X25519 exchange key)."""
    return pub.read_text().splitlines()[0]


def ok(*args) -> str:
    code, out, err = fedtune(*args)
    assert code == 0, err
    return out


def one_error(result: tuple[int, str, str], code: int) -> str:
    """The single `error: …` line of a command that failed with `code`."""
    got, out, err = result
    assert got == code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@dataclass
class Fed:
    """A federation driven through the CLI: coordinator folder, site keys, prepared data, updates."""

    root: Path
    init_output: str = ""

    @property
    def fed(self) -> Path:
        return self.root / "fed"

    @property
    def config(self) -> Path:
        return self.fed / "federation.yaml"

    @property
    def registry(self) -> Path:
        return self.fed / "registry"

    @property
    def updates(self) -> Path:
        return self.root / "updates"

    def key(self, site: str) -> Path:
        return self.root / "keys" / f"{site}.key"

    def pub(self, site: str) -> Path:
        return self.root / "keys" / f"{site}.pub"

    def prepared(self, site: str) -> Path:
        return self.root / "prepared" / site

    def log_lines(self) -> list[bytes]:
        return (self.registry / "log.jsonl").read_bytes().splitlines(keepends=True)

    def clone(self, dest: Path) -> Fed:
        shutil.copytree(self.root, dest, symlinks=True)
        return Fed(dest, self.init_output)

    # the stages, as each party runs them
    def prepare(self, site: str, topic: str | None = None) -> None:
        raw = write_jsonl(self.root / "raw" / f"{site}.jsonl", site_records(topic or site))
        ok("prepare", "--config", self.config, "--site", site, "--input", raw, "--out", self.prepared(site))

    def train(self, site: str, *extra) -> None:
        ok("train-local", "--config", self.config, "--site", site, "--data", self.prepared(site), "--global",
           self.registry, "--out", self.updates, "--key", self.key(site), *TRAIN, *extra)

    def aggregate(self, number: int, *extra) -> str:
        return ok("aggregate", "--config", self.config, "--registry", self.registry, "--updates",
                  self.updates / f"round-{number:04d}", *extra)

    def verify(self, *extra) -> tuple[int, str, str]:
        return fedtune("verify", "--registry", self.registry, *extra)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Fed:
    """keys new for each site, init with their public keys on the roster, prepare, and round 1 trained and signed
    (not yet aggregated)."""
    world = Fed(tmp_path_factory.mktemp("trust") / "w")
    for site in SITES:
        ok("keys", "new", "--out", world.root / "keys", "--name", site)
    keys = [arg for site in SITES for arg in ("--site", site, "--site-key", f"{site}={world.pub(site)}")]
    world.init_output = ok("init", world.fed, *keys, "--model", tiny_model, "--lora-r", "4", "--lora-alpha", "8",
                           "--target-modules", "q_proj,v_proj", "--seq-len", "32")
    for site in SITES:
        world.prepare(site)
        world.train(site)
    return world


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Fed:
    """The trained federation with round 1 merged into v0001."""
    world = trained.clone(tmp_path_factory.mktemp("trust-merged") / "w")
    world.aggregate(1)
    return world


@pytest.fixture(scope="module")
def audited(merged, tmp_path_factory) -> Fed:
    """v0001, then a roster change (eve joins) and a rollback to v0000 as v0002: a log of four signed lines."""
    world = merged.clone(tmp_path_factory.mktemp("trust-audited") / "w")
    ok("keys", "new", "--out", world.root / "keys", "--name", "eve")
    ok("roster", "add", "--config", world.config, "--site", "eve", "--key", world.pub("eve"))
    ok("rollback", "--registry", world.registry, "--to", "v0000", "--reason", "v0001 drifted on clinic")
    return world


@pytest.fixture
def fresh(trained, tmp_path) -> Fed:
    return trained.clone(tmp_path / "w")


@pytest.fixture
def world(merged, tmp_path) -> Fed:
    return merged.clone(tmp_path / "w")


@pytest.fixture
def audit(audited, tmp_path) -> Fed:
    return audited.clone(tmp_path / "w")


# --- keys and init -------------------------------------------------------------------------------------


def test_keys_new_writes_a_private_and_a_public_key(tmp_path):
    out = ok("keys", "new", "--out", tmp_path / "keys", "--name", "clinic")
    private, public = tmp_path / "keys" / "clinic.key", tmp_path / "keys" / "clinic.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    line, exchange = public.read_text().splitlines()
    loaded = SigningKey.load(private)
    assert (loaded.public, loaded.exchange_public) == (line, exchange)
    assert line.startswith("ed25519:") and exchange.startswith("x25519:")
    assert f"wrote {private}" in out and str(public) in out
    assert out.strip().endswith(f"clinic.pub: {line}\nclinic.pub: {exchange}")

    record = json.loads(ok("keys", "new", "--out", tmp_path / "keys", "--name", "bank", "--json"))
    assert record == {"private": str(tmp_path / "keys" / "bank.key"), "public": str(tmp_path / "keys" / "bank.pub"),
                      "key": signing_line(tmp_path / "keys" / "bank.pub"),
                      "exchange_key": (tmp_path / "keys" / "bank.pub").read_text().splitlines()[1]}


def test_keys_new_never_overwrites_a_key(tmp_path):
    ok("keys", "new", "--out", tmp_path, "--name", "clinic")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    line = one_error(fedtune("keys", "new", "--out", tmp_path, "--name", "clinic"), 2)
    assert "clinic.key: already exists" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "--name ../evil" in one_error(fedtune("keys", "new", "--out", tmp_path, "--name", "../evil"), 2)
    assert not (tmp_path.parent / "evil.key").exists()


def test_init_puts_the_site_keys_on_the_roster_and_names_the_coordinator_key(trained):
    out = trained.init_output
    assert f"wrote {trained.fed / 'coordinator.key'}" in out and "keep it private, beside the registry" in out
    assert str(trained.fed / "coordinator.pub") in out
    roster = yaml.safe_load(trained.config.read_text())
    assert {s["name"]: [s["key"], s["exchange_key"]] for s in roster["sites"]} == {
        s: trained.pub(s).read_text().splitlines() for s in SITES}
    assert roster["coordinator_key"] == signing_line(trained.fed / "coordinator.pub")
    listed = json.loads(ok("roster", "list", "--config", trained.config, "--json"))
    assert listed["signatures_required"] is True
    assert [(s["name"], s["lora_r"], [s["key"], s["exchange_key"]]) for s in listed["sites"]] == [
        (s, 4, trained.pub(s).read_text().splitlines()) for s in SITES]


@pytest.mark.parametrize("site_key,problem", [
    ("mallory={pub}", "--site-key mallory={pub}: no --site mallory on the roster (clinic, bank)"),
    ("clinic", "--site-key clinic: give NAME=PATH.pub"),
    ("clinic={tmp}/missing.pub", "missing.pub: public key file not found"),
    ("clinic={tmp}/clinic.key", "clinic.key: not a fedtune public key"),
])
def test_init_refuses_a_bad_site_key(tmp_path, tiny_model, site_key, problem):
    ok("keys", "new", "--out", tmp_path, "--name", "clinic")
    fill = {"pub": tmp_path / "clinic.pub", "tmp": tmp_path}
    line = one_error(fedtune("init", tmp_path / "fed", "--site", "clinic", "--site", "bank", "--site-key",
                             site_key.format(**fill), "--model", tiny_model), 2)
    assert problem.format(**fill) in line
    assert not (tmp_path / "fed").exists()


def test_init_puts_exchange_keys_on_the_roster_where_the_pub_has_one(tmp_path, tiny_model):
    """A .pub from before key agreement (one line) still puts its site on the roster, without an exchange key."""
    ok("keys", "new", "--out", tmp_path, "--name", "clinic")
    old = SigningKey(Ed25519PrivateKey.generate())  # a signing key alone, as keys made before X25519 were
    old.write(tmp_path / "bank.key", tmp_path / "bank.pub")
    ok("init", tmp_path / "fed", "--site", "clinic", "--site", "bank", "--site-key", f"clinic={tmp_path / 'clinic.pub'}",
       "--site-key", f"bank={tmp_path / 'bank.pub'}", "--model", tiny_model)
    sites = {s["name"]: s for s in yaml.safe_load((tmp_path / "fed" / "federation.yaml").read_text())["sites"]}
    assert [sites["clinic"]["key"], sites["clinic"]["exchange_key"]] == (tmp_path / "clinic.pub").read_text().splitlines()
    assert sites["bank"] == {"name": "bank", "lora_r": None, "key": old.public}
    listed = json.loads(ok("roster", "list", "--config", tmp_path / "fed" / "federation.yaml", "--json"))["sites"]
    assert [s["exchange_key"] is not None for s in listed] == [True, False]
    assert fedtune("verify", "--registry", tmp_path / "fed" / "registry")[0] == 0


# --- signed rounds --------------------------------------------------------------------------------------


def test_train_local_signs_with_the_site_key_and_refuses_any_other(fresh):
    for site in SITES:
        assert (fresh.updates / "round-0001" / site / "manifest.sig").is_file()
    shutil.rmtree(fresh.updates / "round-0001" / "clinic")
    base = ["train-local", "--config", fresh.config, "--site", "clinic", "--data", fresh.prepared("clinic"),
            "--global", fresh.registry, "--out", fresh.updates, *TRAIN]
    assert "requires signed updates" in one_error(fedtune(*base), 2)
    assert "not the key the roster holds for site clinic" in one_error(fedtune(*base, "--key", fresh.key("bank")), 2)
    assert not (fresh.updates / "round-0001" / "clinic").exists()


def test_aggregate_names_an_equivocation(fresh):
    # bank signs a second, different update for the same round: both are refused, and the round says so.
    second = fresh.updates / "round-0001" / "bank-2"
    shutil.copytree(fresh.updates / "round-0001" / "bank", second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["nonce"] = "0" * 32
    (second / "manifest.json").write_bytes(pretty_json(manifest))
    (second / "manifest.sig").write_text(SigningKey.load(fresh.key("bank")).sign(canonical_json(manifest)) + "\n")

    code, out, err = fedtune("aggregate", "--config", fresh.config, "--registry", fresh.registry, "--updates",
                             fresh.updates / "round-0001")
    assert code == 0, err
    assert "2 updates merged [clinic" in out and "2 rejected" in out
    assert "equivocation: site bank signed 2 different updates this round (bank, bank-2)" in out
    assert err.count("rejected: equivocation: site 'bank'") == 2
    history = json.loads(ok("log", "--registry", fresh.registry, "--site", "bank", "--json"))["entries"]
    assert [(e["version"], e["equivocations"]) for e in history] == [("v0001", ["bank"])]
    assert {r["site"] for r in history[0]["rejected"]} == {"bank", "bank-2"}
    assert fresh.verify("--updates", fresh.updates)[0] == 0


def test_aggregate_refuses_a_committed_round_unless_forced(world):
    args = ["aggregate", "--config", world.config, "--registry", world.registry, "--updates",
            world.updates / "round-0001"]
    line = one_error(fedtune(*args), 2)
    assert "round 1 is already committed as v0001" in line and "--force-new-round" in line
    # Forced, the folder is taken as round 2: its updates (trained for round 1) are then each refused by lineage.
    code, out, err = fedtune(*args, "--force-new-round")
    assert code == 2 and "below the quorum" in err
    assert err.count("update is for round 1, this round is 2") == 3
    assert (world.registry / "LATEST").read_text() == "v0001\n"


def test_aggregate_takes_the_coordinator_key_it_is_given(world, tmp_path):
    ok("keys", "new", "--out", tmp_path, "--name", "impostor")
    line = one_error(fedtune("aggregate", "--config", world.config, "--registry", world.registry, "--updates",
                             world.updates / "round-0001", "--key", tmp_path / "impostor.key"), 2)
    assert "impostor.key: not the coordinator key named in federation.yaml" in line
    shutil.move(world.fed / "coordinator.key", tmp_path / "coordinator.key")
    line = one_error(fedtune("aggregate", "--config", world.config, "--registry", world.registry, "--updates",
                             world.updates / "round-0001"), 2)
    assert "coordinator.key: key file not found" in line


def test_aggregate_refuses_a_roster_edited_by_hand(fresh):
    """Whoever can write federation.yaml must not be able to swap a site's key in and sign for it: aggregate
    takes the roster only as the log last recorded it."""
    ok("keys", "new", "--out", fresh.root / "mallory", "--name", "bank")
    data = yaml.safe_load(fresh.config.read_text())
    original = fresh.config.read_text()
    for entry in data["sites"]:
        if entry["name"] == "bank":
            entry["key"] = signing_line(fresh.root / "mallory" / "bank.pub")
    fresh.config.write_text(yaml.safe_dump(data, sort_keys=False))
    before = sorted(p.name for p in fresh.registry.iterdir())
    line = one_error(fedtune("aggregate", "--config", fresh.config, "--registry", fresh.registry, "--updates",
                             fresh.updates / "round-0001"), 2)
    assert "its roster is not the one" in line and "edited by hand" in line
    assert sorted(p.name for p in fresh.registry.iterdir()) == before
    fresh.config.write_text(original)
    assert "LATEST = v0001" in fresh.aggregate(1)


# --- the roster -----------------------------------------------------------------------------------------


def test_a_site_added_to_the_roster_trains_after_a_rollback_and_is_merged(audit):
    """eve joined (roster add) and the federation rolled back to v0000 as v0002: eve and clinic train the next
    round from the registry with no special step, and the next aggregate merges both."""
    assert "eve" in ok("roster", "list", "--config", audit.config)
    audit.prepare("eve", topic="bank")
    for site in ("eve", "clinic"):
        audit.train(site)
    manifest = json.loads((audit.updates / "round-0003" / "eve" / "manifest.json").read_text())
    assert manifest["parent"]["version"] == "v0002"
    out = audit.aggregate(3)
    assert f"wrote {audit.registry / 'v0003'}: 2 updates merged" in out and "rejected" not in out
    v3 = json.loads((audit.registry / "v0003" / "manifest.json").read_text())
    assert v3["parent"] == "v0002" and sorted(c["site"] for c in v3["contributors"]) == ["clinic", "eve"]
    code, out, err = audit.verify("--updates", audit.updates)
    assert code == 0 and err == "" and "4 versions (latest v0003)" in out and "5 updates" in out


def test_roster_add_and_remove_are_signed_and_logged(world):
    ok("keys", "new", "--out", world.root / "keys", "--name", "eve")
    out = ok("roster", "add", "--config", world.config, "--registry", world.registry, "--site", "eve", "--key",
             world.pub("eve"), "--lora-r", "2")
    assert out.startswith(f"added site eve to {world.config} (key ed25519:") and "rank 2" in out
    out = ok("roster", "remove", "--config", world.config, "--site", "dev", "--json")
    assert json.loads(out)["warnings"] == []
    sites = {s["name"]: s for s in yaml.safe_load(world.config.read_text())["sites"]}
    assert set(sites) == {"clinic", "bank", "eve"} and sites["eve"]["lora_r"] == 2
    entries = [json.loads(line) for line in world.log_lines()[-2:]]
    assert [(e["event"], e["action"], e["site"]) for e in entries] == [("roster", "add", "eve"), ("roster", "remove", "dev")]
    assert [entries[0]["key"], entries[0]["exchange_key"]] == world.pub("eve").read_text().splitlines()
    assert sites["eve"]["exchange_key"] == entries[0]["exchange_key"] and all(e["sig"] for e in entries)
    history = json.loads(ok("log", "--registry", world.registry, "--site", "dev", "--json"))["entries"]
    assert [(e["event"], e.get("version"), e.get("action")) for e in history] == [("version", "v0001", None),
                                                                                   ("roster", None, "remove")]
    # dev's update of round 1 still verifies: the log's remove event keeps the key it was signed with.
    code, out, err = world.verify("--updates", world.updates)
    assert code == 0 and "3 updates" in out, err


@pytest.mark.parametrize("args,problem", [
    (["add", "--site", "bank", "--key", "{eve}"], "--site bank: already on the roster"),
    (["add", "--site", "eve", "--key", "{bank}"], "already site bank's key; every site signs with its own"),
    (["add", "--site", "eve", "--key", "{eve_private}"], "not a fedtune public key"),
    (["add", "--site", "eve", "--key", "{eve}", "--lora-r", "8"], "lora_r 8 is above the federation's lora.r 4"),
    (["add", "--site", "e/ve", "--key", "{eve}"], "sites.3.name"),
    (["remove", "--site", "mallory"], "--site mallory: not on the roster"),
])
def test_roster_refusals_change_nothing(world, args, problem):
    ok("keys", "new", "--out", world.root / "keys", "--name", "eve")
    fill = {"eve": world.pub("eve"), "bank": world.pub("bank"), "eve_private": world.key("eve")}
    before = world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    line = one_error(fedtune("roster", args[0], "--config", world.config, *[a.format(**fill) for a in args[1:]]), 2)
    assert problem in line
    assert (world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before


def test_roster_add_takes_the_exchange_key_from_the_pub(world):
    record = json.loads(ok("keys", "new", "--out", world.root / "keys", "--name", "eve", "--json"))
    assert record["exchange_key"].startswith("x25519:")
    added = json.loads(ok("roster", "add", "--config", world.config, "--site", "eve", "--key", record["public"],
                          "--json"))
    assert (added["key"], added["exchange_key"]) == (record["key"], record["exchange_key"])
    sites = {s["name"]: s for s in yaml.safe_load(world.config.read_text())["sites"]}
    assert (sites["eve"]["key"], sites["eve"]["exchange_key"]) == (record["key"], record["exchange_key"])
    assert json.loads(world.log_lines()[-1])["exchange_key"] == record["exchange_key"]
    listed = json.loads(ok("roster", "list", "--config", world.config, "--json"))["sites"]
    assert {s["name"]: s["exchange_key"] for s in listed}["eve"] == record["exchange_key"]
    assert "exchange key" in ok("roster", "list", "--config", world.config)
    code, out, err = world.verify("--updates", world.updates)
    assert code == 0, err


def test_roster_add_of_a_pub_from_before_key_agreement_logs_as_before(world):
    old = SigningKey(Ed25519PrivateKey.generate())  # a signing key alone, as keys made before X25519 were
    old.write(world.root / "keys" / "eve.key", world.pub("eve"))
    ok("roster", "add", "--config", world.config, "--site", "eve", "--key", world.pub("eve"))
    sites = {s["name"]: s for s in yaml.safe_load(world.config.read_text())["sites"]}
    assert sites["eve"] == {"name": "eve", "lora_r": None, "key": old.public}
    last = json.loads(world.log_lines()[-1])
    assert "exchange_key" not in last and "exchange_key" not in last["roster"][-1]
    code, out, err = world.verify("--updates", world.updates)
    assert code == 0, err


def test_roster_add_refuses_an_exchange_key_already_on_the_roster(world):
    ok("keys", "new", "--out", world.root / "keys", "--name", "eve")
    copied = world.root / "keys" / "copycat.pub"
    copied.write_text(f"{signing_line(world.pub('eve'))}\n{world.pub('bank').read_text().splitlines()[1]}\n")
    before = world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    line = one_error(fedtune("roster", "add", "--config", world.config, "--site", "eve", "--key", copied), 2)
    assert f"--key {copied}: its exchange key is already site bank's" in line
    assert (world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before


def test_the_last_site_stays_on_the_roster(world):
    ok("roster", "remove", "--config", world.config, "--site", "dev")
    code, out, err = fedtune("roster", "remove", "--config", world.config, "--site", "bank")
    assert code == 0 and "warning: the roster has 1 site(s), fewer than aggregation.quorum 2" in err
    line = one_error(fedtune("roster", "remove", "--config", world.config, "--site", "clinic"), 2)
    assert "the last site on the roster" in line
    assert world.verify()[0] == 0


def _killed_after_its_log_line(*args) -> None:
    """Run `fedtune ARGS` (a roster change) in a forked child that is SIGKILLed the moment it starts rewriting
    federation.yaml: after its log line, the commit point, was written."""
    pid = os.fork()
    if pid == 0:
        try:
            from fedtune import audit

            write = audit.write_text_atomic

            def killed(path, text):
                if Path(path).name == "federation.yaml":
                    os.kill(os.getpid(), signal.SIGKILL)
                return write(path, text)

            audit.write_text_atomic = killed
            fedtune(*args)
        finally:
            os._exit(3)  # only reached if the command never wrote federation.yaml
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_a_roster_change_killed_after_its_log_line_is_finished_by_roster_sync(fresh):
    """An honest crash between the log line and federation.yaml must not look like tampering: verify passes with
    a note, aggregate refuses with one line naming the fix, `roster sync` applies the committed change."""
    ok("keys", "new", "--out", fresh.root / "keys", "--name", "eve")
    eve = signing_line(fresh.pub("eve"))
    before = fresh.config.read_bytes()
    _killed_after_its_log_line("roster", "add", "--config", fresh.config, "--site", "eve", "--key", fresh.pub("eve"))
    assert fresh.config.read_bytes() == before
    last = json.loads(fresh.log_lines()[-1])
    assert (last["event"], last["action"], last["site"], last["roster"][-1]["key"]) == ("roster", "add", "eve", eve)

    code, out, err = fresh.verify("--updates", fresh.updates)
    assert code == 0 and "1 pending (notes below)" in out, err
    assert err.startswith("note: pending: federation.yaml: one roster change behind") and len(err.splitlines()) == 1
    assert "(line 2: add eve)" in err and "`fedtune roster sync --config" in err

    registry_before = {p.name: p.read_bytes() for p in fresh.registry.iterdir() if p.is_file() and p.name != ".lock"}
    line = one_error(fedtune("aggregate", "--config", fresh.config, "--registry", fresh.registry, "--updates",
                             fresh.updates / "round-0001"), 2)
    assert line == (f"error: {fresh.config}: one roster change behind {fresh.registry / 'log.jsonl'} (line 2: add "
                    f"eve), committed but not yet written to it; `fedtune roster sync --config {fresh.config} "
                    f"--registry {fresh.registry}` applies it")
    assert {p.name: p.read_bytes() for p in fresh.registry.iterdir()
            if p.is_file() and p.name != ".lock"} == registry_before

    out = ok("roster", "sync", "--config", fresh.config)
    assert out.strip() == (f"wrote {fresh.config}: the roster change {fresh.registry / 'log.jsonl'} committed at "
                           "line 2 (add eve); send the sites the new federation.yaml")
    old, new = yaml.safe_load(before), yaml.safe_load(fresh.config.read_text())
    assert new["sites"] == old["sites"] + [{"name": "eve", "lora_r": None, "key": eve,
                                            "exchange_key": fresh.pub("eve").read_text().splitlines()[1]}]
    # Every other key of federation.yaml is as it was.
    assert {k: v for k, v in new.items() if k != "sites"} == {k: v for k, v in old.items() if k != "sites"}
    assert len(fresh.log_lines()) == 2  # applied from the log, not logged again
    code, out, err = fresh.verify("--updates", fresh.updates)
    assert code == 0 and err == "" and "pending" not in out
    assert "LATEST = v0001" in fresh.aggregate(1)


def test_roster_sync_of_a_federation_in_step_changes_nothing(world):
    before = world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    out = ok("roster", "sync", "--config", world.config, "--registry", world.registry)
    assert out.strip() == f"{world.config}: its roster is the one {world.registry / 'log.jsonl'} records; nothing to do"
    assert json.loads(ok("roster", "sync", "--config", world.config, "--json")) == {
        "config": str(world.config), "registry": str(world.registry), "applied": None, "sites": SITES}
    assert (world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before


def test_roster_sync_refuses_a_roster_edited_by_hand(world):
    _edit_roster(world, lambda s: _set_key(s, "bank", SigningKey.generate().public))
    before = world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    line = one_error(fedtune("roster", "sync", "--config", world.config), 2)
    assert f"{world.config}: its roster is not the one {world.registry / 'log.jsonl'} records (line 1)" in line
    assert "edited by hand" in line
    assert (world.config.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before


# --- log ------------------------------------------------------------------------------------------------


def test_log_shows_versions_weights_roster_changes_and_rollbacks(audit, monkeypatch):
    from fedtune import cli

    monkeypatch.setattr(cli.out, "width", 300)  # one table row per line
    table = ok("log", "--registry", audit.registry)
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 4
    v1 = json.loads((audit.registry / "v0001" / "manifest.json").read_text())
    weights = ", ".join(f"{c['site']} {c['weight']:.3f}" for c in v1["contributors"])
    assert re.search(r"│ v0000 +│ 0 +│ .*seeded-init \(seed=0\)", rows[0])
    assert "│ v0001 " in rows[1] and "fedavg (weighting=examples, max_weight=0.5" in rows[1] and weights in rows[1]
    assert "roster add eve (key ed25519:" in rows[2]
    assert "│ v0002 " in rows[3] and "rollback" in rows[3] and "rolled back to v0000: v0001 drifted on clinic" in rows[3]

    entries = json.loads(ok("log", "--registry", audit.registry, "--json"))["entries"]
    assert [e["line"] for e in entries] == [1, 2, 3, 4]
    assert sum(c["weight"] for c in entries[1]["contributors"]) == pytest.approx(1.0)
    only = json.loads(ok("log", "--registry", audit.registry, "--site", "clinic", "--json"))["entries"]
    assert [(e["version"], e["weight"]) for e in only] == [
        ("v0001", next(c["weight"] for c in v1["contributors"] if c["site"] == "clinic"))]


def test_log_of_a_folder_that_is_no_registry_is_one_line(tmp_path):
    assert "not a registry" in one_error(fedtune("log", "--registry", tmp_path), 2)


# --- rollback -------------------------------------------------------------------------------------------


def test_rollback_copies_the_adapter_and_is_signed_and_logged(audit):
    v0, v2 = audit.registry / "v0000", audit.registry / "v0002"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (v2 / name).read_bytes() == (v0 / name).read_bytes()
    manifest = json.loads((v2 / "manifest.json").read_text())
    v1 = json.loads((audit.registry / "v0001" / "manifest.json").read_text())
    assert (manifest["method"], manifest["parent"], manifest["parent_sha256"], manifest["rolled_back_to"],
            manifest["reason"], manifest["round"]) == ("rollback", "v0001", v1["adapter_sha256"], "v0000",
                                                       "v0001 drifted on clinic", 2)
    assert manifest["contributors"] == [] and (v2 / "manifest.sig").is_file()
    last = json.loads(audit.log_lines()[-1])
    assert (last["version"], last["rolled_back_to"], last["parent"]) == ("v0002", "v0000", "v0001") and last["sig"]
    assert (audit.registry / "LATEST").read_text() == "v0002\n"
    assert (audit.registry / "v0001").is_dir()  # nothing is deleted
    code, out, err = audit.verify("--updates", audit.updates, "--json")
    assert code == 0 and json.loads(out)["versions"] == 3 and json.loads(out)["signatures_checked"] == 4 + 3 + 3


@pytest.mark.parametrize("to,reason,problem", [
    ("v0009", "why", "--to v0009: not a version of"),
    ("v0002", "why", "--to v0002: already the current version"),
    ("v0000", "  ", "--reason: say why"),
    ("latest", "why", "'latest' is not a version name"),
])
def test_rollback_refusals_write_nothing(audit, to, reason, problem):
    before = {p.name for p in audit.registry.iterdir()}, (audit.registry / "log.jsonl").read_bytes()
    assert problem in one_error(fedtune("rollback", "--registry", audit.registry, "--to", to, "--reason", reason), 2)
    assert ({p.name for p in audit.registry.iterdir()}, (audit.registry / "log.jsonl").read_bytes()) == before


# --- verify: an honest registry, a version folder -------------------------------------------------------


def test_verify_an_honest_registry_is_one_line_and_exit_0(audit):
    code, out, err = audit.verify("--updates", audit.updates)
    assert code == 0 and err == ""
    assert out == (f"verified {audit.registry}: 3 versions (latest v0002), 10 signatures, 3 updates\n")
    assert json.loads(audit.verify("--json")[1]) == {
        "ok": True, "registry": str(audit.registry), "versions": 3, "latest": "v0002", "signatures_checked": 7,
        "updates_checked": 0, "pending": []}


def test_verify_a_version_folder_offline(audit, tmp_path):
    # A site holding only federation.yaml and a copy of the version checks it before training.
    copy = tmp_path / "inbox" / "v0001"
    shutil.copytree(audit.registry / "v0001", copy)
    out = ok("verify", "--config", audit.config, copy)
    assert out.startswith(f"verified {copy}: v0001 (round 1), signed by the coordinator")
    shutil.copy(audit.registry / "v0000" / "manifest.sig", copy / "manifest.sig")
    assert f"{copy / 'manifest.sig'}: not the coordinator's signature" in one_error(
        fedtune("verify", "--config", audit.config, copy), 1)
    assert "folder not found" in one_error(fedtune("verify", "--config", audit.config, tmp_path / "nothing"), 2)
    assert "give --config" in one_error(fedtune("verify", copy), 2)
    assert "not both" in one_error(fedtune("verify", copy, "--registry", audit.registry), 2)


# --- verify: tampering ----------------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_log_line(fed: Fed, number: int, old: bytes, new: bytes) -> None:
    lines = fed.log_lines()
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
    (fed.registry / "log.jsonl").write_bytes(b"".join(lines))


def _resign_log_line(fed: Fed, number: int) -> None:
    lines = fed.log_lines()
    entry = json.loads(lines[number - 1])
    entry.pop("sig")
    entry["sig"] = SigningKey.generate().sign(canonical_json(entry))
    lines[number - 1] = canonical_json(entry) + b"\n"
    (fed.registry / "log.jsonl").write_bytes(b"".join(lines))


def _forge_as_coordinator(fed: Fed, number: int, change) -> None:
    """Change log line `number`, then re-chain and re-sign it and every line after it with the coordinator's own
    key: only a check that does not rest on the signatures can catch it."""
    key = SigningKey.load(fed.fed / "coordinator.key")
    lines = fed.log_lines()
    for index in range(number - 1, len(lines)):
        entry = json.loads(lines[index])
        entry.pop("sig")
        if index == number - 1:
            change(entry)
        entry["prev"] = hashlib.sha256(lines[index - 1]).hexdigest() if index else "0" * 64
        entry["sig"] = key.sign(canonical_json(entry))
        lines[index] = canonical_json(entry) + b"\n"
    (fed.registry / "log.jsonl").write_bytes(b"".join(lines))


def _drop_log_line(fed: Fed, number: int) -> None:
    lines = fed.log_lines()
    del lines[number - 1]
    (fed.registry / "log.jsonl").write_bytes(b"".join(lines))


def _edit_roster(fed: Fed, change) -> None:
    data = yaml.safe_load(fed.config.read_text())
    change(data["sites"])
    fed.config.write_text(yaml.safe_dump(data, sort_keys=False))


def _symlink_adapter(folder: Path) -> None:
    # The same bytes, but behind a link: a site could point it anywhere on the coordinator's disk.
    (folder / "adapter_model.safetensors").rename(folder.parent / "elsewhere.safetensors")
    (folder / "adapter_model.safetensors").symlink_to(folder.parent / "elsewhere.safetensors")


def _set_key(sites, name, key):
    next(s for s in sites if s["name"] == name)["key"] = key


TAMPERING = {
    "adapter-byte": (lambda f: _flip_last_byte(f.registry / "v0001" / "adapter_model.safetensors"),
                     "{reg}/v0001/adapter_model.safetensors: does not match the sha256 in its manifest"),
    "manifest-byte": (lambda f: (f.registry / "v0001" / "manifest.json").write_bytes(
                          (f.registry / "v0001" / "manifest.json").read_bytes().replace(b'"round": 1', b'"round": 3')),
                      "{reg}/v0001/manifest.json: not the bytes {reg}/log.jsonl: line 2 records"),
    "log-line-byte": (lambda f: _edit_log_line(f, 2, b'"round":1', b'"round":7'),
                      "{reg}/log.jsonl: line 2: not signed by the coordinator key"),
    "log-line-deleted": (lambda f: _drop_log_line(f, 2),
                         "{reg}/log.jsonl: line 2: its prev hash is not the sha256 of line 1"),
    "first-log-line-deleted": (lambda f: _drop_log_line(f, 1),
                               "{reg}/log.jsonl: line 1: its prev hash is not the genesis value"),
    "last-log-line-deleted": (lambda f: _drop_log_line(f, 4),
                              "{reg}/LATEST: names v0002, but the log's last version is v0001"),
    "manifest-sig-swapped": (lambda f: shutil.copy(f.registry / "v0000" / "manifest.sig",
                                                   f.registry / "v0001" / "manifest.sig"),
                             "{reg}/v0001/manifest.sig: not the coordinator's signature of manifest.json"),
    "log-line-other-key": (lambda f: _resign_log_line(f, 3),
                           "{reg}/log.jsonl: line 3: not signed by the coordinator key"),
    # Not eve, whom line 3 added: without her the roster is the one before line 3, a committed change not yet
    # written, which verify notes as pending (the roster sync tests above).
    "roster-site-removed": (lambda f: _edit_roster(f, lambda sites: sites.pop(0)),
                            "federation.yaml: its roster (sites) is not the one the registry's log records "
                            "({reg}/log.jsonl line 3): it was edited by hand"),
    "roster-key-replaced": (lambda f: _edit_roster(f, lambda s: _set_key(s, "bank", SigningKey.generate().public)),
                            "federation.yaml: its roster (sites) is not the one the registry's log records"),
    "roster-line-roster-altered": (lambda f: _forge_as_coordinator(
                                       f, 3, lambda e: _set_key(e["roster"], "eve", SigningKey.generate().public)),
                                   "{reg}/log.jsonl: line 3: its roster does not hash to its roster_sha256"),
    "coordinator-key-replaced": (lambda f: f.config.write_text(f.config.read_text().replace(
                                     yaml.safe_load(f.config.read_text())["coordinator_key"],
                                     SigningKey.generate().public)),
                                 "{reg}/log.jsonl: line 1: not signed by the coordinator key"),
    "latest-rewound": (lambda f: (f.registry / "LATEST").write_text("v0000\n"),
                       "{reg}/LATEST: names v0000, but the log's last version is v0002"),
    "version-deleted": (lambda f: shutil.rmtree(f.registry / "v0001"),
                        "{reg}/v0001: missing ({reg}/log.jsonl: line 2 records it)"),
    "stray-version": (lambda f: shutil.copytree(f.registry / "v0001", f.registry / "v0007"),
                      "{reg}/v0007: a version folder the log does not record"),
    "update-byte": (lambda f: _flip_last_byte(f.updates / "round-0001" / "bank" / "adapter_model.safetensors"),
                    "{upd}/round-0001/bank/adapter_model.safetensors: not the bytes merged into v0001"),
    "update-sig-swapped": (lambda f: shutil.copy(f.updates / "round-0001" / "clinic" / "manifest.sig",
                                                 f.updates / "round-0001" / "bank" / "manifest.sig"),
                           "{upd}/round-0001/bank/manifest.sig: not site bank's signature"),
    "update-adapter-symlink": (lambda f: _symlink_adapter(f.updates / "round-0001" / "bank"),
                               "{upd}/round-0001/bank: adapter_model.safetensors: is a symbolic link"),
    "update-missing": (lambda f: shutil.rmtree(f.updates / "round-0001" / "dev"),
                       "{upd}/round-0001/dev: missing (site dev's update merged into v0001)"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_verify_names_what_was_tampered_with(audit, case):
    tamper, problem = TAMPERING[case]
    tamper(audit)
    line = one_error(audit.verify("--updates", audit.updates), 1)
    assert problem.format(reg=audit.registry, upd=audit.updates) in line


# --- verify: what an interrupted command leaves ---------------------------------------------------------


def _unlogged_last_version(fed: Fed, torn: bool) -> None:
    """As if the rollback was killed after publishing v0002, before (or while) writing its log line."""
    lines = fed.log_lines()
    tail = lines[-1][: len(lines[-1]) // 2] if torn else b""
    (fed.registry / "log.jsonl").write_bytes(b"".join(lines[:-1]) + tail)
    (fed.registry / "LATEST").write_text("v0001\n")


def _leftovers(fed: Fed) -> None:
    (fed.registry / f".v0003.{os.getpid()}.tmp").mkdir()
    (fed.registry / f".round-0003.{os.getpid()}.work").mkdir()
    (fed.registry / ".LATEST.x1y2.tmp").write_text("v0003\n")


INTERRUPTED = {
    "latest-behind": (lambda f: (f.registry / "LATEST").write_text("v0001\n"),
                      ["LATEST: names v0001, one behind the log's last version v0002"]),
    "latest-missing": (lambda f: (f.registry / "LATEST").unlink(), ["LATEST: missing"]),
    "published-not-logged": (lambda f: _unlogged_last_version(f, torn=False),
                             ["v0002: published but not yet logged; the next fedtune command on this registry commits it"]),
    "torn-log-line": (lambda f: _unlogged_last_version(f, torn=True),
                      ["log.jsonl: line 4 was cut off mid-write", "v0002: published but not yet logged"]),
    "leftovers": (_leftovers, [".LATEST.x1y2.tmp: left by an interrupted command", ".round-0003.",
                               ".v0003."]),
}


@pytest.mark.parametrize("case", INTERRUPTED)
def test_verify_passes_what_an_interrupted_command_left_with_a_note(audit, case):
    before = json.loads(audit.verify("--json")[1])
    make, notes = INTERRUPTED[case]
    make(audit)
    code, out, err = audit.verify("--updates", audit.updates)
    assert code == 0, err
    assert "pending (notes below)" in out
    assert len(err.splitlines()) == len(notes) and all(line.startswith("note: pending: ") for line in err.splitlines())
    for note in notes:
        assert note in err
    # The next writer finishes it; verify then has nothing pending and sees the same registry.
    with Registry(audit.registry, coordinator_signer(load_federation(audit.config), audit.registry)).lock("test"):
        pass
    after = json.loads(audit.verify("--json")[1])
    assert after["pending"] == [] and (after["versions"], after["latest"]) == (before["versions"], before["latest"])


def test_verify_writes_nothing(audit):
    def state():
        return {str(p.relative_to(audit.root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                for p in sorted(audit.root.rglob("*"))}

    _leftovers(audit)
    (audit.registry / "LATEST").write_text("v0001\n")
    before = state()
    assert audit.verify("--updates", audit.updates)[0] == 0
    assert state() == before


# --- help stays light -----------------------------------------------------------------------------------


def _imported(*args: str) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedtune.cli", *args], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return {m.group(1) for m in re.finditer(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", result.stderr)}


@pytest.mark.parametrize("args", [["keys", "new", "--help"], ["roster", "add", "--help"], ["roster", "sync", "--help"],
                                  ["log", "--help"],
                                  ["verify", "--help"], ["rollback", "--help"]])
def test_trust_commands_help_imports_no_torch(args):
    modules = _imported(*args)
    assert "typer" in modules
    assert not {"torch", "transformers", "peft"} & {m.split(".")[0] for m in modules}


def test_top_level_help_loads_neither_the_schema_nor_the_crypto():
    # What made `fedtune --help` slow: the method registry's import of the configuration schema (pydantic) and
    # the key code (cryptography). The top-level help lists commands only, so it needs neither.
    top = {m.split(".")[0] for m in _imported("--help")}
    assert "typer" in top and not {"pydantic", "cryptography", "torch"} & top
    # The measurement sees the schema where it is used: the reference `init --explain` prints is built from it.
    assert "fedtune.config" in _imported("init", "--explain")
