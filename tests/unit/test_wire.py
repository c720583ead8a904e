"""fedtune.wire under fuzzing: the safetensors header reader agrees with safetensors itself on every file it
accepts, the manifest parser raises nothing but WireError on any bytes, and no single-byte change to a signed
manifest is ever accepted as something it did not say."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from fedtune.config import FederationConfig
from fedtune.wire.codec import WireError, canonical_json, parse_json, printable
from fedtune.wire.keys import SIGNATURE_FILE, SigningKey
from fedtune.wire.manifests import UpdateManifest, VersionManifest, parse_manifest
from fedtune.wire.tensors import DTYPE_BYTES, read_header
from fedtune.wire.update import MANIFEST_FILE, encode_update, read_envelope, write_update

# No example database: nothing is written into the working tree, and each run draws afresh from the seed.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wire-fuzz")


# ---------------------------------------------------------------- safetensors headers

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
# Mostly ordinary names; now and then one no JSON reader should take (a lone surrogate) or a control character.
ODD_NAMES = ["\ud800", "a\udfff", "__metadata__", "", "\x1b[31m"]
NAMES = st.sampled_from([st.text(max_size=12)] * 7 + [st.sampled_from(ODD_NAMES)]).flatmap(lambda names: names)


def agrees_with_safetensors(folder: Path, blob: bytes, layout) -> None:
    """safetensors opens the file read_header accepted and sees the same keys, shapes and dtypes."""
    path = folder / "fuzz.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(layout)
        for name, (shape, dtype) in layout.items():
            piece = handle.get_slice(name)
            assert (tuple(piece.get_shape()), piece.get_dtype()) == (shape, dtype)
            assert tuple(handle.get_tensor(name).shape) == shape


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=10), max_size=5, unique=True))
    out = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        out[name] = torch.zeros(shape, dtype=draw(st.sampled_from(TORCH_DTYPES)))
    return out


@FUZZ
@given(tensor_dicts(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2))
def test_read_header_accepts_what_safetensors_writes(scratch, tensors, metadata):
    blob = save(tensors, metadata=metadata or None)
    layout = read_header(blob, len(blob))
    assert set(layout) == set(tensors)
    agrees_with_safetensors(scratch, blob, layout)


@st.composite
def headers(draw):
    """A safetensors file built piece by piece, each piece now and then wrong in a way a forger might choose."""
    count = draw(st.integers(0, 4))
    names = draw(st.lists(NAMES, min_size=count, max_size=count, unique=True))
    header: dict = {}
    sizes = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)) if draw(st.sampled_from([True] * 7 + [False])) else
                     st.one_of(st.sampled_from(["F128", "f32", "", "U16"]), st.integers(-1, 3), st.none(),
                               st.lists(st.just("F32"), max_size=1), st.dictionaries(st.just("a"), st.just("b"))))
        shape = draw(draw(st.sampled_from([
            st.lists(st.integers(0, 4), max_size=3)] * 3 + [
            # no elements, yet the product of the other sizes is past 64 bits
            st.lists(st.sampled_from([0, 2**39]), min_size=3, max_size=4),
            st.one_of(st.lists(st.sampled_from([0, 1, 2**40, 2**62, -1, True, 1.0, "2", None]), max_size=4),
                      st.integers(0, 3), st.none()),
        ])))
        valid = (isinstance(dtype, str) and dtype in DTYPE_BYTES and isinstance(shape, list)
                 and all(type(d) is int and d >= 0 for d in shape))
        size = math.prod(shape) * DTYPE_BYTES[dtype] if valid else draw(st.integers(0, 16))
        sizes.append(min(size, 1 << 12))
        header[name] = {"dtype": dtype, "shape": shape}
    # Offsets laid out in an order of their own, then perhaps disturbed.
    order = draw(st.permutations(range(count)))
    position = 0
    for index in order:
        header[names[index]]["data_offsets"] = [position, position + sizes[index]]
        position += sizes[index]
    for name in names:
        entry = header[name]
        how = draw(st.sampled_from(["keep"] * 24 + ["shift", "swap", "junk", "drop-key", "extra-key", "not-a-dict"]))
        if how == "shift":
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = [begin + draw(st.integers(-3, 3)), end + draw(st.integers(-3, 3))]
        elif how == "swap":
            entry["data_offsets"] = entry["data_offsets"][::-1]
        elif how == "junk":
            entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(-2, 2**64), max_size=3), st.text(max_size=3),
                                                   st.lists(st.booleans(), min_size=2, max_size=2)))
        elif how == "drop-key":
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif how == "extra-key":
            entry["extra"] = 1
        elif how == "not-a-dict":
            header[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just([1, 2])))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                                                st.dictionaries(st.text(max_size=4), st.integers(), min_size=1,
                                                                max_size=2),
                                                st.text(max_size=3), st.none()))
    ascii_only = draw(st.booleans())
    try:
        raw = json.dumps(header, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate can only travel escaped
        raw = json.dumps(header).encode("utf-8")
    raw = b" " * draw(st.integers(0, 2)) + raw + b" " * draw(st.integers(0, 8))
    body = bytes(draw(st.integers(0, 255)) for _ in range(min(position, 64))) + b"\0" * max(0, position - 64)
    body += b"\0" * draw(st.sampled_from([0] * 5 + [1, 4]))
    length = draw(st.sampled_from([len(raw)] * 16 + [len(raw) - 1, len(raw) + 1, 0, 2**63, 200 << 20]))
    blob = struct.pack("<Q", max(0, length)) + raw + body
    # A few raw byte changes anywhere in the file.
    for _ in range(draw(st.sampled_from([0] * 8 + [1, 2]))):
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:]
    if draw(st.sampled_from([False] * 9 + [True])):
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


@FUZZ
@given(st.one_of(headers(), st.binary(max_size=200)))
def test_read_header_refuses_with_wire_error_or_agrees_with_safetensors(scratch, blob):
    try:
        layout = read_header(blob, len(blob))
    except WireError:
        return
    agrees_with_safetensors(scratch, blob, layout)


def test_read_header_fuzz_reaches_both_outcomes():
    """The header strategy is not vacuous: it yields files read_header accepts and files it refuses."""
    outcomes = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(headers())
    def sample(blob):
        try:
            read_header(blob, len(blob))
            outcomes.add("accepted")
        except WireError:
            outcomes.add("refused")

    sample()
    assert outcomes == {"accepted", "refused"}


def test_read_header_refuses_a_dtype_that_is_not_a_string():
    raw = json.dumps({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    with pytest.raises(WireError, match="tensor t: unknown dtype"):
        read_header(blob, len(blob))


def test_read_header_refuses_a_shape_whose_sizes_overflow_before_its_zero():
    # No elements, but safetensors computes 2^39 · 2^39 first and refuses the file.
    raw = json.dumps({"t": {"dtype": "F32", "shape": [2**39, 2**39, 0], "data_offsets": [0, 0]}}).encode()
    blob = struct.pack("<Q", len(raw)) + raw
    with pytest.raises(WireError, match=r"tensor t: shape \[549755813888, 549755813888, 0\] holds more than 2\^40"):
        read_header(blob, len(blob))


# ---------------------------------------------------------------- manifests

def valid_update_fields(site: str = "dev") -> dict:
    return {
        "format": "fedtune.update/2", "site": site, "round": 1,
        "parent": {"version": "v0000", "sha256": "a" * 64},
        "base_model": {"id": "tiny", "sha256": "b" * 64},
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        "trained": "AB", "num_examples": 71, "num_tokens": 1198,
        "train": {"steps": 3, "lr": 0.01, "batch_size": 4, "grad_accum": 1, "loss_first": 6.0, "loss_last": 5.9,
                  "seconds": 0.9, "tokens_per_second": 416.0},
        "privacy": {"mechanism": None},
    }


def signed_update(folder: Path, key: SigningKey) -> Path:
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.arange(8.0).reshape(2, 4)}
    write_update(folder, encode_update(tensors, valid_update_fields(), {"r": 4}, key), replace=True)
    return folder


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def parsed_or_wire_error(data: bytes, model) -> None:
    """parse_manifest raises WireError or returns a manifest the coordinator can canonicalize and sign over."""
    try:
        signed, checked = parse_manifest(data, model, MANIFEST_FILE)
    except WireError as err:
        assert str(err).startswith(MANIFEST_FILE)
        return
    assert isinstance(checked, model)
    canonical_json(signed)


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())),
       st.sampled_from([UpdateManifest, VersionManifest]))
def test_parse_manifest_on_random_bytes_raises_only_wire_error(data, model):
    parsed_or_wire_error(data, model)


def full_manifest() -> dict:
    return {**valid_update_fields(), "sha256": "c" * 64, "nonce": "d" * 32, "fedtune_version": "0.1", "created": "now"}


MANIFEST_PATHS = [(key,) for key in full_manifest()] + [
    (outer, inner) for outer, value in full_manifest().items() if isinstance(value, dict) for inner in value]


@FUZZ
@given(st.sampled_from(MANIFEST_PATHS), st.sampled_from(["replace", "delete", "add"]), JSON_VALUES)
def test_parse_manifest_on_a_changed_field_raises_only_wire_error(path, how, value):
    manifest = full_manifest()
    target = manifest
    for part in path[:-1]:
        target = target[part]
    if how == "replace":
        target[path[-1]] = value
    elif how == "delete":
        del target[path[-1]]
    else:
        target[path[-1] + "_"] = value
    parsed_or_wire_error(json.dumps(manifest).encode(), UpdateManifest)


@FUZZ
@given(st.data())
def test_parse_manifest_on_mutated_bytes_raises_only_wire_error(data):
    blob = bytearray(json.dumps(full_manifest(), indent=2).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if action == "set":
            blob[at] = byte
        elif action == "insert":
            blob.insert(at, byte)
        else:
            del blob[at]
    parsed_or_wire_error(bytes(blob), UpdateManifest)


def test_parse_json_refuses_a_lone_surrogate_and_keeps_a_pair():
    with pytest.raises(WireError, match="lone surrogate"):
        parse_json(b'{"a": "x\\ud800y"}', "manifest.json")
    with pytest.raises(WireError, match="lone surrogate"):
        parse_json(b'[{"\\udfff": 1}]', "manifest.json")
    assert parse_json(b'{"a": "\\ud83d\\ude00"}', "manifest.json") == {"a": "\U0001f600"}
    assert parse_json(b'{"a": "\\\\ud800"}', "manifest.json") == {"a": "\\ud800"}  # an escaped backslash


def test_printable_is_bounded_and_free_of_control_characters():
    text = printable("\x1b" * 500, 64)
    assert len(text) <= 65 and "\x1b" not in text and text.endswith("…")
    assert printable("\U000e0001" * 10, 64).startswith("\\U000e0001")
    assert printable("plain", 64) == "plain"


# ---------------------------------------------------------------- signatures

@pytest.fixture(scope="module")
def signed_folder(scratch):
    key = SigningKey.generate()
    folder = signed_update(scratch / "signed" / "dev", key)
    config = FederationConfig(sites=[{"name": "dev", "key": key.public}])
    return folder, config, (folder / MANIFEST_FILE).read_bytes()


def accepted_content(folder: Path, config: FederationConfig) -> bytes | None:
    """The canonical manifest the coordinator would accept from `folder`, or None when it refuses it."""
    from fedtune.aggregate.validate import Rejected, check_signature

    try:
        envelope = read_envelope(folder)
        check_signature(envelope, config)
    except (WireError, Rejected):
        return None
    return canonical_json(envelope.signed)


def test_the_signed_manifest_is_accepted_as_sent(signed_folder):
    folder, config, original = signed_folder
    (folder / MANIFEST_FILE).write_bytes(original)
    assert accepted_content(folder, config) == canonical_json(json.loads(original))
    assert (folder / SIGNATURE_FILE).is_file()


@FUZZ
@given(st.data())
def test_no_single_byte_change_to_a_signed_manifest_is_accepted(signed_folder, data):
    folder, config, original = signed_folder
    at = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[at]))
    (folder / MANIFEST_FILE).write_bytes(original[:at] + bytes([byte]) + original[at + 1:])
    content = accepted_content(folder, config)
    # Refused, or only the layout changed (e.g. one whitespace for another): the content is what was signed.
    assert content is None or content == canonical_json(json.loads(original))


def test_every_position_of_a_signed_manifest_is_covered(signed_folder):
    """Each byte of the manifest flipped in turn: never accepted as a different manifest."""
    folder, config, original = signed_folder
    accepted = 0
    for at in range(len(original)):
        for flip in (0x01, 0x20):
            (folder / MANIFEST_FILE).write_bytes(original[:at] + bytes([original[at] ^ flip]) + original[at + 1:])
            content = accepted_content(folder, config)
            assert content is None or content == canonical_json(json.loads(original)), at
            accepted += content is not None
    assert accepted < len(original) // 10  # nearly every change is refused outright


def test_the_private_copy_falls_back_to_reading_when_the_kernel_cannot_copy(tmp_path, monkeypatch):
    """copy_file_range fails across some filesystems (EXDEV on old kernels): the copy is then read and written,
    and gives the same bytes, hash and layout."""
    import errno
    import hashlib

    import torch
    from safetensors.torch import save_file

    from fedtune.aggregate.updates import read_private_copy
    from fedtune.wire import update

    source = tmp_path / "adapter_model.safetensors"
    save_file({"x.lora_A.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(source))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert read_private_copy(source, tmp_path / "kernel", 1 << 20, None).sha256 == expected

    def cannot(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(update.os, "copy_file_range", cannot)
    read = read_private_copy(source, tmp_path / "read", 1 << 20, None)
    sha, layout = read.sha256, read.layout
    assert sha == expected and layout == {"x.lora_A.weight": ((3, 4), "F32")}
    assert (tmp_path / "read").read_bytes() == source.read_bytes()
