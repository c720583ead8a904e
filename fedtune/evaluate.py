"""`fedtune evaluate`: token-weighted loss and perplexity of the base model or a global version on
each site's prepared eval split."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fedtune import models
from fedtune.config import FederationConfig
from fedtune.data.prepared import read_prepared
from fedtune.errors import BadInput
from fedtune.adapter import ADAPTER_FILE
from fedtune.artifacts import read_json, sha256_file
from fedtune.registry import checked_version


@torch.no_grad()
def _eval_loss(model, ids: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> tuple[float, int]:
    """Summed next-token cross-entropy over the labelled tokens, and their count."""
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        logits, target = models.labelled_logits(
            model, ids[start : start + batch_size].to(device), labels[start : start + batch_size].to(device))
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    return total, count


def evaluate(
    config: FederationConfig,
    adapter: str | Path,
    data: list[Path],
    base_model=None,
    batch_size: int = 8,
    *,
    model_dir: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Evaluate `adapter` ("base" or a global version folder) on every prepared folder in `data`.

    Args:
        config: the federation.
        adapter: "base" for the base model alone, else a global version folder.
        data: prepared site folders.
        base_model: an already loaded base model to reuse (left as it was on return).
        batch_size: sequences per forward pass.
        model_dir: the folder holding this machine's copy of the base model (else FEDTUNE_MODEL_DIR or its id).
        log: receives progress lines.

    Returns:
        {"adapter": …, "sites": {site: {"loss", "perplexity", "tokens"}}}
    """
    if not data:
        raise BadInput("evaluate: give at least one --data folder")
    splits = []
    for folder in data:
        card, ids, labels = read_prepared(Path(folder), config, "eval")
        if any(card["site"] == seen for seen, _, _ in splits):
            raise BadInput(f"{folder}: a second eval split for site '{card['site']}'; give each site's folder once")
        splits.append((card["site"], torch.from_numpy(ids), torch.from_numpy(labels)))
    if base_model is None:
        weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "evaluate")
        log(f"evaluate: loading the base model from {weights}")
        base_model = models.load_base_model(weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_model.to(device)

    model, name = base_model, "base"
    if str(adapter) != "base":
        from peft import PeftModel

        folder, name = _checked_adapter(Path(adapter), config)
        model = PeftModel.from_pretrained(base_model, folder)
    model.eval()
    try:
        sites = {}
        for number, (site, ids, labels) in enumerate(splits, start=1):
            log(f"evaluate {name}: site {site} ({number}/{len(splits)}), {len(ids)} sequences")
            total, count = _eval_loss(model, ids, labels, batch_size, device)
            if count == 0:
                raise BadInput(f"site {site}: its eval split has no labelled tokens; prepare it with more records")
            loss = total / max(count, 1)
            sites[site] = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}
    finally:
        if model is not base_model:
            model.unload()  # gives the caller its base model back without LoRA layers
    return {"adapter": name, "sites": sites}


# A baseline adapter (`simulate --baselines`): trained on one machine without federation, never sent.
BASELINE_FORMAT = "fedtune.baseline/1"


def _checked_adapter(ref: Path, config: FederationConfig) -> tuple[Path, str]:
    """A global version (signature and files checked) or a local baseline (files checked), and its name."""
    manifest_path = ref / "manifest.json"
    if manifest_path.is_file() and not (ref / "LATEST").exists():
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and manifest.get("format") == BASELINE_FORMAT:
            if manifest["base_model"]["sha256"] != config.base_model.sha256:
                raise BadInput(f"{ref}: trained on another base model than the federation's")
            if sha256_file(ref / ADAPTER_FILE) != manifest["adapter_sha256"]:
                raise BadInput(f"{ref / ADAPTER_FILE}: does not match the sha256 in its manifest")
            return ref, str(manifest["name"])
    folder, manifest = checked_version(ref, config)
    return folder, manifest["version"]
