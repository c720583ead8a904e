"""The federation's LoRA adapter in peft's own file format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedtune import models
from fedtune.artifacts import sha256_file, write_json_atomic
from fedtune.config import FederationConfig
from fedtune.errors import BadInput

from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE  # noqa: F401  (the names every module uses)


def lora_config(config: FederationConfig, rank: int | None = None):
    """peft's LoraConfig of the federation, or of a site training a smaller `rank`.

    A smaller rank keeps the federation's scaling alpha/r (alpha is scaled with the rank), so a
    site's product means the same as the global adapter's.
    """
    from peft import LoraConfig

    rank = rank or config.lora.r
    return LoraConfig(
        r=rank,
        lora_alpha=config.lora.alpha * rank / config.lora.r,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=models.loadable_name(config.base_model.id),
    )


def seeded_adapter(model, config: FederationConfig) -> dict[str, torch.Tensor]:
    """The initial adapter every site starts from: peft's init (A random, B zero) under the federation seed."""
    from peft import get_peft_model, get_peft_model_state_dict

    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(config))
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    peft_model.unload()
    return state


def adapter_config(config: FederationConfig, rank: int | None = None) -> dict:
    """peft's adapter_config.json of the federation's adapter (or of a site's smaller rank)."""
    lora = lora_config(config, rank).to_dict()
    lora["peft_type"] = "LORA"
    lora["task_type"] = "CAUSAL_LM"
    return json.loads(json.dumps(lora, default=_jsonable))


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: FederationConfig, rank: int | None = None) -> str:
    """Write adapter_model.safetensors and adapter_config.json into `folder`; returns the tensors' sha256."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_FILE, adapter_config(config, rank))
    return sha256_file(folder / ADAPTER_FILE)


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def tensor_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key → (shape, dtype) without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            layout = {}
            for key in handle.keys():
                sl = handle.get_slice(key)
                layout[key] = (tuple(sl.get_shape()), sl.get_dtype())
            return layout
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        raise BadInput(f"{path}: not a readable safetensors file ({err})") from None
