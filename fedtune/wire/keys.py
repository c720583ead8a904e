"""Ed25519 identities: every site and the coordinator sign what they send.

A private key is a PEM file readable by its owner only (mode 0600); a public key is one line,
`ed25519:<base64 of the 32 raw bytes>`, short enough to paste into federation.yaml. A signature file
(`manifest.sig`) is one line, `ed25519:<base64 of the 64-byte signature>`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.errors import BadInput

PREFIX = "ed25519:"
PUBLIC_KEY_RE = r"^ed25519:[A-Za-z0-9+/]{43}=$"
SIGNATURE_RE = re.compile(r"^ed25519:[A-Za-z0-9+/]{86}==$")
SIGNATURE_FILE = "manifest.sig"
MAX_KEY_FILE = 4096


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class SigningKey:
    """A party's private key, loaded from its PEM file."""

    def __init__(self, key: Ed25519PrivateKey, source: str = "key"):
        self._key = key
        self.source = source

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), "new key")

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: key file not found; make one with `fedtune keys new --out DIR --name NAME`")
        data = path.read_bytes()[:MAX_KEY_FILE]
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise BadInput(f"{path}: not an unencrypted PEM private key (fedtune keys new writes one)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise BadInput(f"{path}: not an Ed25519 key (fedtune keys new writes one)")
        return cls(key, str(path))

    @property
    def public(self) -> str:
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PREFIX + _b64(raw)

    def sign(self, data: bytes) -> str:
        return PREFIX + _b64(self._key.sign(data))

    def write(self, private_path: Path, public_path: Path) -> None:
        """Write the PEM private key (mode 0600, never replacing a file) and the public key line."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        for path in (private_path, public_path):
            if path.exists():
                raise BadInput(f"{path}: already exists; a key is never overwritten (choose another --name or --out)")
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        public_path.write_text(self.public + "\n", encoding="ascii")


def parse_public(line: str, source: str) -> Ed25519PublicKey:
    """A public key line as written by `fedtune keys new`."""
    text = line.strip()
    if not re.match(PUBLIC_KEY_RE, text):
        raise BadInput(f"{source}: not a fedtune public key (expected one line 'ed25519:' + 44 base64 characters)")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len(PREFIX):]))


def read_public_file(path: Path) -> str:
    """The key line of a .pub file (or of the value itself when it is already a key line)."""
    text = str(path)
    if not re.match(PUBLIC_KEY_RE, text.strip()):
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: public key file not found (`fedtune keys new` writes NAME.pub)")
        text = path.read_text(encoding="ascii", errors="replace")[:MAX_KEY_FILE]
    parse_public(text, str(path))
    return text.strip()


def verify(public_line: str, data: bytes, signature_line: str) -> bool:
    """True when `signature_line` is the holder of `public_line`'s signature of `data`."""
    if not isinstance(signature_line, str) or not SIGNATURE_RE.match(signature_line.strip()):
        return False
    try:
        signature = base64.b64decode(signature_line.strip()[len(PREFIX):], validate=True)
        parse_public(public_line, "key").verify(signature, data)
        return True
    except (InvalidSignature, BadInput, binascii.Error, ValueError):
        return False
