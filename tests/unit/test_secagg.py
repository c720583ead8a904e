"""Secure aggregation's building blocks: fixed point that cannot wrap, a PRG that uses every bit of its seed,
masks that cancel, Shamir shares that need t, and shares sealed to one holder."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedtune.errors import BadInput
from fedtune.privacy.secagg import (
    RoundContext,
    add_masks,
    choose_encoding,
    combine_seed,
    commitment,
    default_threshold,
    flatten,
    keystream,
    open_share,
    pair_seed,
    remove_masks,
    seal_share,
    split_seed,
    unflatten,
)
from fedtune.wire import SigningKey

CTX = RoundContext("fed", 3, "v0002", "ab" * 32, ("a", "b", "c", "d"))


@pytest.fixture(scope="module")
def keys():
    return {name: SigningKey.generate() for name in CTX.participants}


def test_fixed_point_sum_of_extremes_does_not_wrap():
    for sites, bound in ((3, 0.5), (16, 4.0), (1000, 1e4)):
        encoding = choose_encoding(sites, bound)
        top = encoding.encode(np.full(1, bound))
        total = np.zeros(1, dtype=encoding.word)
        for _ in range(sites):
            total += top
        assert encoding.decode(total)[0] == pytest.approx(sites * bound, rel=1e-6)
        total = np.zeros(1, dtype=encoding.word)
        for _ in range(sites):
            total += encoding.encode(np.full(1, -bound))
        assert encoding.decode(total)[0] == pytest.approx(-sites * bound, rel=1e-6)
    assert choose_encoding(3, 0.5).modulus_bits == 32
    assert choose_encoding(3, 1e4).modulus_bits == 64  # 32 bits would leave fewer than 24 fractional bits


def test_fixed_point_rounds_within_half_a_step_and_clamps():
    encoding = choose_encoding(5, 1.0)
    values = np.random.default_rng(0).uniform(-1, 1, 10_000)
    assert np.max(np.abs(encoding.decode(encoding.encode(values)) - values)) <= encoding.step / 2 + 1e-15
    assert encoding.decode(encoding.encode(np.array([7.0, -7.0]))).tolist() == [1.0, -1.0]


def test_the_prg_uses_all_256_bits_of_its_seed():
    """Seeds equal in their first 4 bytes (a 32-bit fold would make them one) give unrelated streams."""
    first = bytes(4) + os.urandom(28)
    second = bytes(4) + os.urandom(28)
    a, b = keystream(first, 4096, 32), keystream(second, 4096, 32)
    assert np.mean(a == b) < 0.01
    assert np.array_equal(a, keystream(first, 4096, 32))  # deterministic: both ends of a pair agree
    last_bit = bytearray(first)
    last_bit[-1] ^= 1
    assert np.mean(keystream(bytes(last_bit), 4096, 32) == a) < 0.01


def test_flowers_secaggplus_prg_folds_its_seed_to_32_bits():
    """The reference the README compares with: Flower's SecAgg+ XORs a seed's 4-byte words into one 32-bit
    value, so two different 32-byte seeds with the same fold give the same mask; fedtune's PRG tells them apart."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    first = os.urandom(32)
    words = bytearray(first)
    for i in (0, 4):  # flip the same bits in two of the 4-byte words: the XOR fold is unchanged
        words[i] ^= 0xA5
    second = bytes(words)
    assert first != second
    flower = [pseudo_rand_gen(seed, 1 << 30, [(4096,)])[0] for seed in (first, second)]
    assert np.array_equal(*flower)
    assert np.mean(keystream(first, 4096, 32) == keystream(second, 4096, 32)) < 0.01


def test_pairwise_masks_cancel_and_self_masks_come_off(keys):
    rng = np.random.default_rng(1)
    encoding = choose_encoding(len(CTX.participants), 1.0)
    values = {name: rng.uniform(-0.5, 0.5, 257) for name in CTX.participants}
    total = np.zeros(257, dtype=encoding.word)
    seeds = {}
    for name in CTX.participants:
        seeds[name] = os.urandom(32)
        pairs = {peer: pair_seed(keys[name], name, peer, keys[peer].exchange_public, CTX)
                 for peer in CTX.participants if peer != name}
        total += add_masks(encoding.encode(values[name]), name, seeds[name], pairs, encoding.modulus_bits)
    remove_masks(total, seeds, {}, encoding.modulus_bits)
    want = sum(values.values())
    assert np.max(np.abs(encoding.decode(total) - want)) <= 4 * encoding.step


def test_a_dropped_sites_pairwise_masks_come_off_with_the_survivors_seeds(keys):
    encoding = choose_encoding(len(CTX.participants), 1.0)
    values = {name: np.full(9, 0.25) for name in CTX.participants}
    survivors, dropped = ("a", "c", "d"), "b"
    total = np.zeros(9, dtype=encoding.word)
    seeds, revealed = {}, {}
    for name in survivors:
        seeds[name] = os.urandom(32)
        pairs = {peer: pair_seed(keys[name], name, peer, keys[peer].exchange_public, CTX)
                 for peer in CTX.participants if peer != name}
        total += add_masks(encoding.encode(values[name]), name, seeds[name], pairs, encoding.modulus_bits)
        revealed[(name, dropped)] = pairs[dropped]
    without = total.copy()
    remove_masks(without, seeds, {}, encoding.modulus_bits)
    # the dropped site's masks are still in: each word is uniform, so all 9 landing within 1 of the sum
    # happens with probability about (2/16)^9 (the decoded range is ±8 at this encoding)
    assert not np.allclose(encoding.decode(without), 0.75, atol=1)
    remove_masks(total, seeds, revealed, encoding.modulus_bits)
    assert np.allclose(encoding.decode(total), 0.75, atol=4 * encoding.step)


def test_seeds_are_bound_to_the_federation_round_pair_and_purpose(keys):
    later = RoundContext("fed", 4, "v0003", "cd" * 32, CTX.participants)
    other = RoundContext("other-fed", 3, "v0002", "ab" * 32, CTX.participants)
    seed = pair_seed(keys["a"], "a", "b", keys["b"].exchange_public, CTX)
    assert seed == pair_seed(keys["b"], "b", "a", keys["a"].exchange_public, CTX)
    assert len({seed, pair_seed(keys["a"], "a", "b", keys["b"].exchange_public, later),
                pair_seed(keys["a"], "a", "b", keys["b"].exchange_public, other),
                pair_seed(keys["a"], "a", "c", keys["c"].exchange_public, CTX),
                pair_seed(keys["a"], "a", "b", keys["b"].exchange_public, CTX, "share")}) == 5


def test_shamir_needs_t_shares_and_finds_a_consistent_subset():
    seed = os.urandom(32)
    shares = split_seed(seed, 3, 5)
    assert combine_seed(shares[:3], 3, commitment(seed)) == seed
    assert combine_seed(shares[2:], 3, commitment(seed)) == seed
    assert combine_seed(shares[:2] + shares[:1], 3, commitment(seed)) is None  # t−1 distinct shares
    bad = bytearray(shares[0])
    bad[5] ^= 0xFF
    assert combine_seed([bytes(bad)] + shares[1:4], 3, commitment(seed)) == seed  # a wrong share is outvoted
    with pytest.raises(BadInput):
        split_seed(seed, 1, 5)
    assert default_threshold(5) == 3 and default_threshold(4) == 3


def test_a_sealed_share_opens_only_for_its_holder_in_its_round(keys):
    share = split_seed(os.urandom(32), 2, 3)[0]
    key_ab = pair_seed(keys["a"], "a", "b", keys["b"].exchange_public, CTX, "share")
    sealed = seal_share(share, key_ab, CTX, "a", "b")
    assert open_share(sealed, pair_seed(keys["b"], "b", "a", keys["a"].exchange_public, CTX, "share"),
                      CTX, "a", "b") == share
    key_ac = pair_seed(keys["c"], "c", "a", keys["a"].exchange_public, CTX, "share")
    assert open_share(sealed, key_ac, CTX, "a", "c") is None  # another holder
    assert open_share(sealed, key_ab, CTX, "a", "c") is None  # re-addressed
    later = RoundContext("fed", 4, "v0003", "cd" * 32, CTX.participants)
    assert open_share(sealed, key_ab, later, "a", "b") is None  # replayed into another round
    tampered = sealed[:-4] + ("AAAA" if sealed[-4:] != "AAAA" else "BBBB")
    assert open_share(tampered, key_ab, CTX, "a", "b") is None


def test_flatten_round_trips_with_the_weight_last():
    import torch

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4)}
    vector, order = flatten(tensors, 0.25)
    assert vector[-1] == 0.25 and [k for k, _ in order] == ["a.weight", "b.weight"]
    back = unflatten(vector, order)
    assert np.array_equal(back["b.weight"], tensors["b.weight"].numpy())
    assert back["secagg.weight"].tolist() == [0.25]
