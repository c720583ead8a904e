"""Checks an update must pass before it is used (DESIGN §3): manifest, hash, lineage, base model,
LoRA shape, finite values, size. A failed check rejects the update with a reason; it never crashes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fedtune.adapter import ADAPTER_FILE, UPDATE_FORMAT, tensor_layout
from fedtune.aggregate.updates import factor_of
from fedtune.artifacts import read_json, sha256_file
from fedtune.config import FederationConfig
from fedtune.errors import BadInput

REQUIRED = ("site", "round", "parent", "base_model", "lora", "num_examples", "sha256")


class Rejected(Exception):
    """An update that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class Update:
    site: str
    folder: Path
    manifest: dict
    sha256: str
    num_examples: int
    rank: int
    trained: str  # "AB", or "B" when A stayed frozen (ffa)
    keys: set[str]
    norm: float  # L2 norm of the whole delta


def expected_layout(layout: dict, rank: int, trained: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a site training `rank` components of `trained` factors sends, from the parent's layout."""
    expected = {}
    for key, (shape, dtype) in layout.items():
        factor = factor_of(key)
        if factor == "A":
            if trained == "B":
                continue
            shape = (rank, *shape[1:])
        elif factor == "B":
            shape = (shape[0], rank, *shape[2:])
        expected[key] = (shape, dtype)
    return expected


def check_update(
    folder: Path,
    config: FederationConfig,
    parent: dict,
    layout: dict[str, tuple[tuple[int, ...], str]],
    max_bytes: int,
) -> Update:
    """Return the update in `folder` or raise Rejected with the reason."""
    try:
        manifest = read_json(folder / "manifest.json")
    except BadInput as err:
        raise Rejected(str(err)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != UPDATE_FORMAT:
        raise Rejected(f"manifest.json: format is not {UPDATE_FORMAT}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise Rejected(f"manifest.json: missing {', '.join(missing)}")
    # Fields read below as mappings or numbers: a malformed value must reject the update, not crash the round.
    for key in ("parent", "base_model", "lora"):
        if not isinstance(manifest[key], dict):
            raise Rejected(f"manifest.json: {key} must be a mapping")
    train = manifest.get("train", {})
    if not isinstance(train, dict):
        raise Rejected("manifest.json: train must be a mapping")
    site = manifest["site"]
    if site != folder.name:
        raise Rejected(f"manifest names site '{site}' but the folder is '{folder.name}'")
    if site not in config.site_names():
        raise Rejected(f"site '{site}' is not on the roster")
    if manifest["round"] != parent["round"] + 1:
        raise Rejected(f"update is for round {manifest['round']}, this round is {parent['round'] + 1}")
    if manifest["parent"] != {"version": parent["version"], "sha256": parent["adapter_sha256"]}:
        if manifest["parent"].get("version") == parent["version"]:
            raise Rejected(f"trained from a different {parent['version']} (its sha256 is not the registry's)")
        raise Rejected(f"trained from {manifest['parent'].get('version')}, not from the current version {parent['version']}")
    if manifest["base_model"].get("sha256") != config.base_model.sha256:
        raise Rejected("trained on another base model (fingerprint differs)")
    lora = manifest["lora"]
    rank = config.site_rank(site)
    if (lora.get("r"), lora.get("alpha"), lora.get("target_modules")) != (
        rank, config.lora.alpha, config.lora.target_modules
    ):
        raise Rejected(f"LoRA settings {lora} differ from the federation's (r {rank} for this site, "
                       f"alpha {config.lora.alpha}, target_modules {config.lora.target_modules})")
    trained = manifest.get("trained", "AB")
    if trained not in ("AB", "B"):
        raise Rejected("manifest.json: trained must be 'AB' or 'B'")
    num = manifest["num_examples"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise Rejected("num_examples must be a positive integer")
    tensors = folder / ADAPTER_FILE
    if not tensors.is_file():
        raise Rejected(f"{ADAPTER_FILE} missing")
    if tensors.stat().st_size > max_bytes:
        raise Rejected(f"{ADAPTER_FILE} is {tensors.stat().st_size} bytes, over the limit of {max_bytes}")
    if sha256_file(tensors) != manifest["sha256"]:
        raise Rejected(f"{ADAPTER_FILE} does not match the sha256 in its manifest (damaged or altered)")
    try:
        got = tensor_layout(tensors)
    except BadInput as err:
        raise Rejected(str(err)) from None
    expected = expected_layout(layout, rank, trained)
    if got.keys() != expected.keys():
        extra, lost = sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys())
        raise Rejected(f"tensor keys differ from the global adapter (unexpected: {extra[:2]}, missing: {lost[:2]})")
    for key, (shape, dtype) in expected.items():
        if got[key] != (shape, dtype):
            raise Rejected(f"tensor {key} is {got[key][1]}{list(got[key][0])}, expected {dtype}{list(shape)}")
    square_sum = 0.0
    with safe_open(str(tensors), framework="pt") as handle:
        for key in expected:
            tensor = handle.get_tensor(key)
            # One reduction gives the norm and the finiteness check: a NaN or Inf anywhere makes it non-finite.
            part = float(torch.linalg.vector_norm(tensor))
            if not math.isfinite(part):
                if not torch.isfinite(tensor).all():
                    raise Rejected(f"tensor {key} holds NaN or Inf")
                part = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))  # finite but huge
            square_sum += part * part
    try:
        loss_last = float(train.get("loss_last", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise Rejected("manifest.json: train.loss_last is not a number") from None
    if not math.isfinite(loss_last):
        raise Rejected("training loss is not finite")
    return Update(site=site, folder=folder, manifest=manifest, sha256=manifest["sha256"], num_examples=num,
                  rank=rank, trained=trained, keys=set(expected), norm=math.sqrt(square_sum))
