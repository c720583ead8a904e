"""What crosses the wire of a live federation, defined once: the Flower records of a train order (a global version's
files, or only its name and hash when the site holds it), of a site's update (the bytes of its update folder), of a
node's identity and of a site's refusal.

Every file travels as its raw bytes in one `Array` of an `ArrayRecord` (Flower cuts large ones into chunks), so a
site sends exactly the bytes `fedtune train-local` would write, and the coordinator writes exactly those. Whatever
arrives is checked here before use: a malformed record raises `WireError` naming the record and what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune.wire.codec import WireError, parse_json, printable
from fedtune.wire.keys import SIGNATURE_FILE
from fedtune.wire.manifests import SHA256, SITE_NAME, VERSION_NAME
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE
from fedtune.wire.update import MANIFEST_FILE, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, UpdateFiles
from fedtune.wire.version import SERVER_STATE_FILE

FORMAT = "fedtune.live/1"
TRAIN = "train"  # Flower's message types: the ClientApp registers one handler for each
QUERY = "query"

ORDER = "fedtune.order"  # ConfigRecord: round, version, adapter_sha256
VERSION = "fedtune.version"  # ArrayRecord: the version folder's files (absent when the site holds the version)
UPDATE = "fedtune.update"  # ConfigRecord: site, round
FILES = "fedtune.files"  # ArrayRecord: the update folder's files
IDENTITY = "fedtune.identity"  # ConfigRecord: site, public key, versions held
REFUSAL = "fedtune.refusal"  # ConfigRecord: why a site sends no update, and whether it needs the version's files

BYTES = "fedtune.bytes"  # the stype of an Array holding a file's raw bytes
VERSION_FILES = (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, SIGNATURE_FILE, SERVER_STATE_FILE)
NEEDS_VERSION = "needs-version"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class Order:
    """A train message: train round `round` from global version `version` (its adapter's sha256); `files` holds the
    version folder's files, or is None when the site said it holds that version."""

    round: int
    version: str
    adapter_sha256: str
    files: dict[str, bytes] | None


@dataclass
class Identity:
    """A node's answer to a query: the site it serves, its public key, the versions it holds (name → adapter sha256)."""

    site: str
    public_key: str | None
    versions: dict[str, str]


@dataclass
class Refusal:
    message: str
    kind: str  # "bad-input", "failed" or NEEDS_VERSION


# --- files as an ArrayRecord -------------------------------------------------------------------------------

def files_record(files: dict[str, bytes]) -> ArrayRecord:
    return ArrayRecord({name: Array(dtype="uint8", shape=(len(data),), stype=BYTES, data=bytes(data))
                        for name, data in files.items()})


def record_files(content: RecordDict, name: str) -> dict[str, bytes]:
    """The files an ArrayRecord of `content` carries, each name checked (a plain file name: nothing to traverse)."""
    record = _record(content, name, ArrayRecord)
    files = {}
    for key in record.keys():
        array = record[key]
        if not FILE_NAME.match(key):
            raise WireError(f"{name}: '{printable(key)}' is not a file name")
        if array.stype != BYTES or not isinstance(array.data, bytes):
            raise WireError(f"{name}: {key} is not a file's bytes (stype '{printable(array.stype)}', expected {BYTES})")
        files[key] = array.data
    return files


def payload_bytes(content: RecordDict) -> int:
    """The bytes of every file a message carries (what the federation's data costs on the wire)."""
    return sum(len(record[key].data) for record in content.array_records.values() for key in record.keys())


# --- train order (coordinator → site) ----------------------------------------------------------------------

def order_content(round: int, version: str, adapter_sha256: str, files: dict[str, bytes] | None) -> RecordDict:
    content = RecordDict({ORDER: ConfigRecord({"format": FORMAT, "round": round, "version": version,
                                                "adapter_sha256": adapter_sha256})})
    if files is not None:
        content[VERSION] = files_record(files)
    return content


def read_order(content: RecordDict) -> Order:
    fields = _config(content, ORDER, {"round": int, "version": str, "adapter_sha256": str})
    _match(ORDER, "version", fields["version"], VERSION_NAME)
    _match(ORDER, "adapter_sha256", fields["adapter_sha256"], SHA256)
    if fields["round"] < 1:
        raise WireError(f"{ORDER}: round {fields['round']} is not a round number")
    files = None
    if VERSION in content.array_records:
        files = record_files(content, VERSION)
        unknown = sorted(set(files) - set(VERSION_FILES))
        if unknown:
            raise WireError(f"{VERSION}: {printable(unknown[0])} is not a file of a global version")
        for needed in (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE):
            if needed not in files:
                raise WireError(f"{VERSION}: {needed} missing")
    return Order(fields["round"], fields["version"], fields["adapter_sha256"], files)


# --- update (site → coordinator) ---------------------------------------------------------------------------

def update_content(site: str, round: int, update: UpdateFiles) -> RecordDict:
    return RecordDict({UPDATE: ConfigRecord({"format": FORMAT, "site": site, "round": round}),
                       FILES: files_record(update.files())})


def read_update(content: RecordDict) -> tuple[str, int, UpdateFiles]:
    """(site, round, the update's files) of a site's reply. Only the envelope is read here; the aggregation stage
    checks the manifest, the signature and the tensors as it does for any update folder."""
    fields = _config(content, UPDATE, {"site": str, "round": int})
    _match(UPDATE, "site", fields["site"], SITE_NAME)
    files = record_files(content, FILES)
    for needed in (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE):
        if needed not in files:
            raise WireError(f"{FILES}: {needed} missing")
    if len(files[MANIFEST_FILE]) > MAX_MANIFEST_BYTES:
        raise WireError(f"{FILES}: {MANIFEST_FILE} is over the limit of {MAX_MANIFEST_BYTES} bytes")
    manifest = parse_json(files.pop(MANIFEST_FILE), f"{FILES}: {MANIFEST_FILE}")
    if not isinstance(manifest, dict):
        raise WireError(f"{FILES}: {MANIFEST_FILE} is not a JSON object")
    signature = None
    if SIGNATURE_FILE in files:
        raw = files.pop(SIGNATURE_FILE)
        if len(raw) > MAX_SIGNATURE_BYTES or not raw.isascii():
            raise WireError(f"{FILES}: {SIGNATURE_FILE} is not a signature line")
        signature = raw.decode("ascii").strip()
    update = UpdateFiles(manifest, files.pop(ADAPTER_FILE), files.pop(CONFIG_FILE), signature, files)
    return fields["site"], fields["round"], update


# --- identity (query) and refusal --------------------------------------------------------------------------

def identity_content(site: str, public_key: str | None, versions: dict[str, str]) -> RecordDict:
    return RecordDict({IDENTITY: ConfigRecord({"format": FORMAT, "site": site, "public_key": public_key or "",
                                               "versions": json.dumps(versions, sort_keys=True)})})


def read_identity(content: RecordDict) -> Identity:
    fields = _config(content, IDENTITY, {"site": str, "public_key": str, "versions": str})
    _match(IDENTITY, "site", fields["site"], SITE_NAME)
    versions = parse_json(fields["versions"].encode("utf-8"), f"{IDENTITY}: versions")
    if not isinstance(versions, dict) or not all(
            isinstance(k, str) and re.match(VERSION_NAME, k) and isinstance(v, str) and re.match(SHA256, v)
            for k, v in versions.items()):
        raise WireError(f"{IDENTITY}: versions is not a map of version names to sha256 values")
    return Identity(fields["site"], fields["public_key"] or None, versions)


def refusal_content(message: str, kind: str) -> RecordDict:
    return RecordDict({REFUSAL: ConfigRecord({"format": FORMAT, "message": message, "kind": kind})})


def read_refusal(content: RecordDict) -> Refusal | None:
    """The site's refusal a reply carries, or None when it carries none."""
    if REFUSAL not in content.config_records:
        return None
    fields = _config(content, REFUSAL, {"message": str, "kind": str})
    return Refusal(printable(fields["message"], 2000), printable(fields["kind"], 40))


# --- checks ------------------------------------------------------------------------------------------------

def _record(content: RecordDict, name: str, kind: type):
    if not isinstance(content, RecordDict):
        raise WireError(f"{name}: the message carries no records")
    found = content.get(name) if name in content else None
    if not isinstance(found, kind):
        raise WireError(f"{name}: record missing (the other side does not run a fedtune app of this format)")
    return found


def _config(content: RecordDict, name: str, expected: dict[str, type]) -> dict:
    record = _record(content, name, ConfigRecord)
    if record.get("format") != FORMAT:
        raise WireError(f"{name}: format '{printable(record.get('format'))}', expected {FORMAT} (both sides must "
                        "run the same fedtune release)")
    fields = {}
    for key, kind in expected.items():
        value = record.get(key)
        # bool is an int to Python, never a round number or a name here.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise WireError(f"{name}: {key} missing or not a {kind.__name__}")
        fields[key] = value
    return fields


def _match(record: str, key: str, value: str, pattern: str) -> None:
    if not re.match(pattern, value):
        raise WireError(f"{record}: {key} '{printable(value)}' is malformed")
