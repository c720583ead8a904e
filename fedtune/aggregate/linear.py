"""The linear rules' merge without torch: Σ_k c_k·δ_k over the round's private copies and, in the same read, the
Gram matrix of the clipped deltas (for the contribution records, or for the rules that choose their
coefficients from it).

FedAvg, FFA, Krum, the geometric median and centered clipping merge whole updates linearly
(`base.LinearMethod`). When the step is plain (no server optimizer), no central noise is added and the parent's
tensors are float32, float16 or float64, this is how their round is merged: every key is read a block of rows at
a time from every site, and two matrix products of the block give its inner products and its weighted sum, so
each byte is read once. The sum is rounded to the parent's dtype once, after the parent is added. Otherwise
`merge.merge_updates` (torch) merges the round. The factor-averaging error is measured here too (numpy), so a
FedAvg round never loads torch."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from fedtune.aggregate.base import LinearMethod, Method
from fedtune.aggregate.bounds import array_norm
from fedtune.aggregate.updates import PrivateTensors
from fedtune.wire.tensors import ADAPTER_FILE, Layout, factor_of, lora_layers, rank_slice

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
# Bytes of one block: rows of one key from every site, multiplied at once.
BLOCK_BYTES = 8 << 20


def applies(rule: Method, plain_step: bool, noise, layout: Layout) -> bool:
    """Whether `merge_linear` merges this round (else the torch merge does)."""
    return (isinstance(rule, LinearMethod) and plain_step and noise is None
            and all(dtype in NUMPY_DTYPES for _, dtype in layout.values()))


def target_shape(shape: tuple[int, ...], key: str, rank: int) -> tuple[int, ...]:
    """A parent tensor's shape at the federation's rank (its first `rank` components, as `rank_slice`)."""
    factor = factor_of(key)
    if factor == "A":
        return (min(rank, shape[0]), *shape[1:])
    if factor == "B":
        return (shape[0], min(rank, shape[1]), *shape[2:])
    return shape


def merge_linear(rule: LinearMethod, valid: list, parent_dir: Path, layout: Layout, weights: np.ndarray,
                 scale: np.ndarray, rank: int, record: dict, want_gram: bool, threads: int = 1) -> dict[str, np.ndarray]:
    """The next version's tensors: parent (at the federation's rank) + Σ_k c_k δ_k, with c = the rule's
    coefficients × the clipping factors `scale`, read on `threads` threads. `record` receives "coefficients",
    "parent_norm" and, with `want_gram`, "gram": the [K, K] inner products of the clipped deltas."""
    targets = {key: target_shape(shape, key, rank) for key, (shape, _) in layout.items()}
    sites = [PrivateTensors(update.tensors, update.spans) for update in valid]
    try:
        sent = [update.keys for update in valid]
        clipped = np.outer(scale, scale)
        if rule.needs_gram:
            # The coefficients are chosen from the inner products (distances between updates): those are taken in
            # float64 in a first pass, and the weighted sum in a second.
            _, gram = _read_round(sites, sent, targets, None, True, threads, np.float64)
            gram = gram * clipped
            coefficients = rule.coefficients(weights, gram) * scale
            sums, _ = _read_round(sites, sent, targets, coefficients, False, threads, np.float32)
        else:
            coefficients = rule.coefficients(weights, None) * scale
            sums, gram = _read_round(sites, sent, targets, coefficients, want_gram, threads, np.float32)
            gram = gram * clipped if gram is not None else None
    finally:
        for site in sites:
            site.close()
    record["coefficients"] = coefficients
    if gram is not None and want_gram:
        record["gram"] = gram
    merged, square = {}, 0.0
    with PrivateTensors(parent_dir / ADAPTER_FILE) as parent:
        for key, (_, dtype) in layout.items():
            start = parent.tensor(key)
            square += array_norm(start) ** 2
            merged[key] = (rank_slice(start, key, rank) + sums.pop(key)).astype(NUMPY_DTYPES[dtype], copy=False)
    record["parent_norm"] = math.sqrt(square)  # for check_merged, which would read the parent again
    return merged


def _read_round(sites: list[PrivateTensors], sent: list[set[str]], targets: dict[str, tuple[int, ...]],
                coefficients: np.ndarray | None, want_gram: bool, threads: int, precision: type):
    """(Σ_k c_k δ_k per key, float32 — or None without coefficients; the [K, K] Gram matrix of the unclipped deltas
    — or None), from one read of every site's tensors. A site that did not send a key (FFA's frozen A) counts as
    zeros there; a smaller rank is zero-padded.

    Each block of rows is multiplied in `precision`. In float32 (the weighted sum, as every FedAvg sums; the Gram
    matrix for the contribution records) a float32 update is read straight into the block, and each block's
    inner products are added up in float64: on 16 real updates of 78 MB they were within 3e-8 of float64's,
    relative to the norms. In float64 (the rules that choose by distance) every value is widened first.

    `threads` workers, BLAS on one thread in each, take the keys one at a time from a shared counter: a worker
    whose core another process holds takes fewer keys instead of holding the others up (no barrier between them).
    A key is read and multiplied by one worker, block after block, and the Gram matrix is added up in key order,
    so the result is the same whatever the number of threads."""
    keys = list(targets)
    count = len(sites)
    sums = {key: np.empty(shape, dtype=np.float32) for key, shape in targets.items()} if coefficients is not None else None
    weights = coefficients.astype(precision) if coefficients is not None else None
    grams = [np.zeros((count, count)) for _ in keys] if want_gram else None
    counter = itertools.count()  # next() on it is atomic under the GIL
    failed = threading.Event()  # a worker's error: the others stop at their next key

    def work() -> None:
        try:
            _work()
        except BaseException:
            failed.set()
            raise

    def _work() -> None:
        buffer = np.empty(BLOCK_BYTES, dtype=np.uint8)
        scratch = np.empty(BLOCK_BYTES // 2, dtype=np.uint8)  # one site's raw rows of a block (float32 or less)
        while not failed.is_set() and (index := next(counter)) < len(keys):
            key = keys[index]
            for begin, end in _row_blocks(targets[key], count, np.dtype(precision).itemsize):
                block = _fill(sites, sent, key, targets[key], begin, end, buffer.view(precision), scratch)
                flat = block.reshape(count, -1)
                # np.dot, not the @ operator: numpy's matmul of a matrix with its own transpose held the GIL
                if grams is not None:
                    grams[index] += np.dot(flat, flat.T)
                if sums is not None:
                    out = sums[key]
                    out.reshape(max(1, out.shape[0]) if out.ndim else 1, -1)[begin:end] = np.dot(
                        weights, flat).reshape(end - begin, -1)

    with threadpool_limits(limits=1, user_api="blas"):
        if threads <= 1:
            work()
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for future in [pool.submit(work) for _ in range(threads)]:
                    future.result()
    gram = None
    if grams is not None:
        gram = np.zeros((count, count))
        for part in grams:
            gram += part
    return sums, gram


def _row_blocks(shape: tuple[int, ...], count: int, itemsize: int):
    """[begin, end) row ranges of a tensor of `shape` such that `count` sites' rows fill one block."""
    rows = shape[0] if shape else 1
    row_items = max(1, math.prod(shape[1:])) if shape else 1
    step = max(1, (BLOCK_BYTES // itemsize) // (count * row_items))
    return [(begin, min(rows, begin + step)) for begin in range(0, rows, step)]


def _fill(sites, sent, key: str, shape: tuple[int, ...], begin: int, end: int, buffer: np.ndarray,
          scratch: np.ndarray) -> np.ndarray:
    """[K, end − begin, *rest] in `buffer`'s dtype: rows [begin, end) of every site's delta for `key` (zeros where
    a site sent none, zero-padded where its rank is smaller)."""
    count = len(sites)
    row_shape = shape[1:] if shape else ()
    size = count * (end - begin) * math.prod(row_shape)
    if size > buffer.size:  # one row of every site is more than a block: a buffer for this block alone
        buffer = np.empty(size, dtype=buffer.dtype)
    block = buffer[:size].reshape(count, end - begin, *row_shape)
    for index, site in enumerate(sites):
        if key not in sent[index]:
            block[index] = 0.0
        elif shape and site.holds(key, block[index], begin):
            site.read_rows_into(key, begin, block[index])  # the same values and layout: no conversion
        else:
            part = site.rows(key, begin, end, scratch) if shape else site.tensor(key).reshape(1)
            if part.shape != block.shape[1:]:  # a smaller rank: zeros around its components
                block[index] = 0.0
            block[(index, slice(0, part.shape[0]), *(slice(0, n) for n in part.shape[1:]))] = part
    return block


# Past this, measuring fedavg's error would take longer than the merge itself (seconds on a laptop).
ERROR_BUDGET_FLOPS = 10e9


def averaging_error_plan(settings, layout: Layout, valid: list, rank: int) -> dict | None:
    """None when factor averaging's reconstruction error is to be measured this round (aggregation.report_error,
    or by default when it costs under ERROR_BUDGET_FLOPS), else the record that says why it was not."""
    cost = _averaging_error_cost(layout, valid, rank)
    if settings.report_error or (settings.report_error is None and cost <= ERROR_BUDGET_FLOPS):
        return None
    return {"skipped": f"would cost {cost / 1e9:.0f} GFLOP; set aggregation.report_error: true to record it"}


def _averaging_error_cost(layout: Layout, valid: list, rank: int) -> float:
    """Flops of measuring it: two Gram matrices of the stacked factors per layer."""
    width = sum(u.rank for u in valid) + rank
    total = 0.0
    for layer in lora_layers(layout):
        d, n = layout[layer.b_key][0][0], layout[layer.a_key][0][1]
        total += 2.0 * width * width * (d + n)
    return total


def averaging_error(valid: list, parent_dir: Path, layout: Layout, weights: np.ndarray, scale: np.ndarray,
                    merged: dict, lora) -> dict[str, float]:
    """‖ΔW* − B′A′‖/‖ΔW*‖ per layer for factor averaging: ΔW* is the exact weighted mean of the sites' products
    (each site's whole local factors: the parent's first r_k components plus its clipped delta), B′A′ the product
    of the merged factors. `merged`: numpy arrays or torch tensors."""
    scaling = lora.alpha / lora.r
    errors = {}
    sites = [PrivateTensors(update.tensors, update.spans) for update in valid]
    try:
        with PrivateTensors(parent_dir / ADAPTER_FILE) as parent:
            for layer in lora_layers(layout):
                start_a = parent.tensor(layer.a_key).astype(np.float64)
                start_b = parent.tensor(layer.b_key).astype(np.float64)
                bs, as_ = [], []
                for site, update, factor, weight in zip(sites, valid, scale, weights):
                    a, b = start_a[: update.rank].copy(), start_b[:, : update.rank].copy()
                    if layer.a_key in update.keys:
                        a += float(factor) * site.tensor(layer.a_key)
                    if layer.b_key in update.keys:
                        b += float(factor) * site.tensor(layer.b_key)
                    bs.append(b)
                    as_.append(float(weight) * scaling * a)
                errors[layer.name] = product_error(bs, as_, _float64(merged[layer.b_key]),
                                                   scaling * _float64(merged[layer.a_key]))
    finally:
        for site in sites:
            site.close()
    return errors


def _float64(values) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64)
    return values.double().numpy()  # a torch tensor


def product_error(b_target: list[np.ndarray], a_target: list[np.ndarray], b: np.ndarray, a: np.ndarray) -> float:
    """‖T − B A‖ / ‖T‖ with T = Σ_k B_k A_k, from factors only: ‖T‖², ⟨T, BA⟩ and ‖BA‖² are sums of elementwise
    products of small Gram matrices (trace identities), so no d × n matrix is formed."""
    b_cat, a_cat = np.concatenate(b_target, axis=1), np.concatenate(a_target, axis=0)
    target = float(np.sum(np.dot(b_cat.T, b_cat) * np.dot(a_cat, a_cat.T)))
    if target <= 0:
        return 0.0
    cross = float(np.sum(np.dot(b_cat.T, b) * np.dot(a_cat, a.T)))
    own = float(np.sum(np.dot(b.T, b) * np.dot(a, a.T)))
    return max(target - 2 * cross + own, 0.0) ** 0.5 / target**0.5
