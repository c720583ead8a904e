"""X25519 key agreement beside each party's Ed25519 signing key: key files old and new, the .pub lines, the
shared secret secure aggregation derives its pairwise masks from, and the roster's exchange keys (their hash
and uniqueness). The command line over them: tests/integration/test_trust_cli.py."""

from __future__ import annotations

import base64
import hashlib
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fedtune.audit import change_roster
from fedtune.config import FederationConfig, parse_model
from fedtune.errors import BadInput
from fedtune.registry import roster_sha256, sites_sha256
from fedtune.wire import RosterEntry, read_exchange_public_file, read_public_file
from fedtune.wire.codec import canonical_json
from fedtune.wire.keys import SigningKey, parse_exchange_public

BEGIN = b"-----BEGIN PRIVATE KEY-----"


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _written(tmp_path, name: str = "site") -> tuple[SigningKey, object, object]:
    key = SigningKey.generate()
    private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
    key.write(private, public)
    return key, private, public


# --- key files ------------------------------------------------------------------------------------------


def test_a_new_key_pair_round_trips_with_both_keys(tmp_path):
    key, private, public = _written(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().count(BEGIN) == 2
    assert public.read_text().splitlines() == [key.public, key.exchange_public]
    assert key.public.startswith("ed25519:") and key.exchange_public.startswith("x25519:")
    loaded = SigningKey.load(private)
    assert (loaded.public, loaded.exchange_public) == (key.public, key.exchange_public)
    assert loaded.source == str(private)


def test_agree_is_symmetric_and_private_to_the_pair():
    alice, bob, carol = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    secret = alice.agree(bob.exchange_public, "bob")
    assert len(secret) == 32 and secret == bob.agree(alice.exchange_public, "alice")
    assert secret != alice.agree(carol.exchange_public, "carol")
    assert secret != carol.agree(bob.exchange_public, "bob")


def test_agree_survives_a_round_trip_through_the_files(tmp_path):
    alice, private, _ = _written(tmp_path, "alice")
    bob = SigningKey.generate()
    assert SigningKey.load(private).agree(bob.exchange_public) == bob.agree(alice.exchange_public)


def test_a_key_file_from_before_key_agreement_loads_and_cannot_agree(tmp_path):
    old = tmp_path / "old.key"
    signing = Ed25519PrivateKey.generate()
    old.write_bytes(_pem(signing))
    loaded = SigningKey.load(old)
    assert loaded.exchange_public is None
    assert loaded.public == SigningKey(signing).public
    with pytest.raises(BadInput) as info:
        loaded.agree(SigningKey.generate().exchange_public)
    assert str(info.value) == (f"{old}: holds no X25519 key-agreement key (secure aggregation needs one); make a "
                               "new key pair with `fedtune keys new` and put its .pub on the roster")
    # Such a key still signs what it signed before.
    assert loaded.sign(b"data") == SigningKey(signing).sign(b"data")


def test_a_key_without_an_exchange_part_writes_the_old_layout(tmp_path):
    key = SigningKey(Ed25519PrivateKey.generate())
    key.write(tmp_path / "old.key", tmp_path / "old.pub")
    assert (tmp_path / "old.key").read_bytes().count(BEGIN) == 1
    assert (tmp_path / "old.pub").read_text() == key.public + "\n"
    assert read_exchange_public_file(tmp_path / "old.pub") is None
    assert read_public_file(tmp_path / "old.pub") == key.public


def test_a_second_key_that_is_not_x25519_is_refused(tmp_path):
    path = tmp_path / "two-signing.key"
    path.write_bytes(_pem(Ed25519PrivateKey.generate()) + _pem(Ed25519PrivateKey.generate()))
    with pytest.raises(BadInput, match="its second key is not an X25519 key-agreement key"):
        SigningKey.load(path)


def test_a_damaged_second_key_is_refused(tmp_path):
    _, private, _ = _written(tmp_path)
    first, second = private.read_bytes().split(b"-----END PRIVATE KEY-----\n")[:2]
    begin, body = second.split(b"\n", 1)
    damaged = tmp_path / "damaged.key"
    damaged.write_bytes(first + b"-----END PRIVATE KEY-----\n" + begin + b"\n" + b"A" * (len(body) - 1)
                        + b"\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BadInput, match="not an unencrypted PEM private key"):
        SigningKey.load(damaged)


def test_the_first_key_must_still_be_ed25519(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    path = tmp_path / "x-only.key"
    path.write_bytes(X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(BadInput, match="not an Ed25519 key"):
        SigningKey.load(path)


def test_three_keys_in_one_file_are_refused(tmp_path):
    _, private, _ = _written(tmp_path)
    path = tmp_path / "three.key"
    path.write_bytes(private.read_bytes() + _pem(Ed25519PrivateKey.generate()))
    with pytest.raises(BadInput, match="holds 3 private keys"):
        SigningKey.load(path)


# --- public key lines -----------------------------------------------------------------------------------


def test_read_public_file_takes_each_line_of_a_two_line_pub(tmp_path):
    key, _, public = _written(tmp_path)
    assert read_public_file(public) == key.public
    assert read_exchange_public_file(public) == key.exchange_public
    # A value that is itself a key line is taken as is.
    assert read_public_file(key.public) == key.public
    assert read_exchange_public_file(key.exchange_public) == key.exchange_public
    assert read_exchange_public_file(key.public) is None


@pytest.mark.parametrize("lines,problem", [
    (lambda k, o: [k.public, k.exchange_public, o.public], "not a fedtune public key file"),
    (lambda k, o: [k.public, k.exchange_public, o.exchange_public], "not a fedtune public key file"),
    (lambda k, o: [k.exchange_public], "not a fedtune public key file"),
    (lambda k, o: [k.public, "x25519:short="], "not a fedtune public key file"),
    (lambda k, o: [k.public, k.exchange_public, "# comment"], "not a fedtune public key file"),
])
def test_a_pub_file_that_is_not_one_key_pair_is_refused(tmp_path, lines, problem):
    path = tmp_path / "odd.pub"
    path.write_text("\n".join(lines(SigningKey.generate(), SigningKey.generate())) + "\n")
    with pytest.raises(BadInput, match=problem):
        read_public_file(path)
    with pytest.raises(BadInput, match=problem):
        read_exchange_public_file(path)


def test_agree_refuses_a_bad_peer_line():
    key = SigningKey.generate()
    for line in (key.public, "x25519:" + "A" * 20 + "=", "", None):
        with pytest.raises(BadInput, match="bank: not a fedtune key-agreement key"):
            key.agree(line, "bank")
    with pytest.raises(BadInput, match="bank: not a fedtune key-agreement key"):
        parse_exchange_public(key.public, "bank")


def test_agree_refuses_a_low_order_point():
    """An all-zero secret is one every eavesdropper knows: it must never seed a mask."""
    zero = "x25519:" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(BadInput, match="^bank: X25519 key is a low-order point"):
        SigningKey.generate().agree(zero, "bank")


# --- the roster -----------------------------------------------------------------------------------------


def _old_hash(config: FederationConfig) -> str:
    """A roster's hash as fedtune logged it before exchange keys existed."""
    entries = [{"name": s.name, "lora_r": s.lora_r, "key": s.key} for s in config.sites]
    return hashlib.sha256(canonical_json(entries)).hexdigest()


def test_a_roster_without_exchange_keys_hashes_as_before():
    config = FederationConfig(sites=[{"name": "clinic", "key": SigningKey.generate().public},
                                     {"name": "bank", "lora_r": 2}])
    assert roster_sha256(config) == _old_hash(config)
    assert "exchange_key" not in config.model_dump(mode="json")["sites"][0]
    # An entry dict that spells out a null exchange key (hand-made or from a log) hashes the same.
    dumped = [{**s, "exchange_key": None} for s in config.model_dump(mode="json")["sites"]]
    assert sites_sha256(dumped) == _old_hash(config)


def test_an_exchange_key_is_part_of_the_roster_hash():
    key = SigningKey.generate()
    plain = FederationConfig(sites=[{"name": "clinic", "key": key.public}])
    full = FederationConfig(sites=[{"name": "clinic", "key": key.public, "exchange_key": key.exchange_public}])
    assert full.model_dump(mode="json")["sites"][0]["exchange_key"] == key.exchange_public
    assert roster_sha256(full) != roster_sha256(plain)
    assert roster_sha256(full) == sites_sha256(full.model_dump(mode="json")["sites"])


def test_a_roster_entry_takes_only_an_x25519_line():
    key = SigningKey.generate()
    assert RosterEntry(name="clinic", exchange_key=key.exchange_public).exchange_key == key.exchange_public
    with pytest.raises(ValidationError, match="exchange_key"):
        RosterEntry(name="clinic", exchange_key=key.public)


def test_two_sites_may_not_share_an_exchange_key():
    a, b = SigningKey.generate(), SigningKey.generate()
    sites = [{"name": "clinic", "key": a.public, "exchange_key": a.exchange_public},
             {"name": "bank", "key": b.public, "exchange_key": a.exchange_public}]
    with pytest.raises(BadInput, match="sites clinic and bank share one exchange key"):
        parse_model(FederationConfig, {"sites": sites}, "federation.yaml")
    sites[1]["exchange_key"] = b.exchange_public
    assert parse_model(FederationConfig, {"sites": sites}, "federation.yaml").sites[1].exchange_key == b.exchange_public


def test_two_sites_may_not_share_a_signing_key():
    a = SigningKey.generate()
    sites = [{"name": "clinic", "key": a.public}, {"name": "bank", "key": a.public}]
    with pytest.raises(BadInput, match="sites clinic and bank share one public key"):
        parse_model(FederationConfig, {"sites": sites}, "federation.yaml")


# --- roster changes -------------------------------------------------------------------------------------


def test_change_roster_takes_an_exchange_key_given_apart(federation, tmp_path):
    """A site added by its key lines (no .pub at hand) gets its exchange key on the roster and in the log."""
    _config, folder = federation
    eve = SigningKey.generate()
    changed = change_roster(folder / "federation.yaml", folder / "registry", "add", "eve", eve.public,
                            exchange_key=eve.exchange_public)
    assert changed.sites[-1].exchange_key == eve.exchange_public
    last = json.loads((folder / "registry" / "log.jsonl").read_text().splitlines()[-1])
    assert (last["key"], last["exchange_key"]) == (eve.public, eve.exchange_public)
    assert last["roster"][-1]["exchange_key"] == eve.exchange_public

    frank, other = _written(tmp_path, "frank")[0], SigningKey.generate()
    with pytest.raises(BadInput, match="its exchange key differs from the one given apart"):
        change_roster(folder / "federation.yaml", folder / "registry", "add", "frank", tmp_path / "frank.pub",
                      exchange_key=other.exchange_public)
    with pytest.raises(BadInput, match="holds no X25519 key line"):
        change_roster(folder / "federation.yaml", folder / "registry", "add", "frank", frank.public,
                      exchange_key=frank.public)
    with pytest.raises(BadInput, match="its exchange key is already site eve's"):
        change_roster(folder / "federation.yaml", folder / "registry", "add", "frank", frank.public,
                      exchange_key=eve.exchange_public)
    removed = change_roster(folder / "federation.yaml", folder / "registry", "remove", "eve")
    assert "eve" not in removed.site_names()
    last = json.loads((folder / "registry" / "log.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["exchange_key"]) == ("remove", eve.exchange_public)
