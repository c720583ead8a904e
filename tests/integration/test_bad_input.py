"""Bad input through the CLI: exit code 2, one `error: …` line naming the file or key, nothing written."""

from __future__ import annotations

import shutil

import pytest

import fedkit
from conftest import run_cli, tree_digest


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A federation of clinic, bank and dev with round 1 trained, built once for the module."""
    return fedkit.build_world(tmp_path_factory.mktemp("bad-input"), tiny_model)


@pytest.fixture
def world(trained, tmp_path):
    return fedkit.clone_world(trained, tmp_path / "w")


def _state(world):
    return tree_digest(world.registry), fedkit.tree_entries(world.registry), fedkit.tree_entries(world.root)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: ")
    return lines[0]


def _aggregate(world, *extra, round_dir=None, config=None):
    return ["aggregate", "--config", config or world.config_path, "--registry", world.registry,
            "--updates", round_dir or world.round1, *extra]


def _expect_bad_input(world, args, capsys, *fragments):
    before = _state(world)
    code, _out, err = run_cli(args, capsys)
    assert code == 2, err
    line = _one_error_line(err)
    for fragment in fragments:
        assert fragment in line, line
    assert _state(world) == before
    return line


def test_prepare_with_a_missing_input_file(world, capsys):
    missing = world.root / "raw" / "clinic-typo.jsonl"
    out = world.root / "prepared-new" / "clinic"
    _expect_bad_input(world, ["prepare", "--config", world.config_path, "--site", "clinic", "--input", missing,
                              "--out", out], capsys, f"{missing}: input file not found")
    assert not out.exists() and not out.parent.exists()


def test_federation_file_with_an_unknown_key(world, capsys):
    bad = world.fed / "federation-bad.yaml"
    bad.write_text(world.config_path.read_text().replace("training:", "trainin:"))
    line = _expect_bad_input(world, _aggregate(world, config=bad), capsys, str(bad), "trainin: unknown key")
    assert "error: " + str(bad) in line


def test_federation_file_with_a_mistyped_value(world, capsys):
    bad = world.fed / "federation-bad.yaml"
    text = world.config_path.read_text()
    assert "  steps: 3\n" in text
    bad.write_text(text.replace("  steps: 3\n", "  steps: three\n"))
    updates = world.root / "updates-new"
    _expect_bad_input(world, ["train-local", "--config", bad, "--site", "clinic", "--data", world.prepared("clinic"),
                              "--global", world.registry, "--out", updates], capsys,
                      str(bad), "training.steps", "integer")
    assert not updates.exists()


def test_update_from_the_wrong_parent_strict(world, capsys):
    code, out, err = run_cli(_aggregate(world), capsys)
    assert code == 0 and "LATEST = v0001" in out, err
    round2 = world.updates / "round-0002"
    shutil.copytree(world.round1 / "dev", round2 / "dev")  # dev resends its round-1 update for round 2
    fedkit.forge_update(round2 / "dev", round=2)
    _expect_bad_input(world, _aggregate(world, "--strict", round_dir=round2), capsys,
                      str(round2 / "dev"), "replayed: its nonce belongs to an update already merged", "--strict")
    # With a fresh nonce its tensors are still those merged in round 1.
    fedkit.forge_update(round2 / "dev", nonce="ab" * 16)
    _expect_bad_input(world, _aggregate(world, "--strict", round_dir=round2), capsys,
                      str(round2 / "dev"), "replayed: these tensor bytes were already merged", "--strict")


@pytest.mark.parametrize("corruption,fragment", [
    ("wrong-base-model", "trained on another base model"),
    ("nan-tensor", "holds NaN or Inf"),
    ("shape-mismatch", "expected F32[4, 32]"),
    ("second-claim-on-site", "manifest.json names site 'clinic' but the folder is 'clinic-2'"),
    ("site-not-on-roster", "site 'mallory' is not on the roster"),
])
def test_invalid_update_under_strict(world, capsys, corruption, fragment):
    folder, _ = fedkit.CORRUPTIONS[corruption](world.round1)
    _expect_bad_input(world, _aggregate(world, "--strict"), capsys, str(world.round1 / folder), fragment)


def test_strict_error_counts_the_other_rejected_updates(world, capsys):
    fedkit.CORRUPTIONS["nan-tensor"](world.round1)
    fedkit.CORRUPTIONS["site-not-on-roster"](world.round1)  # moves dev to mallory: bank, clinic, mallory
    fedkit.forge_update(world.round1 / "bank", num_examples=-1)
    _expect_bad_input(world, _aggregate(world, "--strict"), capsys,
                      str(world.round1 / "bank"), "1 other update(s) also rejected")


def test_train_local_for_a_site_not_on_the_roster(world, capsys):
    updates = world.root / "updates-new"
    _expect_bad_input(world, ["train-local", "--config", world.config_path, "--site", "nobody",
                              "--data", world.prepared("clinic"), "--global", world.registry, "--out", updates],
                      capsys, "site 'nobody' is not on the roster", "sites:")
    assert not updates.exists()


def test_quorum_not_met(world, capsys):
    _expect_bad_input(world, _aggregate(world, "--quorum", "4"), capsys,
                      str(world.round1), "3 valid update(s), below the quorum of 4; nothing written")


def test_updates_for_another_round(world, capsys):
    wrong = world.updates / "round-0002"
    world.round1.rename(wrong)
    _expect_bad_input(world, _aggregate(world, round_dir=wrong), capsys,
                      str(wrong), "give updates/round-0001")


def test_non_strict_round_leaves_out_a_nan_update_and_says_so(world, capsys):
    fedkit.CORRUPTIONS["nan-tensor"](world.round1)
    code, out, err = run_cli(_aggregate(world, "--quorum", "2"), capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert str(world.round1 / "dev") in lines[0] and "NaN or Inf" in lines[0]
    assert "2 updates merged" in out and "1 rejected" in out and "LATEST = v0001" in out
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert len(manifest["rejected"]) == 1
    assert manifest["rejected"][0]["site"] == "dev" and "holds NaN or Inf" in manifest["rejected"][0]["reason"]
    assert sorted(c["site"] for c in manifest["contributors"]) == ["bank", "clinic"]
    assert (world.registry / "LATEST").read_text().strip() == "v0001"
