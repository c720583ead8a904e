"""The coordinator's one read of an update's tensor file (fedtune.aggregate.updates.read_private_copy): the hash,
header and norms it reports are those of the bytes it copied, checked here against hashlib and safetensors."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from forge import pack_safetensors, split_safetensors
from safetensors.torch import load_file, save

from fedtune.aggregate.updates import read_private_copy
from fedtune.aggregate.validate import Rejected, delta_norm
from fedtune.wire.codec import WireError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q_proj.lora_A.weight": torch.randn(4, 64, generator=generator),
        "layers.0.q_proj.lora_B.weight": torch.randn(32, 4, generator=generator) * 1e-3,
        "layers.1.v_proj.lora_A.weight": torch.randn(4, 64, generator=generator).to(torch.bfloat16),
        "layers.1.v_proj.lora_B.weight": torch.zeros(0, 4),
    }


def _layout(tensors: dict[str, torch.Tensor]) -> dict:
    names = {torch.float32: "F32", torch.bfloat16: "BF16"}
    return {key: (tuple(t.shape), names[t.dtype]) for key, t in tensors.items()}


def _expected_norm(path, keys) -> float:
    loaded = load_file(str(path))
    return math.sqrt(sum(float(torch.linalg.vector_norm(loaded[k], dtype=torch.float64)) ** 2 for k in keys))


def test_hash_layout_and_norms_are_those_of_the_bytes_copied(tmp_path):
    tensors = _tensors()
    data = save(tensors, metadata={"format": "pt"})
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(data)
    read = read_private_copy(source, tmp_path / "copy", 1 << 20, _layout(tensors))
    assert read.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "copy").read_bytes() == data
    assert oct((tmp_path / "copy").stat().st_mode & 0o777) == "0o600"
    assert read.layout == _layout(tensors)
    assert set(read.norms) == set(tensors)
    # The float64 norm of the tensors safetensors loads (bfloat16 included), up to the order of the float64 sum.
    assert delta_norm(read, list(tensors)) == pytest.approx(_expected_norm(source, list(tensors)), rel=1e-13)


def test_unaligned_tensors_are_measured_from_an_aligned_copy(tmp_path):
    tensors = _tensors(1)
    header, body = split_safetensors(save(tensors))
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    while (8 + len(raw)) % 4 != 1:  # the data section starts off every element boundary
        raw += b" "
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(pack_safetensors(raw, body))
    read = read_private_copy(source, tmp_path / "copy", 1 << 20, _layout(tensors))
    assert delta_norm(read, list(tensors)) == pytest.approx(_expected_norm(source, list(tensors)), rel=1e-12)


def test_no_norms_unless_the_header_is_the_expected_one(tmp_path):
    tensors = _tensors(2)
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(save(tensors))
    other = dict(_layout(tensors))
    other["layers.0.q_proj.lora_A.weight"] = ((8, 64), "F32")
    assert read_private_copy(source, tmp_path / "copy", 1 << 20, other).norms == {}
    assert read_private_copy(source, tmp_path / "masked", 1 << 20, None).norms == {}


def test_a_nan_is_found_in_the_pass(tmp_path):
    tensors = _tensors(3)
    tensors["layers.0.q_proj.lora_B.weight"][5, 1] = float("nan")
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(save(tensors))
    read = read_private_copy(source, tmp_path / "copy", 1 << 20, _layout(tensors))
    with pytest.raises(Rejected, match="lora_B.weight holds NaN or Inf"):
        delta_norm(read, list(tensors))


def test_a_copy_safetensors_cannot_open_is_rejected_before_the_merge_opens_it(tmp_path):
    tensors = _tensors(4)
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(save(tensors))
    read = read_private_copy(source, tmp_path / "copy", 1 << 20, _layout(tensors))
    os.truncate(read.path, read.path.stat().st_size - 1)  # what the merge would open is not what was checked
    with pytest.raises(Rejected, match="not a readable safetensors file"):
        delta_norm(read, list(tensors))


@pytest.mark.parametrize("data", [b"", b"\x01\x00", (10**6).to_bytes(8, "little") + b"{}"])
def test_short_or_lying_files_are_refused(tmp_path, data):
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(data)
    with pytest.raises(WireError, match="adapter_model.safetensors"):
        read_private_copy(source, tmp_path / "copy", 1 << 20, None)


def test_a_file_rewritten_after_the_read_leaves_the_copy_as_hashed(tmp_path):
    tensors = _tensors(5)
    data = save(tensors)
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(data)
    read = read_private_copy(source, tmp_path / "copy", 1 << 20, _layout(tensors))
    source.write_bytes(save(_tensors(6)))
    os.utime(source)
    assert hashlib.sha256((tmp_path / "copy").read_bytes()).hexdigest() == read.sha256 == hashlib.sha256(data).hexdigest()
