"""Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns the sum of the sites' updates, never
one site's.

Site u of the round's participants P sends, modulo 2^k, on fixed-point integers:

    y_u = x_u + PRG(b_u) + Σ_{v ∈ P, u < v} PRG(s_uv) − Σ_{v ∈ P, v < u} PRG(s_uv)

- s_uv, the pairwise seed, is HKDF-SHA256 of the X25519 agreement of u's and v's roster keys, salted with the
  federation, round and parent version, so every round has fresh seeds and a revealed seed opens nothing else.
  The pairwise masks cancel in the sum over P.
- b_u, the self-mask seed, is 256 bits from the operating system, fresh for every update and kept nowhere; it
  is Shamir-shared t-of-n among the participants, u included (pycryptodome, GF(2^128), two halves of 256 bits),
  each share encrypted to its holder with ChaCha20-Poly1305 under a second key HKDF derives from the same
  agreement (u's own share under its agreement with itself). No site ever reveals a whole seed: a seed is only
  ever rebuilt from t shares.
- PRG: the ChaCha20 keystream of a 256-bit seed (`cryptography`), read as k-bit words.

When a site drops before sending, the survivors reveal their pairwise seeds with it so its masks can be
removed; every survivor's self-mask is rebuilt from t shares, whether or not it answered itself. A site's
pairwise seeds with a dropped site and the shares of a survivor's self-mask are never both revealed: the unmask
request partitions the participants into survivors and dropped. To open one site's update, a coordinator needs
every other site to call it dropped (only each of them holds its pairwise seed with it) and t sites to call it a
survivor; a site answers one request per round and holds one share, so no story told to different sites gets
both — unless t − 1 sites collude with the coordinator (the site's own share then completes t).
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fedtune.errors import BadInput
from fedtune.wire.codec import canonical_json

PROTOCOL = "fedtune.secagg/1"
SEED_BYTES = 32
WEIGHT_KEY = "secagg.weight"  # the site's weight ω travels masked inside the vector, so only Σω is learnt
WORDS = {32: np.uint32, 64: np.uint64}
SIGNED = {32: np.int32, 64: np.int64}
SAFETENSORS_DTYPE = {32: "U32", 64: "U64"}
PRECISION_BITS = 24  # fractional bits every value keeps (a weight ω < 1 asks for log2(1/ω) more)
MAX_SCALE_BITS = 56
NOISE_RANGE = 10.0  # distributed DP: each coordinate's noise is clamped at ±10 std (a 1e-23 event)


@dataclass(frozen=True)
class RoundContext:
    """What every seed of a round is bound to."""

    federation: str
    round: int
    parent_version: str
    parent_sha256: str
    participants: tuple[str, ...]  # sorted roster names

    def salt(self) -> bytes:
        return hashlib.sha256(canonical_json({
            "protocol": PROTOCOL, "federation": self.federation, "round": self.round,
            "parent": {"version": self.parent_version, "sha256": self.parent_sha256},
            "participants": list(self.participants)})).digest()

    def share_index(self, holder: str) -> int:
        """The Shamir index of `holder`'s share of every self-mask seed: its place among the participants."""
        return self.participants.index(holder) + 1


@dataclass(frozen=True)
class Encoding:
    """Fixed point modulo 2^k: a value x is sent as round(x · 2^scale_bits), each coordinate clamped to ±bound,
    so the sum of every participant's values stays inside (−2^(k−1), 2^(k−1)) and never wraps."""

    modulus_bits: int
    scale_bits: int
    bound: float

    @property
    def word(self):
        return WORDS[self.modulus_bits]

    @property
    def step(self) -> float:
        return 2.0 ** -self.scale_bits

    def encode(self, values: np.ndarray, in_place: bool = False) -> np.ndarray:
        """k-bit words of `values`; in_place: scale a float64 array the caller no longer needs, sparing a copy."""
        scale = 2.0 ** self.scale_bits
        if in_place and values.dtype == np.float64:
            scaled = np.multiply(values, scale, out=values)
        else:
            scaled = np.multiply(values, scale, dtype=np.float64)
        np.clip(scaled, -self.bound * scale, self.bound * scale, out=scaled)
        np.rint(scaled, out=scaled)
        # in range by construction, so the signed cast is exact and its bits are the value modulo 2^k
        return scaled.astype(SIGNED[self.modulus_bits]).view(self.word)

    def decode(self, words: np.ndarray) -> np.ndarray:
        return np.multiply(words.view(SIGNED[self.modulus_bits]), self.step, dtype=np.float64)


def choose_encoding(participants: int, bound: float, precision: int = PRECISION_BITS) -> Encoding:
    """The smallest word (32 or 64 bits) whose sum of `participants` values in ±bound cannot wrap and keeps at
    least `precision` fractional bits (64 bits keeps what it can)."""
    for bits in (32, 64):
        # participants · (bound · 2^f + 1) < 2^(bits−1)
        room = 2.0 ** (bits - 1) / participants - 1
        scale = min(MAX_SCALE_BITS, math.floor(math.log2(room / bound))) if room > bound else -1
        if scale >= precision or (bits == 64 and scale >= 0):
            return Encoding(bits, scale, float(bound))
    raise BadInput(f"secure aggregation: values of ±{bound:g} from {participants} sites do not fit in 64 bits; "
                   "lower aggregation.clip_norm")


def default_threshold(participants: int) -> int:
    """t = ⌊n/2⌋ + 1: two groups the coordinator might tell different stories can never both reach it."""
    return participants // 2 + 1


# --- seeds ----------------------------------------------------------------------------------------------


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=salt, info=info).derive(secret)


def _pair_info(purpose: str, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return canonical_json({"protocol": PROTOCOL, "purpose": purpose, "pair": [low, high]})


def pair_seed(key, me: str, peer: str, peer_exchange_key: str, ctx: RoundContext, purpose: str = "mask") -> bytes:
    """s_{me,peer} (purpose "mask") or the key that encrypts the shares between them (purpose "share")."""
    return _hkdf(key.agree(peer_exchange_key, f"site {peer}'s exchange_key"), ctx.salt(), _pair_info(purpose, me, peer))


def commitment(seed: bytes) -> str:
    """A hiding commitment to a 256-bit random seed: what a reconstructed seed is checked against."""
    return hashlib.sha256(b"fedtune secagg seed commitment\0" + seed).hexdigest()


class Keystream:
    """The PRG: the ChaCha20 keystream of a 256-bit seed, read as `count` k-bit words. Its buffers are made once
    and reused for every seed (allocating and zeroing 67 MB per seed cost more than ChaCha20 itself)."""

    def __init__(self, count: int, bits: int):
        self.count, self.bits = count, bits
        size = count * bits // 8
        self._zeros = memoryview(bytes(size))
        self._out = bytearray(size + 64)

    def words(self, seed: bytes) -> np.ndarray:
        """The seed's words: a view of the shared buffer, valid until the next call."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update_into(self._zeros, self._out)
        return np.frombuffer(self._out, dtype=WORDS[self.bits], count=self.count)


def keystream(seed: bytes, count: int, bits: int) -> np.ndarray:
    """`count` k-bit words of the ChaCha20 keystream of `seed` (the PRG), in a buffer of their own."""
    return Keystream(count, bits).words(seed)


# --- shares ---------------------------------------------------------------------------------------------


def split_seed(seed: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir t-of-`holders` shares of a 256-bit seed: per holder, its index (2 bytes) and the two 16-byte shares
    of the seed's halves."""
    from Crypto.Protocol.SecretSharing import Shamir

    if not 1 < threshold <= holders:
        raise BadInput(f"secure aggregation: threshold {threshold} needs 2 ≤ t ≤ {holders} (the sites)")
    low = Shamir.split(threshold, holders, seed[:16])
    high = Shamir.split(threshold, holders, seed[16:])
    return [index.to_bytes(2, "big") + a + b for (index, a), (_same, b) in zip(low, high)]


def combine_seed(shares: list[bytes], threshold: int, expected: str) -> bytes | None:
    """The seed from `threshold` of its shares whose commitment is `expected`; other subsets are tried when one
    share is wrong. None when no subset (of the first 200 tried) matches."""
    from Crypto.Protocol.SecretSharing import Shamir

    parsed = [(int.from_bytes(s[:2], "big"), s[2:18], s[18:34]) for s in shares if len(s) == 34]
    for tried, subset in enumerate(combinations(parsed, threshold)):
        if tried >= 200:
            break
        if len({index for index, _, _ in subset}) < threshold or any(index == 0 for index, _, _ in subset):
            continue  # one point given twice (or the secret's own point) determines nothing
        seed = Shamir.combine([(i, a) for i, a, _ in subset]) + Shamir.combine([(i, b) for i, _, b in subset])
        if commitment(seed) == expected:
            return seed
    return None


def share_index(share: bytes) -> int:
    return int.from_bytes(share[:2], "big")


def _aad(ctx: RoundContext, sender: str, recipient: str) -> bytes:
    return canonical_json({"protocol": PROTOCOL, "salt": ctx.salt().hex(), "from": sender, "to": recipient})


def seal_share(share: bytes, share_key: bytes, ctx: RoundContext, sender: str, recipient: str) -> str:
    """A share encrypted to its holder (ChaCha20-Poly1305, random nonce), base64."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = secrets.token_bytes(12)
    sealed = ChaCha20Poly1305(share_key).encrypt(nonce, share, _aad(ctx, sender, recipient))
    return base64.b64encode(nonce + sealed).decode()


def open_share(sealed: str, share_key: bytes, ctx: RoundContext, sender: str, recipient: str) -> bytes | None:
    """The share, or None when it was not sealed for this holder in this round (or was altered)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    try:
        raw = base64.b64decode(sealed, validate=True)
        return ChaCha20Poly1305(share_key).decrypt(raw[:12], raw[12:], _aad(ctx, sender, recipient))
    except (InvalidTag, ValueError):
        return None


# --- masking --------------------------------------------------------------------------------------------


def flatten(tensors: dict, weight: float) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """The vector a site masks: its tensors in sorted key order, then its weight ω."""
    order = [(key, tuple(tensors[key].shape)) for key in sorted(tensors)]
    sizes = [int(np.prod(shape)) for _, shape in order]
    vector = np.empty(sum(sizes) + 1, dtype=np.float64)
    start = 0
    for (key, _), size in zip(order, sizes):
        value = tensors[key]
        vector[start:start + size] = (value.detach().cpu().numpy() if hasattr(value, "detach") else value).reshape(-1)
        start += size
    vector[-1] = weight
    return vector, order


def unflatten(vector: np.ndarray, order: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, shape in order:
        size = int(np.prod(shape)) if shape else 1
        out[key] = vector[start:start + size].reshape(shape)
        start += size
    out[WEIGHT_KEY] = vector[start:start + 1]
    return out


def add_masks(words: np.ndarray, me: str, self_seed: bytes, pair_seeds: dict[str, bytes], bits: int) -> np.ndarray:
    """y = x + PRG(b) + Σ_{v>me} PRG(s) − Σ_{v<me} PRG(s), in place modulo 2^k (numpy's unsigned words wrap)."""
    prg = Keystream(len(words), bits)
    words += prg.words(self_seed)
    for peer, seed in pair_seeds.items():
        if me < peer:
            words += prg.words(seed)
        else:
            words -= prg.words(seed)
    return words


def remove_masks(total: np.ndarray, self_seeds: dict[str, bytes], dropped_pairs: dict[tuple[str, str], bytes],
                 bits: int) -> np.ndarray:
    """The sum of the survivors' masked vectors, less their self-masks and the pairwise masks they shared with
    dropped sites (keys (survivor, dropped)), in place."""
    prg = Keystream(len(total), bits)
    for seed in self_seeds.values():
        total -= prg.words(seed)
    for (survivor, dropped), seed in dropped_pairs.items():
        if survivor < dropped:  # the survivor added it
            total -= prg.words(seed)
        else:
            total += prg.words(seed)
    return total


# --- the round's parameters, as sites and coordinator both derive them -------------------------------------


def value_bound(config) -> float:
    """The largest |value| of one coordinate a site sends: its clip norm (distributed DP: plus 10 noise stds,
    the noise clamped there at the site — post-processing, so the guarantee is unchanged)."""
    if config.privacy.mode == "distributed":
        from fedtune.privacy.dp_fedavg import site_noise_std

        return config.privacy.clip_norm + NOISE_RANGE * site_noise_std(config)
    return config.aggregation.clip_norm or config.security.max_update_norm


@dataclass(frozen=True)
class RoundPlan:
    ctx: RoundContext
    encoding: Encoding
    threshold: int

    def record(self) -> dict:
        """The part of an update manifest's `secagg` record every site of the round shares."""
        return {"protocol": PROTOCOL, "participants": list(self.ctx.participants), "threshold": self.threshold,
                "modulus_bits": self.encoding.modulus_bits, "scale_bits": self.encoding.scale_bits,
                "bound": self.encoding.bound}


def round_plan(config, parent: dict) -> RoundPlan:
    """The round after `parent`: its context (seeds' salt, participants), fixed-point encoding and threshold."""
    participants = tuple(sorted(config.site_names()))
    missing = [s.name for s in config.sites if not getattr(s, "exchange_key", None)]
    if missing:
        raise BadInput(f"privacy.secure_aggregation: site(s) {', '.join(missing)} have no exchange_key on the roster; "
                       "each makes a key pair with `fedtune keys new` and the coordinator adds its .pub with "
                       "`fedtune roster add`")
    ctx = RoundContext(config.name, parent["round"] + 1, parent["version"], parent["adapter_sha256"], participants)
    precision = PRECISION_BITS
    if config.privacy.mode != "distributed" and config.aggregation.weighting != "uniform":
        # A site's weight ω = count / secagg_max_count scales its values down: keep their precision.
        precision += math.ceil(math.log2(config.privacy.secagg_max_count))
    encoding = choose_encoding(len(participants), value_bound(config), precision)
    return RoundPlan(ctx, encoding, config.secagg_threshold())


def exchange_key(config, site: str) -> str:
    return next(s.exchange_key for s in config.sites if s.name == site)
