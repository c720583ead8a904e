"""fedtune.live.records: what a live federation puts on the wire. Each record goes through the same deflate/inflate
Flower uses between processes (large files in 5 MB chunks), and comes back byte for byte; a malformed record is
refused with a WireError naming it, never a crash."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from fedtune.live import parse_event, event_line, records  # noqa: E402
from fedtune.wire import UPDATE_FORMAT, SigningKey, canonical_json  # noqa: E402
from fedtune.wire.codec import WireError  # noqa: E402
from fedtune.wire.update import UpdateFiles, encode_update  # noqa: E402


def over_the_wire(content: RecordDict) -> RecordDict:
    """The RecordDict as the receiving process rebuilds it from the objects Flower sends."""
    objects = get_all_nested_objects(content)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    return inflate_object_from_contents(content.object_id, contents)


@pytest.fixture
def update() -> UpdateFiles:
    import torch

    tensors = {"base_model.model.layers.0.q_proj.lora_B.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3)}
    fields = {
        "format": UPDATE_FORMAT, "site": "clinic", "round": 3,
        "parent": {"version": "v0002", "sha256": "a" * 64}, "base_model": {"id": "tiny", "sha256": "b" * 64},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, "trained": "AB", "num_examples": 7,
        "num_tokens": 70, "train": {"steps": 1, "lr": 0.1, "batch_size": 2, "grad_accum": 1, "loss_first": 1.5,
                                    "loss_last": 1.25, "seconds": 0.5, "tokens_per_second": 10.0},
        "privacy": {"mechanism": None},
    }
    return encode_update(tensors, fields, {"r": 4}, SigningKey.generate(), extra={"note.json": b"{}\n"})


def test_update_round_trip_keeps_every_byte(update):
    sent = records.update_content("clinic", 3, update)
    site, number, received = records.read_update(over_the_wire(sent))
    assert (site, number) == ("clinic", 3)
    assert received.files() == update.files()
    assert canonical_json(received.manifest) == canonical_json(update.manifest)


def test_a_large_file_crosses_in_chunks_unchanged():
    big = hashlib.sha256(b"seed").digest() * (12 * (1 << 20) // 32 + 5)  # ~12 MB: three of Flower's chunks
    files = {"adapter_model.safetensors": big, "adapter_config.json": b"{}", "manifest.json": b"{}"}
    order = records.read_order(over_the_wire(records.order_content(2, "v0001", "c" * 64, files)))
    assert order.files == files and (order.round, order.version, order.adapter_sha256) == (2, "v0001", "c" * 64)
    assert records.payload_bytes(records.order_content(2, "v0001", "c" * 64, files)) == len(big) + 4


def test_an_order_without_files_names_the_version_only():
    order = records.read_order(over_the_wire(records.order_content(1, "v0000", "d" * 64, None)))
    assert order.files is None and order.version == "v0000"


def test_identity_and_refusal_round_trip():
    identity = records.read_identity(over_the_wire(records.identity_content("bank", "ed25519:x", {"v0001": "e" * 64})))
    assert (identity.site, identity.public_key, identity.versions) == ("bank", "ed25519:x", {"v0001": "e" * 64})
    assert records.read_identity(records.identity_content("bank", None, {})).public_key is None
    refusal = records.read_refusal(over_the_wire(records.refusal_content("no data", records.NEEDS_VERSION)))
    assert (refusal.message, refusal.kind) == ("no data", records.NEEDS_VERSION)
    assert records.read_refusal(records.update_content("x", 1, UpdateFiles({}, b"", b"", None))) is None


def _files(files: dict[str, bytes]) -> ArrayRecord:
    return records.files_record(files)


def _update(config: dict | None = None, files: ArrayRecord | None = None) -> RecordDict:
    content = RecordDict({})
    if config is not None:
        content[records.UPDATE] = ConfigRecord(config)
    if files is not None:
        content[records.FILES] = files
    return content


GOOD = {"format": records.FORMAT, "site": "clinic", "round": 1}
FILES = {"adapter_model.safetensors": b"x", "adapter_config.json": b"{}", "manifest.json": b"{}"}


@pytest.mark.parametrize("content, message", [
    (RecordDict({}), "fedtune.update: record missing"),
    (_update({**GOOD, "format": "other/9"}, _files(FILES)), "format 'other/9', expected fedtune.live/1"),
    (_update({**GOOD, "round": "1"}, _files(FILES)), "fedtune.update: round missing or not a int"),
    (_update({**GOOD, "round": True}, _files(FILES)), "round missing or not a int"),
    (_update({**GOOD, "site": "../etc"}, _files(FILES)), "site '../etc' is malformed"),
    (_update(GOOD), "fedtune.files: record missing"),
    (_update(GOOD, _files({"adapter_config.json": b"{}", "manifest.json": b"{}"})), "adapter_model.safetensors missing"),
    (_update(GOOD, _files({**FILES, "manifest.json": b"{not json"})), "manifest.json: not valid JSON"),
    (_update(GOOD, _files({**FILES, "manifest.json": b"[1]"})), "manifest.json is not a JSON object"),
    (_update(GOOD, _files({**FILES, "manifest.json": b'{"a": 1, "a": 2}'})), "key 'a' appears twice"),
    (_update(GOOD, _files({**FILES, "manifest.sig": b"\xff" * 10})), "manifest.sig is not a signature line"),
    (_update(GOOD, ArrayRecord({"../../x": Array(dtype="uint8", shape=(1,), stype=records.BYTES, data=b"x")})),
     "'../../x' is not a file name"),
    (_update(GOOD, ArrayRecord({"adapter_model.safetensors": Array(dtype="float32", shape=(1,), stype="numpy.ndarray",
                                                                   data=b"\x00" * 4)})),
     "adapter_model.safetensors is not a file's bytes"),
])
def test_a_malformed_update_is_refused_with_its_reason(content, message):
    with pytest.raises(WireError) as caught:
        records.read_update(content)
    assert message in str(caught.value)


@pytest.mark.parametrize("config, files, message", [
    ({"format": records.FORMAT, "round": 0, "version": "v0000", "adapter_sha256": "a" * 64}, None, "round 0 is not"),
    ({"format": records.FORMAT, "round": 1, "version": "latest", "adapter_sha256": "a" * 64}, None,
     "version 'latest' is malformed"),
    ({"format": records.FORMAT, "round": 1, "version": "v0000", "adapter_sha256": "xyz"}, None,
     "adapter_sha256 'xyz' is malformed"),
    ({"format": records.FORMAT, "round": 1, "version": "v0000", "adapter_sha256": "a" * 64},
     {"adapter_model.safetensors": b"x", "adapter_config.json": b"{}"}, "fedtune.version: manifest.json missing"),
    ({"format": records.FORMAT, "round": 1, "version": "v0000", "adapter_sha256": "a" * 64},
     {"adapter_model.safetensors": b"x", "adapter_config.json": b"{}", "manifest.json": b"{}", "run.sh": b"rm"},
     "run.sh is not a file of a global version"),
])
def test_a_malformed_order_is_refused(config, files, message):
    content = RecordDict({records.ORDER: ConfigRecord(config)})
    if files is not None:
        content[records.VERSION] = records.files_record(files)
    with pytest.raises(WireError) as caught:
        records.read_order(content)
    assert message in str(caught.value)


def test_identity_with_bad_versions_is_refused():
    content = RecordDict({records.IDENTITY: ConfigRecord({"format": records.FORMAT, "site": "bank", "public_key": "",
                                                          "versions": json.dumps({"v1": "zz"})})})
    with pytest.raises(WireError, match="versions is not a map"):
        records.read_identity(content)


def test_event_lines_round_trip_and_other_lines_are_not_events():
    line = "INFO : " + event_line("round", round=2, version="v0002")
    assert parse_event(line) == {"event": "round", "round": 2, "version": "v0002"}
    assert parse_event("INFO : Starting logstream") is None
    assert parse_event("fedtune-live-event {not json") is None
