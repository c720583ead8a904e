"""`fedtune export`: a global version as a folder to ship or serve.

Without merging, the folder is the adapter alone in peft's format (for `PeftModel.from_pretrained`). Merged, it
is a plain transformers model (the adapter folded into the base weights) that loads with
`AutoModelForCausalLM.from_pretrained` and needs neither fedtune nor peft.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from fedtune import models
from fedtune.adapter import ADAPTER_FILE, CONFIG_FILE, read_tensors
from fedtune.artifacts import atomic_folder, read_json, stamp, write_json_atomic
from fedtune.config import FederationConfig
from fedtune.errors import BadInput
from fedtune.registry import VERSION_RE, Registry, checked_version

EXPORT_FILE = "fedtune_export.json"
EXPORT_FORMAT = "fedtune.export/1"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def export_version(
    config: FederationConfig,
    version: str,
    out: Path,
    *,
    merge: bool = False,
    dtype: str | None = None,
    registry: Path | None = None,
    model_dir: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Write global version `version` to the new folder `out`, as an adapter or merged into the base model.

    Args:
        config: the federation.
        version: a version name (vNNNN or `latest`) in `registry`, or the path of a version folder.
        out: the folder to write; it must not exist or be empty.
        merge: fold the adapter into the base weights and write a whole model.
        dtype: bf16, fp16 or fp32. Default: the adapter's own (fp32) without `merge`; the base model's stored
            dtype with it.
        registry: the registry folder that version names are looked up in.
        model_dir: the folder holding this machine's copy of the base model (else FEDTUNE_MODEL_DIR or its id).
        log: receives progress lines.

    Returns:
        The written folder.
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise BadInput(f"export --dtype {dtype}: give one of {', '.join(DTYPES)}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BadInput(f"{out}: already exists and is not an empty folder; give a new --out folder")
    folder, manifest = checked_version(_version_folder(version, registry), config)
    # The base is needed to merge; given with --model, it is checked even for an adapter-only export.
    weights = None
    if merge or model_dir is not None:
        weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "export")
    if merge:
        stored = _base_config(weights)
        if stored.get("quantization_config"):
            raise BadInput(f"{weights / 'config.json'}: a quantized model; --merge needs the base in full precision, "
                           "give its unquantized weights with --model DIR")
        dtype = dtype or _dtype_name(stored)
    record = {
        "format": EXPORT_FORMAT,
        "federation": config.name,
        "version": manifest["version"],
        "adapter_sha256": manifest["adapter_sha256"],
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        "dtype": dtype or "fp32",  # fedtune stores adapters in float32
        "merged": merge,
        **stamp(),
    }
    # An empty --out is replaced whole, so the folder still appears complete or not at all.
    with atomic_folder(out, replace=out.exists()) as tmp:
        if merge:
            _write_merged(folder, manifest["version"], weights, tmp, dtype, log)
        else:
            _write_adapter(folder, tmp, dtype, config.base_model.id)
            shutil.copyfile(folder / "manifest.json", tmp / "manifest.json")
        write_json_atomic(tmp / EXPORT_FILE, record)
    return out


def _version_folder(version: str, registry: Path | None) -> Path:
    """The folder `version` names: a version of `registry` by name, else a path."""
    if version != "latest" and not VERSION_RE.match(version):
        if not Path(version).exists():
            raise BadInput(f"--version {version}: no such folder, and not a version name; give vNNNN, latest "
                           "or the path of a version folder")
        return Path(version)
    if registry is None or not Registry(registry).exists():
        raise BadInput(f"{registry}: not a registry (no LATEST file); give the registry with --registry DIR, "
                       f"or the version folder's path as --version")
    book = Registry(registry)
    if version == "latest":
        return book.latest()
    if not (book.path_of(version) / "manifest.json").is_file():
        raise BadInput(f"{book.root}: has no version {version} (LATEST is {book.latest_name()}); "
                       "give an existing version or `latest`")
    return book.path_of(version)


def _write_adapter(version: Path, target: Path, dtype: str | None, base_id: str) -> None:
    """The version's adapter files, its tensors cast to `dtype`, naming the base by a loadable name."""
    if dtype is None:
        shutil.copyfile(version / ADAPTER_FILE, target / ADAPTER_FILE)
    else:
        import torch
        from safetensors.torch import save_file

        cast = getattr(torch, DTYPES[dtype])
        tensors = {k: v.to(cast).contiguous() for k, v in read_tensors(version / ADAPTER_FILE).items()}
        save_file(tensors, str(target / ADAPTER_FILE), metadata={"format": "pt"})
    adapter_config = read_json(version / CONFIG_FILE)
    # Versions written before the embedded model had a hub-cache name say `embedded:…`, which
    # AutoPeftModelForCausalLM cannot resolve.
    adapter_config["base_model_name_or_path"] = models.loadable_name(base_id)
    write_json_atomic(target / CONFIG_FILE, adapter_config)


def _base_config(weights: Path) -> dict:
    try:
        stored = json.loads((weights / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _dtype_name(stored: dict) -> str:
    """The dtype a model's config.json says its weights are stored in; fp32 when it does not say."""
    named = stored.get("dtype") or stored.get("torch_dtype")
    return next((short for short, long in DTYPES.items() if long == named), "fp32")


def _write_merged(version: Path, name: str, weights: Path, target: Path, dtype: str,
                  log: Callable[[str], None]) -> None:
    """The base model with the adapter folded into its weights, in `dtype`, and its tokenizer."""
    import torch
    from peft import PeftModel

    log(f"export: loading the base model from {weights}")
    # Merged in float32 so that the adapter's small delta is rounded once, at the final cast.
    base = models.load_base_model(weights)
    tokenizer = models.load_tokenizer(weights)
    log(f"export: merging {name} into the base weights")
    model = PeftModel.from_pretrained(base, version).merge_and_unload()
    model.to(getattr(torch, DTYPES[dtype]))
    log(f"export: writing {dtype} weights")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
