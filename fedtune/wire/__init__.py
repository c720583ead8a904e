"""Everything that crosses a boundary between parties, defined once: manifests as strict models, their
signatures, the bytes of an update and of a global version, and the LoRA key layout. The file transport
(folders) and a network transport use the same functions."""

from fedtune.wire.codec import WireError, canonical_json, printable
from fedtune.wire.keys import SIGNATURE_FILE, SigningKey, read_exchange_public_file, read_public_file, verify
from fedtune.wire.manifests import (
    UPDATE_FORMAT,
    VERSION_FORMAT,
    RosterEntry,
    UpdateManifest,
    VersionManifest,
)
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "SIGNATURE_FILE", "UPDATE_FORMAT", "VERSION_FORMAT", "RosterEntry",
           "SigningKey", "UpdateManifest", "VersionManifest", "WireError", "canonical_json", "printable",
           "read_exchange_public_file", "read_public_file", "verify"]
