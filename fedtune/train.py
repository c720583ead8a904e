"""`fedtune train-local`: one site's round. Load the base model and the global version, train the LoRA
adapter with an explicit accelerate loop, and export the delta (local − parent) as an update.

The loop is written out rather than hidden in a Trainer because federated methods need to reach into
it (proximal terms, control variates, clipping and noise for privacy).
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from fedtune import models
from fedtune.adapter import ADAPTER_FILE, read_tensors, write_adapter
from fedtune.artifacts import atomic_folder, sha256_file, stamp, write_json_atomic
from fedtune.config import FederationConfig
from fedtune.data.prepare import read_prepared
from fedtune.errors import BadInput, StageFailed
from fedtune.registry import read_version_manifest, resolve_global

UPDATE_FORMAT = "fedtune.update/1"


def round_dir_name(number: int) -> str:
    return f"round-{number:04d}"


def _batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches, reshuffled each epoch with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            yield ids[pick], labels[pick]


def train_local(
    config: FederationConfig,
    site: str,
    data: Path,
    global_ref: Path,
    updates: Path,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Train one site's update for the round after the given global version.

    Args:
        config: the federation.
        site: this site's roster name.
        data: the site's prepared folder.
        global_ref: a registry (its LATEST is used) or a global version folder.
        updates: the updates root; the update goes to updates/round-NNNN/<site>/.
        steps, lr, batch_size: override the federation's training defaults.
        log: receives progress lines.

    Returns:
        The update folder.
    """
    from accelerate import Accelerator
    from peft import PeftModel, get_peft_model_state_dict

    config.require_site(site, "train-local")
    train = config.training.model_copy(update={k: v for k, v in
                                               {"steps": steps, "lr": lr, "batch_size": batch_size}.items() if v is not None})
    if train.steps < 1 or train.lr <= 0 or train.batch_size < 1:
        raise BadInput("train-local: --steps and --batch-size must be ≥ 1 and --lr > 0")
    parent_dir = resolve_global(global_ref)
    parent = read_version_manifest(parent_dir)
    if parent["base_model"]["sha256"] != config.base_model.sha256:
        raise BadInput(f"{parent_dir}: built on another base model than the federation's; use this federation's registry")
    number = parent["round"] + 1
    target = updates / round_dir_name(number) / site
    if target.exists():
        raise BadInput(f"{target}: already exists; this site has already sent an update for round {number}")
    card, ids, labels = read_prepared(data, config, "train")
    if card["site"] != site:
        raise BadInput(f"{data / 'data_card.json'}: prepared for site '{card['site']}', not '{site}'")
    models.check_fingerprint(config.base_model.id, config.base_model.sha256, "train-local")
    tokenizer = models.load_tokenizer(config.base_model.id)
    if card["tokenizer"]["fingerprint"] != models.tokenizer_fingerprint(tokenizer):
        raise BadInput(f"{data / 'data_card.json'}: prepared with another tokenizer; prepare again")

    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=train.grad_accum,
    )
    # Seeds differ by site and round so sites do not draw the same batches, yet every rerun is identical.
    seed = config.seed + 1000 * number + zlib.crc32(site.encode()) % 1000
    torch.manual_seed(seed)

    base = models.load_base_model(config.base_model.id)
    model = PeftModel.from_pretrained(base, parent_dir, is_trainable=True)
    model.train()
    parent_tensors = read_tensors(parent_dir / ADAPTER_FILE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(train.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    batches = _batches(torch.from_numpy(ids), torch.from_numpy(labels), train.batch_size, seed)
    losses: list[float] = []
    started = time.perf_counter()
    tokens_seen = 0
    for step in range(1, train.steps + 1):
        step_loss = 0.0
        for _ in range(train.grad_accum):
            input_ids, target_labels = next(batches)
            input_ids, target_labels = input_ids.to(accelerator.device), target_labels.to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=input_ids, labels=target_labels).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.item() / train.grad_accum
            tokens_seen += input_ids.numel()
        if not math.isfinite(step_loss):
            raise StageFailed(f"train-local: loss became {step_loss} at step {step}; lower --lr")
        losses.append(step_loss)
        if step == 1 or step % 5 == 0 or step == train.steps:
            log(f"{site}: round {number} step {step}/{train.steps} loss {step_loss:.4f}")
    seconds = time.perf_counter() - started

    local = get_peft_model_state_dict(accelerator.unwrap_model(model))
    delta = {k: (local[k].detach().float().cpu() - parent_tensors[k].float()).contiguous() for k in parent_tensors}
    manifest = {
        "format": UPDATE_FORMAT,
        "site": site,
        "round": number,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "target_modules": config.lora.target_modules},
        "num_examples": int(len(ids)),
        "num_tokens": int(card["tokens"]["train"]["trained"]),
        "train": {
            "steps": train.steps, "lr": train.lr, "batch_size": train.batch_size, "grad_accum": train.grad_accum,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens_seen / seconds, 1) if seconds else None,
        },
        "privacy": {"mechanism": None},
    }
    with atomic_folder(target) as tmp:
        write_adapter(tmp, delta, config)
        manifest["sha256"] = sha256_file(tmp / ADAPTER_FILE)
        manifest.update(stamp())
        write_json_atomic(tmp / "manifest.json", manifest)
    return target
