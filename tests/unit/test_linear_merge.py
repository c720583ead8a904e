"""The linear rules' numpy merge (fedtune.aggregate.linear) against the torch merge (fedtune.aggregate.merge) on
the same private copies: mixed ranks (HetLoRA padding), FFA's unsent A, clipping factors, float16 parents and
the rules that pick their coefficients from the Gram matrix. Both must give the same version and the same Gram
matrix; the numpy merge must not load torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedtune.aggregate import make_method
from fedtune.aggregate.linear import applies, merge_linear
from fedtune.aggregate.merge import merge_updates
from fedtune.aggregate.updates import PrivateTensors, file_layout
from fedtune.aggregate.validate import Update
from fedtune.config import AggregationSettings, FederationConfig
from fedtune.wire.tensors import ADAPTER_FILE

RANK = 4
LAYERS = {"layers.0.q_proj": (24, 16), "layers.1.v_proj": (8, 40)}  # (out, in)


def _parent(folder: Path, dtype=torch.float32) -> Path:
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer, (out, inp) in LAYERS.items():
        tensors[f"{layer}.lora_A.weight"] = torch.randn(RANK, inp, generator=generator).to(dtype)
        tensors[f"{layer}.lora_B.weight"] = (torch.randn(out, RANK, generator=generator) * 0.1).to(dtype)
    tensors["score.bias"] = torch.randn(3, generator=generator).to(dtype)  # not a LoRA factor: averaged as is
    tensors["score.scale"] = torch.randn((), generator=generator).to(dtype)  # a scalar
    tensors["empty.rows"] = torch.zeros(0, 3, dtype=dtype)  # tensors with no elements
    tensors["empty.columns"] = torch.zeros(2, 0, dtype=dtype)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    return folder


def _updates(folder: Path, ranks: list[int], trained: str = "AB", dtype=torch.float32) -> list[Update]:
    folder.mkdir(parents=True)
    updates = []
    for index, rank in enumerate(ranks):
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for layer, (out, inp) in LAYERS.items():
            if trained == "AB":
                tensors[f"{layer}.lora_A.weight"] = torch.randn(rank, inp, generator=generator).to(dtype)
            tensors[f"{layer}.lora_B.weight"] = torch.randn(out, rank, generator=generator).to(dtype)
        tensors["score.bias"] = torch.randn(3, generator=generator).to(dtype)
        tensors["score.scale"] = torch.randn((), generator=generator).to(dtype)
        tensors["empty.rows"] = torch.zeros(0, 3, dtype=dtype)
        tensors["empty.columns"] = torch.zeros(2, 0, dtype=dtype)
        path = folder / f"{index}.safetensors"
        save_file(tensors, str(path))
        updates.append(Update(site=f"s{index}", folder=folder, manifest={}, sha256="", nonce=str(index),
                              num_examples=10 * (index + 1), num_tokens=100, rank=rank, trained=trained,
                              keys=set(tensors), tensors=path, norm=1.0))
    return updates


def _both(rule_name: str, parent_dir: Path, updates: list[Update], scale: np.ndarray):
    config = FederationConfig(sites=[{"name": u.site} for u in updates], lora={"r": RANK, "alpha": 8})
    settings = AggregationSettings(method=rule_name, report_error=False)
    rule = make_method(rule_name, settings)
    layout = file_layout(parent_dir / ADAPTER_FILE)
    weights = np.array([u.num_examples for u in updates], dtype=np.float64)
    weights /= weights.sum()
    assert applies(rule, True, None, layout)
    numpy_record, torch_record = {}, {}
    ours = merge_linear(rule, updates, parent_dir, layout, weights, scale, RANK, numpy_record, want_gram=True,
                        threads=3)
    alone: dict = {}
    one_thread = merge_linear(rule, updates, parent_dir, layout, weights, scale, RANK, alone, want_gram=True, threads=1)
    for key, value in ours.items():  # the same bytes whatever the number of threads
        assert value.tobytes() == one_thread[key].tobytes(), key
    assert numpy_record["gram"].tobytes() == alone["gram"].tobytes()
    theirs, _, _, _ = merge_updates(rule, updates, parent_dir, {"params": {}}, config, settings, weights, scale,
                                    record=torch_record, gram=True)
    return ours, theirs, numpy_record, torch_record


@pytest.mark.parametrize("rule_name", ["fedavg", "krum", "geomedian", "centered-clip"])
def test_the_numpy_merge_is_the_torch_merge(tmp_path, rule_name):
    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 2, 4, 3, 4])  # HetLoRA: smaller ranks are zero-padded
    scale = np.array([1.0, 0.5, 1.0, 0.25, 1.0])  # clipping factors
    ours, theirs, numpy_record, torch_record = _both(rule_name, parent, updates, scale)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == np.float32 and ours[key].shape == tuple(theirs[key].shape)
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(numpy_record["coefficients"], torch_record["coefficients"], rtol=1e-9)
    _same_gram(numpy_record["gram"], torch_record["gram"], exact=make_method(rule_name).needs_gram)


def _same_gram(ours: np.ndarray, theirs: np.ndarray, exact: bool) -> None:
    """The rules that choose by distance take the inner products in float64 (as the torch merge); fedavg's, for the
    contribution records, come from float32 blocks summed in float64: within 1e-6 of the norms."""
    if exact:
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    else:
        scale = np.sqrt(np.outer(np.diag(theirs), np.diag(theirs)))
        assert np.abs(ours - theirs).max() <= 1e-6 * scale.max()
        assert (np.abs(ours - theirs) <= 1e-6 * scale + 1e-12).all()


def test_the_merged_values_are_the_weighted_sum_computed_by_hand(tmp_path):
    """Independent of both merges: parent + Σ c_k·pad(δ_k) per key, from the files themselves."""
    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 1, 3])
    scale = np.array([1.0, 1.0, 0.5])
    ours, _, record, _ = _both("fedavg", parent, updates, scale)
    start = load_file(str(parent / ADAPTER_FILE))
    deltas = [load_file(str(u.tensors)) for u in updates]
    for key, value in ours.items():
        expected = start[key].double().numpy().copy()
        for coefficient, delta in zip(record["coefficients"], deltas):
            part = delta[key].double().numpy()
            expected[tuple(slice(0, n) for n in part.shape)] += coefficient * part
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=key)
    # the inner products of the zero-padded, clipped deltas
    gram = np.array([[sum(float(np.sum(_pad(a[k], k) * _pad(b[k], k))) for k in a) for b in deltas] for a in deltas])
    _same_gram(record["gram"], gram * np.outer(scale, scale), exact=False)


def _pad(tensor: torch.Tensor, key: str) -> np.ndarray:
    value = tensor.double().numpy()
    shape = LAYERS[key.split(".lora_")[0]] if ".lora_" in key else value.shape
    if key.endswith("lora_A.weight"):
        shape = (RANK, shape[1])
    elif key.endswith("lora_B.weight"):
        shape = (shape[0], RANK)
    out = np.zeros(shape)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def test_ffa_sites_send_b_only_and_a_stays_the_parents(tmp_path):
    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 4, 4], trained="B")
    ours, theirs, _, _ = _both("ffa", parent, updates, np.ones(3))
    start = load_file(str(parent / ADAPTER_FILE))
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-6, atol=1e-6)
        if key.endswith("lora_A.weight"):
            np.testing.assert_array_equal(ours[key], start[key].numpy())


def test_a_float16_round_keeps_its_dtype_and_bfloat16_goes_to_torch(tmp_path):
    parent = _parent(tmp_path / "v0000", torch.float16)
    updates = _updates(tmp_path / "round", [4, 4], dtype=torch.float16)
    ours, theirs, _, _ = _both("fedavg", parent, updates, np.ones(2))
    for key in ours:
        assert ours[key].dtype == np.float16
        np.testing.assert_allclose(ours[key].astype(np.float32), theirs[key].float().numpy(), rtol=1e-3, atol=1e-3)
    bf16 = _parent(tmp_path / "bf16", torch.bfloat16)
    assert not applies(make_method("fedavg"), True, None, file_layout(bf16 / ADAPTER_FILE))
    assert not applies(make_method("fedavg"), False, None, file_layout(parent / ADAPTER_FILE))  # a server optimizer
    assert not applies(make_method("median"), True, None, file_layout(parent / ADAPTER_FILE))


def test_rows_of_a_bfloat16_file_are_its_float32_values(tmp_path):
    tensor = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"x": tensor}, str(tmp_path / "t.safetensors"))
    with PrivateTensors(tmp_path / "t.safetensors") as read:
        np.testing.assert_array_equal(read.rows("x", 1, 3), tensor[1:3].float().numpy())
        np.testing.assert_array_equal(read.tensor("x"), tensor.float().numpy())
        assert read.rows("x", 5, 9).shape == (0, 7)


def test_the_numpy_merge_loads_no_torch(tmp_path):
    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 2])
    paths = [str(u.tensors) for u in updates]
    code = f"""
import sys, numpy as np
from pathlib import Path
from fedtune.aggregate import make_method
from fedtune.aggregate.linear import merge_linear
from fedtune.aggregate.updates import file_layout
from fedtune.aggregate.validate import Update
paths = {paths!r}
updates = [Update(site=str(i), folder=Path("."), manifest={{}}, sha256="", nonce=str(i), num_examples=1, num_tokens=1,
                  rank=4, trained="AB", keys=set(file_layout(Path(p))), tensors=Path(p)) for i, p in enumerate(paths)]
parent = Path({str(parent)!r})
merged = merge_linear(make_method("fedavg"), updates, parent, file_layout(parent / "adapter_model.safetensors"),
                      np.array([0.5, 0.5]), np.ones(2), 4, {{}}, True)
assert merged, "nothing merged"
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_keys_read_in_many_blocks_on_many_threads_give_the_same_version(tmp_path, monkeypatch):
    import fedtune.aggregate.linear as linear

    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 2, 3])
    whole, _, whole_record, _ = _both("fedavg", parent, updates, np.ones(3))
    monkeypatch.setattr(linear, "BLOCK_BYTES", 1024)  # a row or two of every site per block
    layout = file_layout(parent / ADAPTER_FILE)
    weights = np.array([1 / 6, 2 / 6, 3 / 6])
    for threads in (1, 2, 4):
        record: dict = {}
        merged = merge_linear(make_method("fedavg"), updates, parent, layout, weights, np.ones(3), RANK, record,
                              want_gram=True, threads=threads)
        for key, value in merged.items():
            np.testing.assert_allclose(value, whole[key], rtol=1e-6, atol=1e-7, err_msg=key)
        _same_gram(record["gram"], whole_record["gram"], exact=False)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_file_cut_short_while_merged_fails_the_merge_and_leaves_no_thread_waiting(tmp_path, monkeypatch, threads):
    """The header was read whole, then the file lost its last bytes: the reader that finds them missing raises,
    and the merge stops with its error instead of hanging or merging zeros."""
    import fedtune.aggregate.linear as linear
    from fedtune.aggregate.updates import PrivateTensors as Reader
    from fedtune.wire.codec import WireError

    parent = _parent(tmp_path / "v0000")
    updates = _updates(tmp_path / "round", [4, 4, 4])
    victim = updates[1].tensors

    class CutAfterOpening(Reader):
        def __init__(self, path, spans=None):
            super().__init__(path, spans)
            if path == victim:
                os.truncate(path, path.stat().st_size - 64)

    monkeypatch.setattr(linear, "PrivateTensors", CutAfterOpening)
    monkeypatch.setattr(linear, "BLOCK_BYTES", 1024)  # many blocks, so the readers are mid-round when it fails
    layout = file_layout(parent / ADAPTER_FILE)
    with pytest.raises(WireError, match="the file ends before its tensors. data"):
        merge_linear(make_method("fedavg"), updates, parent, layout, np.full(3, 1 / 3), np.ones(3), RANK, {},
                     want_gram=True, threads=threads)
