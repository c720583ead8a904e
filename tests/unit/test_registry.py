"""fedtune.registry and fedtune.artifacts: versions, LATEST, the hash-chained log, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from fedtune.artifacts import atomic_folder, read_json, sha256_file, write_bytes_atomic, write_json_atomic
from fedtune.errors import BadInput
from fedtune.federation import global_manifest
from fedtune.registry import GENESIS, Registry, resolve_global, version_name, version_number
from fedtune.errors import VerifyFailed
from fedtune.verify import verify_registry
from fedtune.wire import SigningKey
from fedtune.wire.version import read_version_manifest, write_version_manifest


def add_version(registry: Registry, number: int, payload: bytes = b"weights") -> Path:
    """A stand-in global version (its adapter bytes are not a real adapter), published and committed the way
    aggregate does it."""
    name = version_name(number)
    built = registry.root / f".{name}.test.tmp"
    built.mkdir()
    (built / "adapter_model.safetensors").write_bytes(payload + bytes([number]))
    parent = json.loads((registry.path_of(version_name(number - 1)) / "manifest.json").read_text())
    manifest = global_manifest(registry.config, number, sha256_file(built / "adapter_model.safetensors"),
                               parent=parent["version"], parent_sha256=parent["adapter_sha256"], method="test",
                               params={})
    write_version_manifest(built, manifest, registry.key)
    return registry.commit(registry.publish(built, name)) and registry.path_of(name)


def verify(registry: Registry) -> dict:
    """`fedtune verify --registry` on it, with the federation's coordinator key."""
    return verify_registry(registry.root, registry.config)


@pytest.fixture
def registry(federation) -> Registry:
    config, folder = federation
    registry = Registry(folder / "registry", SigningKey.load(folder / "coordinator.key"))
    registry.config = config
    return registry


# --- versions and LATEST ---------------------------------------------------------------------------


def test_version_names():
    assert version_name(0) == "v0000" and version_name(12) == "v0012" and version_name(12345) == "v12345"
    assert version_number("v0007") == 7 and version_number("v12345") == 12345
    for bad in ("v7", "0007", "v00a1", "latest", "../v0001"):
        with pytest.raises(BadInput):
            version_number(bad)


def test_init_registry_latest_is_v0000_and_log_verifies(registry):
    assert registry.exists()
    assert (registry.root / "LATEST").read_text() == "v0000\n"
    assert registry.latest_name() == "v0000"
    assert registry.latest() == registry.root / "v0000"
    assert verify(registry)["versions"] == 1
    entries = registry.entries()
    assert len(entries) == 1
    entry = entries[0]
    assert entry["event"] == "version" and entry["version"] == "v0000"
    assert entry["prev"] == GENESIS
    manifest_path = registry.root / "v0000" / "manifest.json"
    assert entry["manifest_sha256"] == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert entry["adapter_sha256"] == sha256_file(registry.root / "v0000" / "adapter_model.safetensors")
    manifest = read_version_manifest(registry.root / "v0000")
    assert manifest["version"] == "v0000" and manifest["adapter_sha256"] == entry["adapter_sha256"]


def test_commit_appends_line_chained_to_previous(registry):
    before = registry.log_path.read_bytes()
    add_version(registry, 1)
    after = registry.log_path.read_bytes()
    assert after.startswith(before)  # append-only
    lines = after.splitlines(keepends=True)
    assert len(lines) == 2
    newest = json.loads(lines[1])
    assert newest["version"] == "v0001"
    assert newest["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert registry.latest_name() == "v0001"

    add_version(registry, 2)
    lines = registry.log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    assert json.loads(lines[2])["prev"] == hashlib.sha256(lines[1]).hexdigest()
    assert verify(registry)["latest"] == "v0002"
    assert [e["version"] for e in registry.entries()] == ["v0000", "v0001", "v0002"]
    assert registry.latest_name() == "v0002"


def test_tampered_log_line_fails_verification(registry):
    add_version(registry, 1)
    add_version(registry, 2)
    lines = registry.log_path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["adapter_sha256"] = "f" * 64
    lines[1] = (json.dumps(entry, sort_keys=True) + "\n").encode()
    registry.log_path.write_bytes(b"".join(lines))
    with pytest.raises(VerifyFailed) as info:
        verify(registry)
    assert str(registry.log_path) in str(info.value)
    assert "line 2" in str(info.value)  # its signature no longer holds (and line 3 no longer chains to it)


def test_tampered_first_line_fails_verification(registry):
    add_version(registry, 1)
    raw = registry.log_path.read_bytes()
    registry.log_path.write_bytes(raw.replace(b'"version":"v0000"', b'"version":"v0009"', 1))
    with pytest.raises(VerifyFailed, match="line 1: not signed by the coordinator"):
        verify(registry)


def test_removed_log_line_fails_verification(registry):
    add_version(registry, 1)
    add_version(registry, 2)
    lines = registry.log_path.read_bytes().splitlines(keepends=True)
    registry.log_path.write_bytes(lines[0] + lines[2])
    with pytest.raises(VerifyFailed, match="line 2: its prev hash is not the sha256 of line 1"):
        verify(registry)


def test_garbled_log_line_is_bad_input(registry):
    add_version(registry, 1)
    lines = registry.log_path.read_bytes().splitlines(keepends=True)
    registry.log_path.write_bytes(lines[0] + b"{not json\n")
    with pytest.raises(VerifyFailed, match="line 2"):
        verify(registry)


def test_latest_naming_a_missing_version_is_bad_input(registry):
    (registry.root / "LATEST").write_text("v0042\n")
    with pytest.raises(BadInput, match="v0042"):
        registry.latest_name()


def test_not_a_registry(tmp_path):
    with pytest.raises(BadInput, match="not a registry"):
        Registry(tmp_path).latest_name()
    assert not Registry(tmp_path).exists() and Registry(tmp_path).entries() == []
    with pytest.raises(BadInput, match="not a registry"):
        verify_registry(tmp_path)


# --- resolve ---------------------------------------------------------------------------------------


def test_resolve_registry_version_and_other(registry, tmp_path):
    assert registry.resolve(registry.root) == registry.root / "v0000"
    assert resolve_global(registry.root) == registry.root / "v0000"
    assert resolve_global(str(registry.root)) == registry.root / "v0000"
    v1 = add_version(registry, 1)
    assert resolve_global(registry.root) == v1
    # a version folder means itself, even when it is not LATEST
    assert resolve_global(registry.root / "v0000") == registry.root / "v0000"
    assert resolve_global(v1) == v1

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "manifest.json").write_text("{}")  # no adapter: not a version
    for ref in (stray, tmp_path / "missing", registry.root / "v0000" / "manifest.json", registry.root.parent):
        with pytest.raises(BadInput) as info:
            resolve_global(ref)
        assert str(ref) in str(info.value)


def test_read_version_manifest_checks_format(tmp_path):
    folder = tmp_path / "v0003"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "fedtune.update/2"}))
    with pytest.raises(BadInput, match="format"):
        read_version_manifest(folder)
    (folder / "manifest.json").write_text("{broken")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_version_manifest(folder)


def test_malformed_version_manifest_is_one_line_naming_the_field(registry):
    """A version manifest with the right format but a field missing or mistyped: one BadInput naming the field,
    wherever a version is read (train-local, evaluate and export go through checked_version)."""
    from fedtune.registry import checked_version

    manifest_path = registry.root / "v0000" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for broken, field in (({k: v for k, v in manifest.items() if k != "adapter_sha256"}, "adapter_sha256"),
                          ({**manifest, "round": "zero"}, "round"),
                          ({**manifest, "contributors": [{"site": "x"}]}, "contributors.0")):
        manifest_path.write_text(json.dumps(broken))
        with pytest.raises(BadInput) as info:
            checked_version(registry.root, registry.config)
        message = str(info.value)
        assert "\n" not in message and str(manifest_path) in message and field in message


# --- atomic writes ---------------------------------------------------------------------------------


def test_atomic_folder_publishes_on_success(tmp_path):
    final = tmp_path / "out" / "artifact"
    with atomic_folder(final) as tmp:
        assert tmp != final and tmp.parent == final.parent
        assert not final.exists()
        (tmp / "a.txt").write_text("hello")
    assert (final / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in final.parent.iterdir()) == ["artifact"]


def test_atomic_folder_leaves_nothing_when_body_raises(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_atomic_folder_refuses_existing_unless_replace(tmp_path):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(BadInput, match="already exists"):
        with atomic_folder(final) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]

    # replace=True, but the body fails: the old folder survives untouched
    with pytest.raises(RuntimeError):
        with atomic_folder(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]

    with atomic_folder(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_write_bytes_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"first")
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    write_json_atomic(tmp_path / "sub" / "data.json", {"a": [1, 2]})
    assert read_json(tmp_path / "sub" / "data.json") == {"a": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json", "file.bin"]


def test_write_bytes_atomic_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    write_bytes_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_read_json_errors(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{1:")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_edited_newest_line_or_manifest_fails_verification(registry):
    """The chain cannot vouch for its last line, so the manifest it names must."""
    manifest = registry.root / "v0000" / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b'"seeded-init"', b'"fedavg"'))
    with pytest.raises(VerifyFailed, match="v0000"):
        verify(registry)
    manifest.write_bytes(original)
    verify(registry)
    (registry.root / "LATEST").write_text("v0000\n")
    verify(registry)
