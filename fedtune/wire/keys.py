"""Party identities: every site and the coordinator sign what they send (Ed25519), and agree pairwise secrets
for secure aggregation's masks (X25519).

A private key is a PEM file readable by its owner only (mode 0600) holding the Ed25519 key, then the X25519 key
(a file from before key agreement holds the Ed25519 key alone). A public key file (NAME.pub) has one line per key,
`ed25519:<base64 of the 32 raw bytes>` then `x25519:<base64 of the 32 raw bytes>`, each short enough to paste into
federation.yaml. A signature file (`manifest.sig`) is one line, `ed25519:<base64 of the 64-byte signature>`.
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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedtune.errors import BadInput

PREFIX = "ed25519:"
PUBLIC_KEY_RE = r"^ed25519:[A-Za-z0-9+/]{43}=$"
EXCHANGE_PREFIX = "x25519:"
EXCHANGE_KEY_RE = r"^x25519:[A-Za-z0-9+/]{43}=$"
SIGNATURE_RE = re.compile(r"^ed25519:[A-Za-z0-9+/]{86}==$")
SIGNATURE_FILE = "manifest.sig"
MAX_KEY_FILE = 4096
PEM_BLOCK_RE = re.compile(rb"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----\s*", re.DOTALL)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """A party's private keys, loaded from its PEM file: the Ed25519 key that signs, and (from key files made
    since secure aggregation) the X25519 key that agrees pairwise mask secrets."""

    def __init__(self, key: Ed25519PrivateKey, source: str = "key", exchange: X25519PrivateKey | None = None):
        self._key = key
        self._exchange = exchange
        self.source = source

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), "new key", X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: key file not found; make one with `fedtune keys new --out DIR --name NAME`")
        data = path.read_bytes()[:MAX_KEY_FILE]
        # A file with no PKCS8 block (another PEM type, or no PEM at all) is refused by the loader, as before.
        blocks = PEM_BLOCK_RE.findall(data) or [data]
        if len(blocks) > 2:
            raise BadInput(f"{path}: holds {len(blocks)} private keys; fedtune keys new writes two (Ed25519, X25519)")
        key = _load_block(blocks[0], path)
        if not isinstance(key, Ed25519PrivateKey):
            raise BadInput(f"{path}: not an Ed25519 key (fedtune keys new writes one)")
        exchange = None
        if len(blocks) == 2:
            exchange = _load_block(blocks[1], path)
            if not isinstance(exchange, X25519PrivateKey):
                raise BadInput(f"{path}: its second key is not an X25519 key-agreement key "
                               "(fedtune keys new writes one)")
        return cls(key, str(path), exchange)

    @property
    def public(self) -> str:
        return PREFIX + _b64(_raw(self._key.public_key()))

    @property
    def exchange_public(self) -> str | None:
        """The X25519 public key line for the roster; None for a key file made before key agreement."""
        if self._exchange is None:
            return None
        return EXCHANGE_PREFIX + _b64(_raw(self._exchange.public_key()))

    def sign(self, data: bytes) -> str:
        return PREFIX + _b64(self._key.sign(data))

    def agree(self, peer_line: str, source: str = "key") -> bytes:
        """The raw 32-byte X25519 shared secret with the holder of `peer_line` (named `source` in errors); both
        sides derive the same bytes, which nobody else can."""
        if self._exchange is None:
            raise BadInput(f"{self.source}: holds no X25519 key-agreement key (secure aggregation needs one); make a "
                           "new key pair with `fedtune keys new` and put its .pub on the roster")
        peer = parse_exchange_public(peer_line, source)
        try:
            return self._exchange.exchange(peer)
        except ValueError:
            # A low-order point gives the all-zero secret, which an attacker knows as well: never a mask seed.
            raise BadInput(f"{source}: X25519 key is a low-order point (no shared secret); it is not a key "
                           "`fedtune keys new` writes") from None

    def write(self, private_path: Path, public_path: Path) -> None:
        """Write the PEM private keys (mode 0600, never replacing a file) and the public key lines."""
        pem = _pem(self._key) + (_pem(self._exchange) if self._exchange is not None else b"")
        lines = [self.public] + ([self.exchange_public] if self._exchange is not None else [])
        for path in (private_path, public_path):
            if path.exists():
                raise BadInput(f"{path}: already exists; a key is never overwritten (choose another --name or --out)")
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        public_path.write_text("".join(line + "\n" for line in lines), encoding="ascii")


def _load_block(block: bytes, path: Path) -> object:
    try:
        return serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError):
        raise BadInput(f"{path}: not an unencrypted PEM private key (fedtune keys new writes one)") from None


def parse_public(line: str, source: str) -> Ed25519PublicKey:
    """A public key line as written by `fedtune keys new`."""
    text = line.strip()
    if not re.match(PUBLIC_KEY_RE, text):
        raise BadInput(f"{source}: not a fedtune public key (expected one line 'ed25519:' + 44 base64 characters)")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len(PREFIX):]))


def parse_exchange_public(line: str, source: str) -> X25519PublicKey:
    """An X25519 public key line as written by `fedtune keys new` (the second line of NAME.pub)."""
    text = line.strip() if isinstance(line, str) else ""
    if not re.match(EXCHANGE_KEY_RE, text):
        raise BadInput(f"{source}: not a fedtune key-agreement key (expected one line 'x25519:' + 44 base64 "
                       "characters)")
    return X25519PublicKey.from_public_bytes(base64.b64decode(text[len(EXCHANGE_PREFIX):]))


def _read_public_lines(path: Path) -> tuple[str, str | None]:
    """A .pub file's Ed25519 line and its X25519 line (None in a file made before key agreement). Any other
    content is refused: which key goes on the roster must never be a guess."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: public key file not found (`fedtune keys new` writes NAME.pub)")
    text = path.read_text(encoding="ascii", errors="replace")[:MAX_KEY_FILE]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    signing = [line for line in lines if re.match(PUBLIC_KEY_RE, line)]
    exchange = [line for line in lines if re.match(EXCHANGE_KEY_RE, line)]
    if len(signing) != 1 or len(exchange) > 1 or len(signing) + len(exchange) != len(lines):
        raise BadInput(f"{path}: not a fedtune public key file (expected the lines `fedtune keys new` writes: "
                       "'ed25519:' + 44 base64 characters, then 'x25519:' + 44)")
    return signing[0], (exchange[0] if exchange else None)


def read_public_file(path: Path) -> str:
    """The Ed25519 key line of a .pub file (or the value itself when it is already a key line)."""
    text = str(path).strip()
    if re.match(PUBLIC_KEY_RE, text):
        return text
    return _read_public_lines(Path(path))[0]


def read_exchange_public_file(path: Path) -> str | None:
    """The X25519 key line of a .pub file (or the value itself when it is already one); None for a .pub file
    made before key agreement, which holds the Ed25519 line alone, and for a bare Ed25519 key line."""
    text = str(path).strip()
    if re.match(EXCHANGE_KEY_RE, text):
        return text
    if re.match(PUBLIC_KEY_RE, text):
        return None
    return _read_public_lines(Path(path))[1]


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
