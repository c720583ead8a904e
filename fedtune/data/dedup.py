"""Duplicate removal: exact (hash of the normalized text) and near (MinHash signatures from rensa, banded LSH).

Signatures are computed in the worker processes, a batch at a time, with rensa's bulk digest. The band index
is built by sorting band hashes instead of holding a hash table per band: it needs 8 bytes per record and band
(rensa's own in-memory LSH index measured ~2.2 GB per million records here), so a multi-GB input dedups in
bounded memory. Every candidate pair that shares a band is confirmed by its estimated Jaccard similarity
(the fraction of equal signature entries) before anything is dropped; of each group of near-duplicates the
first record read is kept.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WORD = re.compile(r"\w+")
SEED = 1234  # fixed so that the same text gets the same signature on every site and run
WINDOW = 32  # earlier records of the same band bucket each record is compared with


def normalize(parts: list[str]) -> str:
    """Case-, accent-form- and whitespace-insensitive form of a record's contents."""
    return "\x1e".join(" ".join(unicodedata.normalize("NFKC", p).lower().split()) for p in parts)


def exact_key(normalized: str) -> int:
    """64-bit hash of the normalized text (signed, to fit an Arrow int64 column)."""
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little", signed=True)


def shingles(normalized: str, ngram: int) -> list[str]:
    """Word n-grams of a record (punctuation ignored); a record shorter than n words is one shingle."""
    words = _WORD.findall(normalized)
    if len(words) <= ngram:
        return [" ".join(words)]
    return list({" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)})


def signatures(texts: list[str], ngram: int, num_perm: int) -> list[list[int]]:
    """rensa MinHash signatures (num_perm uint32 each) of normalized texts."""
    from rensa import RMinHash

    matrix = RMinHash.digest_matrix_from_token_sets([shingles(t, ngram) for t in texts], num_perm, SEED)
    return matrix.to_rows()


def bands_for(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve midpoint (1/b)^(1/r) is closest to `threshold`, erring low
    so that a pair exactly at the threshold is found 9 times in 10 (more similar pairs almost surely)."""
    best = None
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        midpoint = (1 / bands) ** (1 / rows)
        recall = 1 - (1 - threshold**rows) ** bands  # chance a pair exactly at the threshold shares a band
        if recall >= 0.9 and (best is None or midpoint > best[0]):
            best = (midpoint, bands, rows)
    return (best[1], best[2]) if best else (num_perm, 1)


def _band_hashes(block: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per record and band (a multiply-add hash of the band's rows)."""
    mult = np.array([0x9E3779B97F4A7C15 * (2 * k + 1) & 0xFFFFFFFFFFFFFFFF for k in range(rows)], dtype=np.uint64)
    cube = block.astype(np.uint64).reshape(len(block), bands, rows)
    with np.errstate(over="ignore"):
        return (cube * mult).sum(axis=2, dtype=np.uint64)


def near_duplicates(sig: np.ndarray, positions: np.ndarray, threshold: float, chunk: int = 65536) -> np.ndarray:
    """Boolean mask over `positions`: True where that row is a near-duplicate of an earlier one.

    Args:
        sig: (rows, num_perm) uint32 signatures (a memmap works: it is read a chunk at a time).
        positions: the rows to compare, in reading order.
        threshold: Jaccard similarity at or above which two records are near-duplicates.
    """
    n, num_perm = len(positions), sig.shape[1]
    if n < 2:
        return np.zeros(n, dtype=bool)
    bands, rows = bands_for(threshold, num_perm)
    keys = np.empty((n, bands), dtype=np.uint64)
    for start in range(0, n, chunk):
        keys[start:start + chunk] = _band_hashes(np.asarray(sig[positions[start:start + chunk]]), bands, rows)

    # Candidate pairs: within each band, records with equal keys form a bucket (a stable sort keeps reading
    # order inside it). Each record is paired with the bucket's first record and with up to WINDOW records
    # just before it, so two near-duplicates behind a less similar first record are still compared, and a
    # huge bucket of templated records costs WINDOW comparisons per record, not its size.
    pairs = []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
        if not len(same):
            continue
        run_start = np.zeros(n, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        run_start[starts] = starts
        run_start = np.maximum.accumulate(run_start)
        pairs.append(np.stack([order[run_start[same]], order[same]], axis=1))
        for back in range(1, WINDOW + 1):
            behind = same[same - back > run_start[same]]
            if not len(behind):
                break
            pairs.append(np.stack([order[behind - back], order[behind]], axis=1))
    if not pairs:
        return np.zeros(n, dtype=bool)
    pairs = np.unique(np.concatenate(pairs), axis=0)

    # Confirm each candidate by its estimated similarity, a chunk of pairs at a time.
    confirmed = []
    for start in range(0, len(pairs), chunk):
        block = pairs[start:start + chunk]
        a, b = np.asarray(sig[positions[block[:, 0]]]), np.asarray(sig[positions[block[:, 1]]])
        similar = (a == b).mean(axis=1) >= threshold
        confirmed.append(block[similar])
    edges = np.concatenate(confirmed)

    # Union-find with the earliest row as each group's root: everything else in a group is dropped.
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    duplicate = np.zeros(n, dtype=bool)
    for node in np.unique(edges).tolist():
        duplicate[node] = root(node) != node
    return duplicate
