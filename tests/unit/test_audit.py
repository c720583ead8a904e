"""fedtune.audit and fedtune.verify as functions: what verification counts and where it looks, the roster a
merged update is checked against, history rows, rollbacks (server optimizer state included) and roster
changes, on a real signed federation of the tiny model. The command line over them: tests/integration/
test_trust_cli.py."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

import fedkit
from fedtune.audit import change_roster, history, rollback, sync_roster, verify_registry, verify_version
from fedtune.errors import BadInput, FedtuneError, VerifyFailed
from fedtune.registry import Registry, roster_sha256, sites_sha256, verify_line
from fedtune.wire.codec import canonical_json
from fedtune.wire.keys import SigningKey
from fedtune.wire.version import read_version_manifest


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """clinic, bank and dev with keys on the roster, round 1 trained and signed."""
    return fedkit.build_world(tmp_path_factory.mktemp("audit") / "w", tiny_model, keys=True)


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    from fedtune.aggregate import aggregate_round

    world = fedkit.clone_world(trained, tmp_path_factory.mktemp("audit-merged") / "w")
    aggregate_round(world.config, world.registry, world.round1)
    return world


@pytest.fixture
def world(merged, tmp_path):
    return fedkit.clone_world(merged, tmp_path / "w")


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _files(world) -> dict[str, str]:
    """Every file of the federation folder and its sha256 (the lock file aside: taking the lock writes it)."""
    return {p: fedkit.sha256(world.fed / p) for p in fedkit.tree_entries(world.fed)
            if (world.fed / p).is_file() and p != "registry/.lock"}


def load(world):
    """The federation as its federation.yaml says now."""
    from fedtune.config import load_federation

    return load_federation(world.config_path)


# --- verify ---------------------------------------------------------------------------------------------


def test_verify_counts_what_it_checked(world):
    full = verify_registry(world.registry, world.config, world.updates)
    # 2 log lines + 2 version manifests + 3 updates signed, 3 updates checked.
    assert full == {"ok": True, "registry": str(world.registry), "versions": 2, "latest": "v0001",
                    "signatures_checked": 7, "updates_checked": 3, "pending": []}
    assert verify_registry(world.registry, world.config)["signatures_checked"] == 4
    # Without the federation there is no key to check signatures with; the hashes are still checked.
    assert verify_registry(world.registry)["signatures_checked"] == 0
    _flip_last_byte(world.registry / "v0001" / "adapter_model.safetensors")
    with pytest.raises(VerifyFailed, match="v0001/adapter_model.safetensors: does not match the sha256") as info:
        verify_registry(world.registry)
    assert isinstance(info.value, FedtuneError) and info.value.exit_code == 1


def test_verify_refuses_what_is_not_a_registry(world, tmp_path):
    with pytest.raises(BadInput, match="registry folder not found"):
        verify_registry(tmp_path / "nothing", world.config)
    with pytest.raises(BadInput, match="not a registry"):
        verify_registry(world.fed, world.config)
    with pytest.raises(BadInput, match="updates folder not found"):
        verify_registry(world.registry, world.config, tmp_path / "nothing")


def test_merged_updates_are_checked_against_the_keys_the_roster_held_then(world):
    # dev leaves and joins again with a new key: its round-1 update was signed with the key it had then, which
    # only the log still holds (the remove event names it).
    new = SigningKey.generate()
    change_roster(world.config_path, world.registry, "remove", "dev")
    change_roster(world.config_path, world.registry, "add", "dev", new.public)
    report = verify_registry(world.registry, load(world), world.updates)
    assert report["updates_checked"] == 3 and report["signatures_checked"] == 4 + 2 + 3
    shutil.copy(world.round1 / "clinic" / "manifest.sig", world.round1 / "dev" / "manifest.sig")
    with pytest.raises(VerifyFailed, match="round-0001/dev/manifest.sig: not site dev's signature"):
        verify_registry(world.registry, load(world), world.updates)


def test_a_round_merged_from_a_folder_of_another_name_is_found(world):
    # `aggregate --force-new-round` merges a folder whose name is not the round's: the updates are found by hash.
    (world.updates / "round-0001").rename(world.updates / "resent")
    assert verify_registry(world.registry, world.config, world.updates)["updates_checked"] == 3
    fedkit.forge_update(world.updates / "resent" / "bank", sha256="e" * 64)  # no longer the merged update
    with pytest.raises(VerifyFailed, match="round-0001/bank: missing"):
        verify_registry(world.registry, world.config, world.updates)


def test_verify_version_checks_one_folder_against_the_federation(world, tmp_path):
    result = verify_version(world.registry / "v0001", world.config)
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert result == {"ok": True, "folder": str(world.registry / "v0001"), "version": "v0001", "round": 1,
                      "adapter_sha256": manifest["adapter_sha256"], "signed": True}
    other = world.config.model_copy(update={"coordinator_key": SigningKey.generate().public})
    with pytest.raises(VerifyFailed, match="manifest.sig: not the coordinator's signature"):
        verify_version(world.registry / "v0001", other)
    with pytest.raises(BadInput, match="a registry; verify it with `fedtune verify --registry"):
        verify_version(world.registry, world.config)
    with pytest.raises(BadInput, match="folder not found"):
        verify_version(tmp_path / "v0001", world.config)


# --- history --------------------------------------------------------------------------------------------


def test_history_rows_follow_the_log(world):
    change_roster(world.config_path, world.registry, "remove", "dev")
    rows = history(world.registry)
    assert [(r["event"], r["line"]) for r in rows] == [("version", 1), ("version", 2), ("roster", 3)]
    v0, v1, removal = rows
    assert (v0["version"], v0["round"], v0["method"], v0["params"], v0["contributors"]) == (
        "v0000", 0, "seeded-init", {"seed": 0}, [])
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert v1["contributors"] == [{"site": c["site"], "weight": c["weight"]} for c in manifest["contributors"]]
    assert (v1["method"], v1["rejected"], v1["equivocations"], v1["rolled_back_to"]) == ("fedavg", [], [], None)
    assert (removal["action"], removal["site"], removal["key"]) == ("remove", "dev", world.config.site_key("dev"))

    dev = history(world.registry, site="dev")
    assert [r["line"] for r in dev] == [2, 3]
    assert dev[0]["weight"] == next(c["weight"] for c in manifest["contributors"] if c["site"] == "dev")
    assert history(world.registry, site="mallory") == []


def test_history_skips_a_torn_last_line(world):
    with open(world.registry / "log.jsonl", "ab") as log:
        log.write(b'{"event": "version", "vers')
    assert [r["version"] for r in history(world.registry)] == ["v0000", "v0001"]


# --- rollback -------------------------------------------------------------------------------------------


def test_rollback_brings_back_the_server_optimizer_state(trained, tmp_path):
    from fedtune.aggregate import aggregate_round

    world = fedkit.clone_world(trained, tmp_path / "w")
    aggregate_round(world.config, world.registry, world.round1, server_opt="fedadam")
    rollback(world.config, world.registry, "v0000", "fedadam overshot")
    folder = rollback(world.config, world.registry, "v0001", "back to the fedadam version")
    assert folder == world.registry / "v0003"
    for name in ("adapter_model.safetensors", "adapter_config.json", "server_state.safetensors"):
        assert fedkit.sha256(folder / name) == fedkit.sha256(world.registry / "v0001" / name)
    manifest = read_version_manifest(folder, world.config.coordinator_key)
    source = fedkit.read_manifest(world.registry / "v0001")
    assert manifest["server_state_sha256"] == source["server_state_sha256"]
    assert manifest["params"] == {"server_opt": "fedadam"} and manifest["rank"] == source["rank"]
    assert fedkit.read_manifest(world.registry / "v0002")["params"] == {}
    last = (world.registry / "log.jsonl").read_text().splitlines()[-1]
    assert verify_line(json.loads(last), world.config.coordinator_key)
    assert verify_registry(world.registry, world.config, world.updates)["versions"] == 4


def test_rollback_refuses_a_damaged_target_or_a_foreign_key(world, tmp_path):
    before = _files(world)
    _flip_last_byte(world.registry / "v0000" / "adapter_model.safetensors")
    with pytest.raises(BadInput, match="v0000/adapter_model.safetensors: does not match"):
        rollback(world.config, world.registry, "v0000", "restore the seed")
    _flip_last_byte(world.registry / "v0000" / "adapter_model.safetensors")
    other = SigningKey.generate()
    other.write(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(BadInput, match="not the coordinator key named in federation.yaml"):
        rollback(world.config, world.registry, "v0000", "restore the seed", key=tmp_path / "other.key")
    with pytest.raises(BadInput, match="keep it under 2000"):
        rollback(world.config, world.registry, "v0000", "x" * 2001)
    assert _files(world) == before


# --- the roster -----------------------------------------------------------------------------------------


def test_change_roster_rewrites_the_federation_and_logs_it_signed(world):
    eve = SigningKey.generate()
    changed = change_roster(world.config_path, world.registry, "add", "eve", eve.public, lora_r=2)
    assert changed == load(world)
    assert (changed.site_names(), changed.site_key("eve"), changed.site_rank("eve")) == (
        ["clinic", "bank", "dev", "eve"], eve.public, 2)
    entry = json.loads((world.registry / "log.jsonl").read_text().splitlines()[-1])
    assert {k: entry[k] for k in ("event", "action", "site", "key", "lora_r", "roster_sha256")} == {
        "event": "roster", "action": "add", "site": "eve", "key": eve.public, "lora_r": 2,
        "roster_sha256": roster_sha256(changed)}
    # The line carries the whole new roster, as federation.yaml holds it: the file can be rewritten from it.
    assert entry["roster"] == [s.model_dump(mode="json") for s in changed.sites]
    assert sites_sha256(entry["roster"]) == entry["roster_sha256"]
    assert verify_line(entry, world.config.coordinator_key)
    assert verify_registry(world.registry, changed, world.updates)["ok"]


def test_a_roster_change_whose_log_line_cannot_be_written_leaves_the_federation_as_it_was(world, monkeypatch):
    before = world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()

    def disk_full(self, entry):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Registry, "append", disk_full)
    with pytest.raises(OSError):
        change_roster(world.config_path, world.registry, "remove", "dev")
    assert (world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before
    monkeypatch.undo()
    assert verify_registry(world.registry, load(world))["ok"]


def test_change_roster_never_signs_a_roster_edited_by_hand(world):
    # Someone without the coordinator key swaps bank's key in federation.yaml; the next roster change must not
    # commit the swapped key into a signed log line.
    text = world.config_path.read_text()
    world.config_path.write_text(text.replace(world.config.site_key("bank"), SigningKey.generate().public))
    before = world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    with pytest.raises(BadInput, match="its roster is not the one .*log.jsonl records \\(line 1\\): it was edited by hand"):
        change_roster(world.config_path, world.registry, "add", "eve", SigningKey.generate().public)
    assert (world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before


def test_change_roster_refuses_an_unknown_action(world):
    with pytest.raises(BadInput, match="unknown action 'rename'"):
        change_roster(world.config_path, world.registry, "rename", "dev")


def _one_change_behind(world, change) -> bytes:
    """Make a roster change, then put federation.yaml back as it was: byte for byte the state a change killed
    between its log line and the rewrite of federation.yaml leaves. Returns the federation.yaml it wrote."""
    before = world.config_path.read_bytes()
    change()
    after = world.config_path.read_bytes()
    world.config_path.write_bytes(before)
    return after


def test_a_committed_roster_change_missing_from_federation_yaml_is_pending_not_tampering(world):
    change_roster(world.config_path, world.registry, "remove", "dev")
    eve = SigningKey.generate()
    written = _one_change_behind(world, lambda: change_roster(world.config_path, world.registry, "add", "eve",
                                                              eve.public))
    store = Registry(world.registry)
    with pytest.raises(BadInput, match=r"federation.yaml: one roster change behind .*log.jsonl \(line 4: add eve\), "
                                       r"committed but not yet written to it; `fedtune roster sync --config "):
        store.check_roster(load(world), world.config_path)
    report = verify_registry(world.registry, load(world), world.updates)
    assert report["updates_checked"] == 3 and len(report["pending"]) == 1
    assert "one roster change behind" in report["pending"][0] and "(line 4: add eve)" in report["pending"][0]

    synced, applied = sync_roster(world.config_path, world.registry)
    assert applied == {"line": 4, "action": "add", "site": "eve"}
    assert world.config_path.read_bytes() == written and synced == load(world)
    assert verify_registry(world.registry, load(world), world.updates)["pending"] == []
    assert sync_roster(world.config_path, world.registry) == (synced, None)
    assert world.config_path.read_bytes() == written


def test_change_roster_applies_a_pending_change_before_its_own(world):
    eve, frank = SigningKey.generate(), SigningKey.generate()
    _one_change_behind(world, lambda: change_roster(world.config_path, world.registry, "add", "eve", eve.public))
    changed = change_roster(world.config_path, world.registry, "add", "frank", frank.public)
    assert changed.site_names() == ["clinic", "bank", "dev", "eve", "frank"] == load(world).site_names()
    assert (changed.site_key("eve"), changed.site_key("frank")) == (eve.public, frank.public)
    # The pending change was applied, not logged again.
    assert [(r["action"], r["site"]) for r in history(world.registry) if r["event"] == "roster"] == [
        ("add", "eve"), ("add", "frank")]
    assert verify_registry(world.registry, changed, world.updates)["pending"] == []


def test_a_roster_change_whose_federation_yaml_cannot_be_written_is_committed_and_synced_later(world, monkeypatch):
    import fedtune.audit

    before = world.config_path.read_bytes()

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fedtune.audit, "write_text_atomic", disk_full)
    with pytest.raises(BadInput, match=r"federation.yaml: could not be rewritten \(No space left on device\); the "
                                       r"roster change is committed .*`fedtune roster sync --config"):
        change_roster(world.config_path, world.registry, "remove", "dev")
    assert world.config_path.read_bytes() == before
    assert history(world.registry)[-1]["action"] == "remove"
    monkeypatch.undo()
    synced, applied = sync_roster(world.config_path, world.registry)
    assert applied["site"] == "dev" and synced.site_names() == ["clinic", "bank"] == load(world).site_names()


def test_sync_refuses_a_roster_behind_and_edited_by_hand(world):
    # One change behind, and bank's key swapped too: not a state any command leaves, so nothing is applied.
    _one_change_behind(world, lambda: change_roster(world.config_path, world.registry, "remove", "dev"))
    text = world.config_path.read_text()
    world.config_path.write_text(text.replace(world.config.site_key("bank"), SigningKey.generate().public))
    before = world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()
    with pytest.raises(BadInput, match=r"its roster is not the one .*log.jsonl records \(line 3\): it was edited"):
        sync_roster(world.config_path, world.registry)
    assert (world.config_path.read_bytes(), (world.registry / "log.jsonl").read_bytes()) == before
    with pytest.raises(VerifyFailed, match="edited by hand"):
        verify_registry(world.registry, load(world))


def test_a_roster_line_without_the_coordinators_signature_is_never_applied(world):
    # Someone who can write the log but lacks the coordinator key signs the last roster line with a key of their
    # own: it is not a committed change, so federation.yaml is not "behind" it.
    mallory = SigningKey.generate()
    _one_change_behind(world, lambda: change_roster(world.config_path, world.registry, "add", "eve", mallory.public))
    lines = (world.registry / "log.jsonl").read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[-1])
    entry.pop("sig")
    entry["sig"] = mallory.sign(canonical_json(entry))
    (world.registry / "log.jsonl").write_bytes(b"".join(lines[:-1]) + canonical_json(entry) + b"\n")
    before = world.config_path.read_bytes()
    with pytest.raises(BadInput, match="edited by hand"):
        sync_roster(world.config_path, world.registry)
    assert world.config_path.read_bytes() == before
