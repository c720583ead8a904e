"""Baselines beside a federation: what each site reaches on its own data alone (`local`) and what
pooling every site's data in one place would reach (`central`) — the two ends a federation sits between.

Both train from the federation's v0000 with the same training loop, settings and model loading as
`train-local`, for the step budget the federation spends: `local` gets one site's (rounds × steps),
`central` all honest sites' together (rounds × steps × sites). Both train A and B (plain LoRA) whatever
the aggregation method, so every method is compared with the same two references.
Each baseline is written as a folder `evaluate` and `PeftModel.from_pretrained` accept.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedtune import models
from fedtune.adapter import ADAPTER_FILE, lora_config, read_tensors, write_adapter
from fedtune.artifacts import atomic_folder, stamp, write_json_atomic
from fedtune.config import FederationConfig, TrainingSettings, parse_model
from fedtune.data.prepared import read_prepared
from fedtune.errors import BadInput
from fedtune.evaluate import BASELINE_FORMAT, evaluate
from fedtune.registry import checked_version
from fedtune.train import train_loop

BASELINES = ("local", "central")


def parse_baselines(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """"local,central" or a list of names → the known names in order, each once; BadInput otherwise."""
    if not value:
        return ()
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
    items = [p for p in items if p]
    unknown = [p for p in items if p not in BASELINES]
    if unknown:
        raise BadInput(f"--baselines: unknown baseline '{unknown[0]}'; choose from {', '.join(BASELINES)} (comma-separated)")
    return tuple(dict.fromkeys(items))


def train_baseline(
    config: FederationConfig,
    data: list[Path],
    start: Path,
    steps: int,
    out: Path,
    name: str,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    model_dir: Path | None = None,
) -> Path:
    """Train one adapter from the version `start` on the pooled train splits of `data`.

    Args:
        config: the federation (LoRA shape, training settings, seed).
        data: prepared site folders whose train splits are pooled.
        start: the global version folder to start from (v0000 for a fair comparison).
        steps: optimizer steps.
        out: the adapter folder to write (must not exist).
        name: the adapter's name, recorded as its manifest's version and used to seed it.
        log: receives progress lines.

    Returns:
        `out`, holding adapter_model.safetensors, adapter_config.json and manifest.json.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if out.exists():
        raise BadInput(f"{out}: already exists; baselines go into an empty folder")
    if not data:
        raise BadInput(f"baseline {name}: no prepared data to train on")
    _start, parent = checked_version(start, config)
    parts = [read_prepared(Path(folder), config, "train") for folder in data]
    ids = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    settings = parse_model(TrainingSettings, {**config.training.model_dump(), "steps": steps}, f"baseline {name}")

    # Seeded by name so every baseline draws its own batches, yet a rerun is identical.
    seed = config.seed + zlib.crc32(name.encode()) % 100_000
    torch.manual_seed(seed)
    weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, f"baseline {name}")
    model = get_peft_model(models.load_base_model(weights), lora_config(config))
    loaded = set_peft_model_state_dict(model, read_tensors(start / ADAPTER_FILE))
    if loaded.unexpected_keys:
        raise BadInput(f"{start / ADAPTER_FILE}: keys do not fit the base model ({loaded.unexpected_keys[:2]})")
    for param_name, param in model.named_parameters():
        param.requires_grad = "lora_A" in param_name or "lora_B" in param_name

    def progress(step: int, loss: float) -> None:
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"baseline {name}: step {step}/{steps} loss {loss:.4f}")

    result = train_loop(model, ids, labels, settings, seed, log=progress)
    tensors = {k: v.detach().float().cpu().contiguous()
               for k, v in get_peft_model_state_dict(result.model, save_embedding_layers=False).items()}
    with atomic_folder(out) as tmp:
        sha = write_adapter(tmp, tensors, config)
        # Not a global version: trained on one machine, never sent, so its manifest is a record, not a signed document.
        manifest = {
            "format": BASELINE_FORMAT, "name": name, "started_from": parent["version"],
            "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
            "lora": config.lora.shape(), "adapter_sha256": sha,
            "baseline": {"sites": [p[0]["site"] for p in parts], "num_examples": len(ids),
                         "train": {"steps": steps, "lr": settings.lr, "batch_size": settings.batch_size,
                                   "loss_first": result.losses[0], "loss_last": result.losses[-1],
                                   "seconds": round(result.seconds, 3)}},
            **stamp(),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return out


def run_baselines(
    config: FederationConfig,
    honest: dict[str, Path],
    eval_data: list[Path],
    start: Path,
    out: Path,
    kinds: tuple[str, ...],
    steps_per_site: int,
    base_model=None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    model_dir: Path | None = None,
    tasks: dict | None = None,
    task_examples: int = 0,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, float]]:
    """Train and evaluate the baselines `kinds` into out/local/<site>/ and out/central/.

    Args:
        honest: site → prepared folder of the sites that train (attackers left out).
        eval_data: the prepared folders `central` is evaluated on (every site).
        start: the version every baseline starts from (v0000).
        steps_per_site: the steps one site spends in the federation (rounds × steps).
        base_model: a loaded base model to evaluate with (reused, left as it was).
        tasks: filled with {kind: {site: task metrics}} when `task_examples` is above 0 (see `evaluate`).
        task_examples, max_new_tokens: held-out prompts answered per site, and the longest answer.

    Returns:
        {"local": {site: eval loss on its own split}, "central": {site: eval loss}}, for the kinds asked.
    """
    results: dict[str, dict[str, float]] = {}
    tasked = {"task_examples": task_examples, "max_new_tokens": max_new_tokens, "model_dir": model_dir}
    tasks = {} if tasks is None else tasks

    def keep_tasks(kind: str, scores: dict) -> None:
        found = {site: m["task"] for site, m in scores["sites"].items() if "task" in m}
        if found:
            tasks.setdefault(kind, {}).update(found)

    if base_model is None:
        base_model = models.load_base_model(
            models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "baselines"))
    if "local" in kinds:
        results["local"] = {}
        for site, folder in honest.items():
            adapter = train_baseline(config, [folder], start, steps_per_site, out / "local" / site, f"local-{site}", log,
                                     model_dir=model_dir)
            scores = evaluate(config, adapter, [folder], base_model=base_model, **tasked)
            keep_tasks("local", scores)
            results["local"][site] = scores["sites"][site]["loss"]
            log(f"eval local-{site}: {site} {results['local'][site]:.4f}")
    if "central" in kinds:
        steps = steps_per_site * len(honest)
        adapter = train_baseline(config, list(honest.values()), start, steps, out / "central", "central", log,
                                 model_dir=model_dir)
        scores = evaluate(config, adapter, eval_data, base_model=base_model, **tasked)
        keep_tasks("central", scores)
        results["central"] = {s: m["loss"] for s, m in scores["sites"].items()}
        log("eval central: " + ", ".join(f"{s} {v:.4f}" for s, v in results["central"].items()))
    return results
