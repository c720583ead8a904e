"""A corpus of hostile updates, each sent in a real signed round through `fedtune aggregate`.

Every forgery is made with the real encoder and the sites' real keys, so the only thing wrong with it is the
thing the case puts there. Each case asserts the exact outcome: the update is left out with a reason that names
the file and what is wrong, the rest of the round is merged (or, with --strict, nothing is written), nothing
reaches the terminal raw, and no traceback.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedkit
import forge
from conftest import run_cli, tree_digest
from fedtune.wire.keys import SigningKey

ADAPTER = "adapter_model.safetensors"
OTHERS = ["bank", "clinic"]  # the honest sites of round 1 when dev is the hostile one


@pytest.fixture(scope="module")
def signed(tiny_model, tmp_path_factory):
    """clinic, bank and dev with keys on the roster and round 1 trained and signed, built once per module."""
    return fedkit.build_world(tmp_path_factory.mktemp("hostile"), tiny_model, keys=True)


@pytest.fixture
def world(signed, tmp_path):
    return fedkit.clone_world(signed, tmp_path / "w")


@pytest.fixture(scope="module")
def second_round(signed, tmp_path_factory):
    """The signed world with round 1 merged into v0001 and clinic and bank trained (signed) for round 2."""
    from fedtune.aggregate import aggregate_round
    from fedtune.train import train_local

    world = fedkit.clone_world(signed, tmp_path_factory.mktemp("hostile-round2") / "w")
    assert aggregate_round(world.config, world.registry, world.round1).version == "v0001"
    for site in OTHERS:
        train_local(world.config, site, world.prepared(site), world.registry, world.updates,
                    key=world.root / "keys" / f"{site}.key")
    return world


@pytest.fixture
def world2(second_round, tmp_path):
    return fedkit.clone_world(second_round, tmp_path / "w2")


# ---------------------------------------------------------------- running a round

def aggregate(world, capsys, *extra, round_dir=None):
    """`fedtune aggregate` in this process: (exit code, stdout, stderr); never a traceback, never a raw escape."""
    code, out, err = run_cli(["aggregate", "--config", world.config_path, "--registry", world.registry,
                              "--updates", round_dir or world.round1, *extra], capsys)
    assert "Traceback" not in out + err, err
    assert "\x1b" not in out + err, "a control character from an update reached the terminal"
    return code, out, err


def registry_state(world):
    return tree_digest(world.registry), fedkit.tree_entries(world.registry), (world.registry / "LATEST").read_text()


def assert_left_out(world, capsys, label, fragments, *, round_dir=None, version="v0001", others=OTHERS) -> dict:
    """The round is merged without the update recorded under `label`; returns the new version's manifest."""
    round_dir = round_dir or world.round1
    code, out, err = aggregate(world, capsys, round_dir=round_dir)
    assert code == 0, err
    assert f"LATEST = {version}" in out
    warnings = [line for line in err.splitlines() if ": rejected: " in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: {round_dir / label}: rejected: ")
    manifest = fedkit.read_manifest(world.registry / version)
    assert [r["site"] for r in manifest["rejected"]] == [label]
    reason = manifest["rejected"][0]["reason"]
    for fragment in fragments:
        assert fragment in reason, reason
        assert fragment in warnings[0]
    assert sorted(c["site"] for c in manifest["contributors"]) == others
    return manifest


def assert_strict_refuses(world, capsys, label, fragments):
    """--strict: one error line naming the update, exit 2, the registry untouched."""
    before = registry_state(world)
    code, out, err = aggregate(world, capsys, "--strict")
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {world.round1 / label}: ") and "--strict" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert registry_state(world) == before


# ---------------------------------------------------------------- the corpus
# Each case turns round-0001/dev into a hostile update and returns (folder recorded, fragments of the reason);
# the first fragment names the file.

def dev(world) -> Path:
    return world.round1 / "dev"


def key(world, site="dev") -> SigningKey:
    return forge.key_of(world.root, site)


def raw_adapter(world) -> tuple[dict, bytes]:
    return forge.split_safetensors((dev(world) / ADAPTER).read_bytes())


def tensor_keys(world) -> list[str]:
    header, _ = raw_adapter(world)
    return [k for k in header if k != "__metadata__"]


def with_header(world, header, body=None, length=None):
    _, real_body = raw_adapter(world)
    forge.with_raw_tensors(dev(world), key(world), forge.pack_safetensors(header, real_body if body is None else body,
                                                                        length))


def with_tensor_value(world, value, part="lora_B"):
    tensors = fedkit.load_tensors(dev(world))
    name = fedkit.first_key(dev(world), part)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    forge.reencode(dev(world), key(world), tensors)


# --- adapter_model.safetensors: the container

class Payload:
    """Unpickled, it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_renamed(world):
    # A torch pickle under the safetensors name, whose payload creates a file when unpickled.
    tensors = dict(fedkit.load_tensors(dev(world)))
    tensors["payload"] = Payload(world.root / "pwned")
    path = world.root / "payload.pt"
    torch.save(tensors, path)
    forge.with_raw_tensors(dev(world), key(world), path.read_bytes())
    path.unlink()
    return "dev", [f"{ADAPTER}: header claims", "past the file's end"]


def header_past_end(world):
    header, body = raw_adapter(world)
    size = len(forge.pack_safetensors(header, body))
    with_header(world, header, length=size + 100)
    return "dev", [f"{ADAPTER}: header claims {size + 100} bytes", "past the file's end"]


def header_200mb(world):
    header, _ = raw_adapter(world)
    with_header(world, header, length=200 << 20)
    return "dev", [f"{ADAPTER}: header claims 209715200 bytes"]


def header_not_json(world):
    with_header(world, b'{"base_model.lora_A.weight": {"dtype": "F32", ', body=b"\0" * 64)
    return "dev", [f"{ADAPTER} header: not valid JSON"]


def header_not_utf8(world):
    with_header(world, b'{"\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', body=b"\0" * 4)
    return "dev", [f"{ADAPTER} header: not UTF-8"]


def header_not_an_object(world):
    with_header(world, b"[1, 2, 3]", body=b"")
    return "dev", [f"{ADAPTER}: header is not a JSON object"]


def header_duplicate_key(world):
    header, _ = raw_adapter(world)
    first = tensor_keys(world)[0]
    raw = json.dumps(header, separators=(",", ":")).encode()
    duplicate = json.dumps({first: header[first]}, separators=(",", ":")).encode()[1:-1]
    with_header(world, b"{" + duplicate + b"," + raw[1:])
    return "dev", [f"{ADAPTER} header: key '{first}' appears twice"]


def offsets_overlap(world):
    header, _ = raw_adapter(world)
    names = tensor_keys(world)
    a0 = next(k for k in names if "layers.0" in k and "q_proj.lora_A" in k)
    a1 = next(k for k in names if "layers.1" in k and "q_proj.lora_A" in k)
    header[a1]["data_offsets"] = list(header[a0]["data_offsets"])  # same size, same bytes
    with_header(world, header)
    return "dev", [f"{ADAPTER}: tensor", "data overlaps the tensor before it"]


def offsets_out_of_range(world):
    header, body = raw_adapter(world)
    last = max(tensor_keys(world), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 64, end + 64]
    with_header(world, header)
    return "dev", [f"{ADAPTER}: tensor {last}: data_offsets [{begin + 64}, {end + 64}] run outside the {len(body)} "
                   "data bytes"]


def shape_not_bytes(world):
    header, _ = raw_adapter(world)
    name = next(k for k in tensor_keys(world) if header[k]["shape"] == [4, 32])
    header[name]["shape"] = [4, 31]
    with_header(world, header)
    return "dev", [f"{ADAPTER}: tensor {name}: F32[4, 31] needs 496 bytes, its offsets give 512"]


def bytes_after_last_tensor(world):
    header, body = raw_adapter(world)
    with_header(world, header, body=body + b"\0" * 16)
    return "dev", [f"{ADAPTER}: 16 bytes after the last tensor belong to none"]


def unknown_dtype(world):
    header, _ = raw_adapter(world)
    header[tensor_keys(world)[0]]["dtype"] = "F128"
    with_header(world, header)
    return "dev", [f"{ADAPTER}: tensor {tensor_keys(world)[0]}: unknown dtype F128"]


def dtype_not_a_string(world):
    header, _ = raw_adapter(world)
    header[tensor_keys(world)[0]]["dtype"] = ["F32"]
    with_header(world, header)
    return "dev", [f"{ADAPTER}: tensor {tensor_keys(world)[0]}: unknown dtype"]


def header_lone_surrogate(world):
    # Valid to Python's json, refused by the safetensors reader and by UTF-8 itself.
    header, _ = raw_adapter(world)
    raw = json.dumps(header, separators=(",", ":")).replace('"__metadata__":{"format":"pt"}',
                                                            '"__metadata__":{"format":"\\ud800"}')
    assert "\\ud800" in raw
    with_header(world, raw.encode())
    return "dev", [f"{ADAPTER} header: not valid JSON (a \\u escape of a lone surrogate"]


def empty_file(world):
    forge.with_raw_tensors(dev(world), key(world), b"")
    return "dev", [f"{ADAPTER}: 0 bytes, too short for a safetensors file"]


def tensors_missing(world):
    (dev(world) / ADAPTER).unlink()
    return "dev", [f"{ADAPTER}: missing"]


def tensors_link_to_another_site(world):
    # Points at clinic's file and names its sha256: the coordinator must not follow the link.
    target = world.round1 / "clinic" / ADAPTER
    (dev(world) / ADAPTER).unlink()
    (dev(world) / ADAPTER).symlink_to(target)
    forge.resign(dev(world), key(world), sha256=fedkit.sha256(target))
    return "dev", [f"{ADAPTER}: is a symbolic link"]


# --- adapter_model.safetensors: the tensors

def extra_key(world):
    tensors = fedkit.load_tensors(dev(world))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    forge.reencode(dev(world), key(world), tensors)
    return "dev", [f"{ADAPTER}: tensor keys differ", "unexpected: ['base_model.model.lm_head.lora_A.weight']"]


def escape_in_a_key(world):
    tensors = fedkit.load_tensors(dev(world))
    tensors["\x1b[31mred\x1b[0m"] = torch.zeros(2)
    forge.reencode(dev(world), key(world), tensors)
    return "dev", [f"{ADAPTER}: tensor keys differ", "\\x1b[31mred"]


def missing_key(world):
    tensors = fedkit.load_tensors(dev(world))
    gone = fedkit.first_key(dev(world))
    del tensors[gone]
    forge.reencode(dev(world), key(world), tensors)
    return "dev", [f"{ADAPTER}: tensor keys differ", f"missing: ['{gone}']"]


def wrong_rank(world):
    tensors = fedkit.load_tensors(dev(world))
    name = fedkit.first_key(dev(world), "lora_A")
    tensors[name] = torch.zeros(8, 32)
    forge.reencode(dev(world), key(world), tensors)
    return "dev", [f"{ADAPTER}: tensor {name} is F32[8, 32], expected F32[4, 32]"]


def wrong_dtype(world):
    tensors = {k: v.to(torch.bfloat16) for k, v in fedkit.load_tensors(dev(world)).items()}
    forge.reencode(dev(world), key(world), tensors)
    return "dev", [f"{ADAPTER}: tensor", "is BF16[", "expected F32["]


def nan_value(world):
    with_tensor_value(world, float("nan"))
    return "dev", [f"{ADAPTER}: tensor", "holds NaN or Inf"]


def inf_value(world):
    with_tensor_value(world, float("-inf"), part="lora_A")
    return "dev", [f"{ADAPTER}: tensor", "holds NaN or Inf"]


def value_1e30(world):
    with_tensor_value(world, 1e30)
    return "dev", [f"{ADAPTER}: the update's norm 1e+30 is beyond security.max_update_norm 10000"]


def value_3e38(world):
    with_tensor_value(world, 3e38)  # finite in float32, just below its largest value
    return "dev", [f"{ADAPTER}: the update's norm 3e+38 is beyond security.max_update_norm 10000"]


def tensors_changed_after_signing(world):
    data = bytearray((dev(world) / ADAPTER).read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the file still parses
    (dev(world) / ADAPTER).write_bytes(bytes(data))
    return "dev", [f"{ADAPTER}: does not match the sha256 in its manifest"]


# --- the folder

def folder_is_a_link(world):
    # The site's folder links to a valid update kept elsewhere.
    elsewhere = world.root / "elsewhere" / "dev"
    shutil.move(dev(world), elsewhere)
    dev(world).symlink_to(elsewhere, target_is_directory=True)
    return "dev", ["not a folder (a link", "each update is a folder"]


def folder_is_a_fifo(world):
    shutil.rmtree(dev(world))
    os.mkfifo(dev(world))
    return "dev", ["not a folder (a link, FIFO or device)", "each update is a folder"]


def folder_name_disagrees(world):
    dev(world).rename(world.round1 / "bank-2")
    return "bank-2", ["manifest.json names site 'dev' but the folder is 'bank-2'"]


def folder_name_escape(world):
    dev(world).rename(world.round1 / "dev\x1b[31m")
    return "dev\\x1b[31m", ["manifest.json names site 'dev' but the folder is 'dev\\x1b[31m'"]


def folder_name_not_utf8(world):
    os.rename(dev(world), os.fsencode(world.round1) + b"/dev\xff")
    return "dev\\udcff", ["manifest.json names site 'dev' but the folder is 'dev\\udcff'"]


# --- manifest.json

def site_with(value):
    def case(world):
        forge.resign(dev(world), key(world), site=value)
        return "dev", ["manifest.json: site: String should match pattern"]
    return case


def field_with(field, value, message):
    def case(world):
        forge.resign(dev(world), key(world), **{field: value})
        return "dev", [f"manifest.json: {message}"]
    return case


def field_missing(world):
    manifest = forge.manifest_of(dev(world))
    del manifest["nonce"]
    forge.sign(dev(world), manifest, key(world))
    return "dev", ["manifest.json: nonce: Field required"]


def unknown_field(world):
    forge.resign(dev(world), key(world), note="hello")
    return "dev", ["manifest.json: note: unknown field"]


def older_format(world):
    forge.resign(dev(world), key(world), format="fedtune.update/1")
    return "dev", ["manifest.json: format is fedtune.update/1, expected fedtune.update/2 (made by an older fedtune"]


def manifest_not_an_object(world):
    forge.sign(dev(world), [forge.manifest_of(dev(world))], key(world))
    return "dev", ["manifest.json: not a JSON object"]


def manifest_10mb_field(world):
    forge.resign(dev(world), key(world), created="A" * (10 << 20))
    return "dev", [f"manifest.json: {(dev(world) / 'manifest.json').stat().st_size} bytes, over the limit of 65536"]


def nested_manifest(world, depth: int) -> None:
    text = json.dumps(forge.manifest_of(dev(world)))
    (dev(world) / "manifest.json").write_text(text[:-1] + ', "privacy": ' + "[" * depth + "]" * depth + "}")


def manifest_nested_100k(world):
    nested_manifest(world, 100_000)  # 200 kB: the size cap refuses it before any parsing
    return "dev", [f"manifest.json: {(dev(world) / 'manifest.json').stat().st_size} bytes, over the limit of 65536"]


def manifest_nested_30k(world):
    nested_manifest(world, 30_000)  # 60 kB: under the size cap, so the parser meets the depth
    return "dev", ["manifest.json: nested too deeply"]


def number_5000_digits(world):
    text = (dev(world) / "manifest.json").read_text()
    count = forge.manifest_of(dev(world))["num_examples"]
    (dev(world) / "manifest.json").write_text(text.replace(f'"num_examples": {count}', '"num_examples": ' + "7" * 5000))
    return "dev", ["manifest.json: not valid JSON (Exceeds the limit (4300 digits)"]


def surrogate_in_manifest(world):
    text = (dev(world) / "manifest.json").read_text()
    (dev(world) / "manifest.json").write_text(text.replace('"fedtune_version": "', '"fedtune_version": "\\udc00'))
    return "dev", ["manifest.json: not valid JSON (a \\u escape of a lone surrogate"]


def manifest_missing(world):
    (dev(world) / "manifest.json").unlink()
    return "dev", ["manifest.json: missing"]


def manifest_link(world):
    (dev(world) / "manifest.json").unlink()
    (dev(world) / "manifest.json").symlink_to(world.round1 / "clinic" / "manifest.json")
    return "dev", ["manifest.json: is a symbolic link"]


def off_roster(world):
    # A stranger signing with a key of its own.
    dev(world).rename(world.round1 / "mallory")
    forge.resign(world.round1 / "mallory", SigningKey.generate(), site="mallory")
    return "mallory", ["manifest.json: site 'mallory' is not on the roster"]


def round_disagrees(world):
    forge.resign(dev(world), key(world), round=7)
    return "dev", ["manifest.json: update is for round 7, this round is 1"]


def other_base_model(world):
    manifest = forge.manifest_of(dev(world))
    forge.resign(dev(world), key(world), base_model={**manifest["base_model"], "sha256": "f" * 64})
    return "dev", ["manifest.json: trained on another base model (fingerprint differs)"]


def other_lora(world):
    manifest = forge.manifest_of(dev(world))
    forge.resign(dev(world), key(world), lora={**manifest["lora"], "alpha": 32.0})
    return "dev", ["manifest.json: LoRA settings (r 4, alpha 32.0) differ from the federation's"]


def parent_same_name_other_bytes(world):
    forge.resign(dev(world), key(world), parent={"version": "v0000", "sha256": "e" * 64})
    return "dev", ["manifest.json: trained from a different v0000 (its sha256 is not the registry's)"]


def parent_from_the_future(world):
    manifest = forge.manifest_of(dev(world))
    forge.resign(dev(world), key(world), parent={**manifest["parent"], "version": "v0003"})
    return "dev", ["manifest.json: trained from v0003, not from the current version v0000"]


# --- manifest.sig

def unsigned(world):
    (dev(world) / "manifest.sig").unlink()
    return "dev", ["manifest.sig: missing; updates must be signed"]


def signed_by(site_or_none):
    def case(world):
        signer = SigningKey.generate() if site_or_none is None else key(world, site_or_none)
        forge.resign(dev(world), signer)
        return "dev", ["manifest.sig: not a signature of this manifest by site 'dev''s key"]
    return case


def manifest_changed_after_signing(world):
    path = dev(world) / "manifest.json"
    count = forge.manifest_of(dev(world))["num_examples"]
    data = path.read_bytes()
    needle = f'"num_examples": {count}'.encode()
    at = data.index(needle) + len(needle) - 1
    path.write_bytes(data[:at] + bytes([ord("0") + (data[at] - ord("0") + 1) % 10]) + data[at + 1:])
    assert forge.manifest_of(dev(world))["num_examples"] != count
    return "dev", ["manifest.sig: not a signature of this manifest by site 'dev''s key"]


def signature_file(transform):
    def case(world):
        path = dev(world) / "manifest.sig"
        path.write_bytes(transform(path.read_bytes()))
        return "dev", ["manifest.sig: not a signature of this manifest by site 'dev''s key"]
    return case


def signature_hex(data: bytes) -> bytes:
    return base64.b64decode(data.strip()[len(b"ed25519:"):]).hex().encode() + b"\n"


def signature_oversized(world):
    (dev(world) / "manifest.sig").write_bytes(b"ed25519:" + b"A" * 10_000 + b"\n")
    return "dev", ["manifest.sig: 10009 bytes, over the limit of 256"]


def signature_link(world):
    (dev(world) / "manifest.sig").unlink()
    (dev(world) / "manifest.sig").symlink_to(world.round1 / "clinic" / "manifest.sig")
    return "dev", ["manifest.sig: is a symbolic link"]


CASES = {
    # adapter_model.safetensors: the container
    "pickle-renamed-safetensors": pickle_renamed,
    "header-length-past-file-end": header_past_end,
    "header-claims-200MB": header_200mb,
    "header-invalid-json": header_not_json,
    "header-invalid-utf8": header_not_utf8,
    "header-not-an-object": header_not_an_object,
    "header-duplicate-key": header_duplicate_key,
    "header-lone-surrogate": header_lone_surrogate,
    "offsets-overlap": offsets_overlap,
    "offsets-out-of-range": offsets_out_of_range,
    "shape-times-dtype-not-the-bytes": shape_not_bytes,
    "bytes-after-the-last-tensor": bytes_after_last_tensor,
    "unknown-dtype": unknown_dtype,
    "dtype-not-a-string": dtype_not_a_string,
    "empty-tensor-file": empty_file,
    "tensor-file-missing": tensors_missing,
    "tensor-file-links-to-another-site": tensors_link_to_another_site,
    # adapter_model.safetensors: the tensors
    "extra-key": extra_key,
    "escape-in-a-tensor-key": escape_in_a_key,
    "missing-key": missing_key,
    "wrong-rank": wrong_rank,
    "wrong-dtype": wrong_dtype,
    "nan": nan_value,
    "inf": inf_value,
    "value-1e30": value_1e30,
    "value-3e38": value_3e38,
    "tensor-byte-changed-after-signing": tensors_changed_after_signing,
    # the site's folder
    "site-folder-is-a-link": folder_is_a_link,
    "site-folder-is-a-fifo": folder_is_a_fifo,
    "folder-name-disagrees-with-manifest": folder_name_disagrees,
    "folder-name-with-an-escape": folder_name_escape,
    "folder-name-not-utf8": folder_name_not_utf8,
    # manifest.json
    "site-path-traversal": site_with("../x"),
    "site-with-nul": site_with("dev\x00"),
    "site-with-ansi-escape": site_with("\x1b[31mdev"),
    "round-as-string": field_with("round", "1", "round: Input should be a valid integer"),
    "num-examples-true": field_with("num_examples", True, "num_examples: Input should be a valid integer"),
    "num-examples-10^400": field_with("num_examples", 10**400,
                                      "num_examples: Input should be less than or equal to 1000000000000"),
    "field-missing": field_missing,
    "unknown-field": unknown_field,
    "older-format": older_format,
    "manifest-not-an-object": manifest_not_an_object,
    "manifest-10MB-field": manifest_10mb_field,
    "manifest-nested-100k-deep": manifest_nested_100k,
    "manifest-nested-30k-deep": manifest_nested_30k,
    "number-with-5000-digits": number_5000_digits,
    "lone-surrogate-in-manifest": surrogate_in_manifest,
    "manifest-missing": manifest_missing,
    "manifest-links-to-another-site": manifest_link,
    "site-not-on-roster": off_roster,
    "round-disagrees-with-folder": round_disagrees,
    "other-base-model": other_base_model,
    "other-lora-config": other_lora,
    "parent-same-name-other-bytes": parent_same_name_other_bytes,
    "parent-not-the-current-version": parent_from_the_future,
    # manifest.sig
    "unsigned": unsigned,
    "signed-by-another-site": signed_by("clinic"),
    "signed-by-a-random-key": signed_by(None),
    "manifest-byte-changed-after-signing": manifest_changed_after_signing,
    "signature-garbage": signature_file(lambda data: os.urandom(90)),
    "signature-truncated": signature_file(lambda data: data[:60] + b"\n"),
    "signature-hex-line": signature_file(signature_hex),
    "signature-without-prefix": signature_file(lambda data: data[len(b"ed25519:"):]),
    "signature-oversized": signature_oversized,
    "signature-links-to-another-site": signature_link,
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_update_is_left_out_and_the_round_merged(world, capsys, case):
    label, fragments = CASES[case](world)
    assert_left_out(world, capsys, label, fragments)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_update_under_strict_writes_nothing(world, capsys, case):
    label, fragments = CASES[case](world)
    assert_strict_refuses(world, capsys, label, fragments)


# ---------------------------------------------------------------- cases with more to check

def test_pickle_payload_is_never_unpickled(world, capsys):
    marker = world.root / "pwned"
    pickle_renamed(world)
    # The payload is live: unpickling a copy of it creates its file.
    probe = world.root / "probe.pt"
    shutil.copy(dev(world) / ADAPTER, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    assert_left_out(world, capsys, "dev", [f"{ADAPTER}: header claims"])
    assert not marker.exists()


def test_manifest_field_of_10mb_is_not_copied_anywhere(world, capsys):
    manifest_10mb_field(world)
    code, out, err = aggregate(world, capsys)
    assert code == 0 and "A" * 100 not in out + err
    assert len(err) < 2000
    version = (world.registry / "v0001" / "manifest.json").read_text()
    assert "A" * 100 not in version and len(version) < 20_000
    assert "A" * 100 not in (world.registry / "log.jsonl").read_text()


def _read_so_far() -> int:
    """Bytes this process has read through read(2) and friends (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _sparse(path: Path, size: int) -> Path:
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    assert path.stat().st_blocks * 512 < 1 << 20, "the file should be sparse"
    return path


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("where", ["tensors", "manifest-link", "manifest"])
def test_huge_sparse_files_are_refused_without_being_read(world, capsys, where):
    huge = dev(world) / ADAPTER if where == "tensors" else dev(world) / "manifest.json"
    huge.unlink()
    if where == "manifest-link":
        huge.symlink_to(_sparse(world.root / "huge.bin", 1 << 30))
        fragment = "manifest.json: is a symbolic link"
    else:
        _sparse(huge, (2 << 30) if where == "tensors" else (1 << 30))
        fragment = f"{huge.name}: {huge.stat().st_size} bytes, over the limit of"
    if where == "tensors":
        forge.resign(dev(world), key(world), sha256="0" * 64)
    peak, read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _read_so_far()

    assert_left_out(world, capsys, "dev", [fragment])

    assert _read_so_far() - read < 64 << 20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 256 << 20
    assert not any(p.name.endswith(".work") for p in world.registry.iterdir())


@pytest.mark.parametrize("name", [ADAPTER, "manifest.json", "manifest.sig"])
def test_fifo_in_place_of_a_file_does_not_hang(world, name):
    path = dev(world) / name
    path.unlink()
    os.mkfifo(path)
    command = [sys.executable, "-c", "from fedtune.cli import main; main()", "aggregate",
               "--config", str(world.config_path), "--registry", str(world.registry), "--updates", str(world.round1)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "LATEST = v0001" in done.stdout
    assert f"warning: {dev(world)}: rejected: {name}: not a regular file (a FIFO, device or folder)" in done.stderr
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert sorted(c["site"] for c in manifest["contributors"]) == OTHERS


def test_manifest_reformatted_without_changing_its_content_is_accepted(world, capsys):
    # The signature covers the manifest's content, not its layout: a control for the signature cases.
    manifest = forge.manifest_of(dev(world))
    (dev(world) / "manifest.json").write_text(json.dumps(dict(reversed(manifest.items())), indent=7))
    code, out, err = aggregate(world, capsys)
    assert code == 0 and "rejected" not in err, err
    contributors = fedkit.read_manifest(world.registry / "v0001")["contributors"]
    assert sorted(c["site"] for c in contributors) == ["bank", "clinic", "dev"]


def test_control_characters_in_free_text_fields_are_never_printed(world, capsys):
    # Signed, within their length caps, so accepted: the round must still print and record them escaped.
    forge.resign(dev(world), key(world), created="\x1b]0;owned\x07", fedtune_version="\x1b[2J\x1b[H")
    code, out, err = aggregate(world, capsys)  # asserts no raw escape on stdout or stderr
    assert code == 0 and "rejected" not in err, err
    version = (world.registry / "v0001" / "manifest.json").read_bytes()
    assert b"\x1b" not in version and b"\x07" not in version
    assert sorted(c["site"] for c in fedkit.read_manifest(world.registry / "v0001")["contributors"]) == [
        "bank", "clinic", "dev"]


def test_two_hostile_updates_leave_the_round_below_quorum(world, capsys):
    header_200mb(world)
    (world.round1 / "bank" / "manifest.sig").unlink()
    before = registry_state(world)
    code, out, err = aggregate(world, capsys)
    assert code == 2
    assert f"error: {world.round1}: 1 valid update(s), below the quorum of 2; nothing written (2 rejected)" in err
    assert err.count(": rejected: ") == 2
    assert registry_state(world) == before


def test_inflated_example_count_is_capped_at_max_weight(world, capsys):
    forge.resign(dev(world), key(world), num_examples=10**12)
    code, out, err = aggregate(world, capsys)
    assert code == 0 and "rejected" not in err, err
    manifest = fedkit.read_manifest(world.registry / "v0001")
    weights = {c["site"]: c["weight"] for c in manifest["contributors"]}
    assert manifest["params"]["max_weight"] == 0.5
    assert weights["dev"] == pytest.approx(0.5)
    counts = {s: fedkit.read_manifest(world.round1 / s)["num_examples"] for s in OTHERS}
    for site in OTHERS:  # the rest shared in proportion to their own counts
        assert weights[site] == pytest.approx(0.5 * counts[site] / sum(counts.values()), abs=1e-7)


def test_equivocation_rejects_both_and_is_recorded(world, capsys):
    second = world.round1 / "dev-2"
    shutil.copytree(dev(world), second)
    tensors = {k: v * 0.5 for k, v in fedkit.load_tensors(second).items()}
    forge.reencode(second, key(world), tensors)  # manifest still names site dev, signed by dev
    shas = [forge.manifest_of(folder)["sha256"] for folder in (dev(world), second)]
    assert shas[0] != shas[1]

    code, out, err = aggregate(world, capsys)
    assert code == 0, err
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert sorted(c["site"] for c in manifest["contributors"]) == OTHERS
    assert manifest["rejected"] == [
        {"site": "dev", "reason": "equivocation: site 'dev' signed two different updates this round (also in dev-2); "
                                  "both are rejected"},
        {"site": "dev-2", "reason": "equivocation: site 'dev' signed two different updates this round (also in dev); "
                                    "both are rejected"},
    ]
    assert manifest["equivocations"] == [{"site": "dev", "updates": shas, "folders": ["dev", "dev-2"]}]
    assert json.loads((world.registry / "log.jsonl").read_text().splitlines()[-1])["equivocations"] == 1


def test_equivocation_across_many_long_folder_names_is_recorded_within_bounds(world, capsys):
    tensors = fedkit.load_tensors(dev(world))
    for index in range(20):
        folder = world.round1 / (f"dev-{index:02d}-" + "x" * 200)
        shutil.copytree(dev(world), folder)
        forge.reencode(folder, key(world), {k: v * (index + 2) / 10 for k, v in tensors.items()})
    code, out, err = aggregate(world, capsys)
    assert code == 0, err
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert sorted(c["site"] for c in manifest["contributors"]) == OTHERS
    assert len(manifest["rejected"]) == 21
    assert all(r["reason"].startswith("equivocation: site 'dev'") and r["reason"].endswith("all 21 are rejected")
               and "and 17 more" in r["reason"] for r in manifest["rejected"])
    [event] = manifest["equivocations"]
    assert event["site"] == "dev" and len(event["updates"]) == 21 and len(set(event["updates"])) == 21


# ---------------------------------------------------------------- replays across rounds

def round2(world) -> Path:
    return world.updates / "round-0002"


def test_replay_edited_and_resigned_is_rejected_by_its_hash(world2, capsys):
    replay = round2(world2) / "dev"
    shutil.copytree(world2.round1 / "dev", replay)
    v1 = fedkit.sha256(world2.registry / "v0001" / ADAPTER)
    manifest = forge.manifest_of(replay)
    forge.resign(replay, key(world2), round=2, parent={"version": "v0001", "sha256": v1}, nonce=os.urandom(16).hex())
    assert forge.manifest_of(replay)["sha256"] == manifest["sha256"]
    assert_left_out(world2, capsys, "dev", ["replayed: these tensor bytes were already merged in an earlier round"],
                    round_dir=round2(world2), version="v0002")


def test_replay_keeping_its_nonce_is_rejected_by_its_nonce(world2, capsys):
    replay = round2(world2) / "dev"
    shutil.copytree(world2.round1 / "dev", replay)
    v1 = fedkit.sha256(world2.registry / "v0001" / ADAPTER)
    forge.reencode(replay, key(world2), {k: v * 0.9 for k, v in fedkit.load_tensors(replay).items()}, round=2,
                   parent={"version": "v0001", "sha256": v1})
    forge.resign(replay, key(world2), nonce=forge.manifest_of(world2.round1 / "dev")["nonce"])
    assert_left_out(world2, capsys, "dev", ["replayed: its nonce belongs to an update already merged"],
                    round_dir=round2(world2), version="v0002")


def test_replay_unchanged_is_rejected_for_its_round(world2, capsys):
    shutil.copytree(world2.round1 / "dev", round2(world2) / "dev")
    assert_left_out(world2, capsys, "dev", ["manifest.json: update is for round 1, this round is 2"],
                    round_dir=round2(world2), version="v0002")


def test_replay_unchanged_with_the_round_edited_is_rejected_for_its_parent(world2, capsys):
    replay = round2(world2) / "dev"
    shutil.copytree(world2.round1 / "dev", replay)
    forge.reencode(replay, key(world2), {k: v * 0.9 for k, v in fedkit.load_tensors(replay).items()}, round=2)
    assert_left_out(world2, capsys, "dev", ["manifest.json: trained from v0000, not from the current version v0001"],
                    round_dir=round2(world2), version="v0002")


def test_another_sites_old_update_resigned_under_a_new_name_is_rejected(world2, capsys):
    stolen = round2(world2) / "dev"
    shutil.copytree(world2.round1 / "clinic", stolen)
    v1 = fedkit.sha256(world2.registry / "v0001" / ADAPTER)
    forge.resign(stolen, key(world2), site="dev", round=2, parent={"version": "v0001", "sha256": v1},
                 nonce=os.urandom(16).hex())
    assert_left_out(world2, capsys, "dev", ["replayed: these tensor bytes were already merged in an earlier round"],
                    round_dir=round2(world2), version="v0002")


def test_copy_of_another_sites_update_this_round_counts_for_neither(world, capsys):
    copy = dev(world)
    shutil.rmtree(copy)
    shutil.copytree(world.round1 / "clinic", copy)
    forge.resign(copy, key(world), site="dev", nonce=os.urandom(16).hex())
    code, out, err = aggregate(world, capsys, "--quorum", "1")
    assert code == 0, err
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert [c["site"] for c in manifest["contributors"]] == ["bank"]
    assert {r["site"]: r["reason"] for r in manifest["rejected"]} == {
        "clinic": "replayed: the same update as dev's this round",
        "dev": "replayed: the same update as clinic's this round",
    }
