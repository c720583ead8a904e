"""`lora.quantization: 4bit` (QLoRA, Dettmers et al. 2023): a site holds the frozen base model in 4-bit NF4 with
bf16 compute on its GPU, and trains the same LoRA factors in float32 on top of it.

Only how the site holds the base changes: the update is the same float32 LoRA delta a full-precision site sends,
so the coordinator neither knows nor cares, and a site may switch on its own. bitsandbytes' 4-bit kernels need a
CUDA GPU, so a site without one (or without bitsandbytes) is refused before anything is loaded.
"""

from __future__ import annotations

import importlib.util

from fedtune.errors import BadInput

INSTALL = 'pip install "fedtune[qlora]"'


def missing() -> list[str]:
    """What this machine lacks for 4-bit training (empty when it can)."""
    import torch

    lacks = []
    if not torch.cuda.is_available():
        lacks.append("a CUDA GPU (none is visible to torch)")
    # find_spec, not import: importing bitsandbytes on a machine without CUDA prints pages of warnings.
    if importlib.util.find_spec("bitsandbytes") is None:
        lacks.append(f"bitsandbytes (not installed: {INSTALL})")
    return lacks


def require(source: str) -> None:
    """BadInput, naming what is missing and the fix, unless this machine can load the base in 4 bits."""
    lacks = missing()
    if lacks:
        raise BadInput(f"{source}: lora.quantization is 4bit (QLoRA), which needs " + " and ".join(lacks)
                       + "; train on a machine that has them, or set lora.quantization: none in this site's "
                       "federation.yaml (the update is the same LoRA delta either way)")


def load_kwargs(device_index: int) -> dict:
    """`from_pretrained` arguments that load the base in 4-bit NF4, bf16 compute, whole on one GPU."""
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "dtype": torch.bfloat16,
        # Whole on this process's GPU: accelerate refuses to train a 4-bit model spread over devices, and with
        # one process per GPU each process holds its own copy.
        "device_map": {"": device_index},
    }


def prepare(model):
    """peft's preparation of a k-bit model for training: everything frozen, the layers left in 16 bits (norms,
    embeddings, the head) cast to float32 for stable gradients through them. No gradient checkpointing: the
    full-precision path does not checkpoint either, so the two differ only in how the weights are held."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
