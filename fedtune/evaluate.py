"""`fedtune evaluate`: token-weighted loss and perplexity of the base model or a global version on
each site's prepared eval split."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fedtune import models, tasks
from fedtune.config import FederationConfig
from fedtune.data.prepared import read_prepared
from fedtune.errors import BadInput
from fedtune.adapter import ADAPTER_FILE
from fedtune.artifacts import read_json, sha256_file
from fedtune.lmeval_task import harness_answers, require_lm_eval
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
    task_examples: int = 0,
    max_new_tokens: int = tasks.DEFAULT_MAX_NEW_TOKENS,
    samples: int = 0,
    harness: str = "fedtune",
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
        task_examples: also answer up to this many of each site's held-out prompts (greedy) and score the answers
            (0: loss only).
        max_new_tokens: the longest answer generated.
        samples: also give this many prompts per site with the base model's and the adapter's answers side by side.
        harness: "fedtune" (generation here) or "lm-eval" (EleutherAI's harness on the same model and tasks).

    Returns:
        {"adapter": …, "sites": {site: {"loss", "perplexity", "tokens", "task"?}}, "samples"?, "notes"?}: "task"
        is {"exact_match", "token_f1", "rouge_l", "examples", "max_new_tokens"} for each site with held-out tasks;
        "samples" [{"site", "prompt", "reference", "base", "version"}] ("version" None for the base model);
        "notes" says why a site has no task metrics.
    """
    if not data:
        raise BadInput("evaluate: give at least one --data folder")
    tasks.check_task_options(task_examples, max_new_tokens, samples, harness)
    if harness == "lm-eval" and task_examples:
        require_lm_eval()
    notes: list[str] = []
    weights = tokenizer = None
    if base_model is None or task_examples:
        weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "evaluate")
    if task_examples:
        tokenizer = models.load_tokenizer(weights)
    site_tasks = tasks.load_site_tasks(data, config, task_examples, tokenizer, notes) if task_examples else {}
    if task_examples and not site_tasks and (samples or harness != "fedtune"):
        raise BadInput(f"evaluate: --{'samples' if samples else 'harness'} needs held-out tasks and no site has "
                       f"any: {notes[0]}")
    splits = []
    for folder in data:
        card, ids, labels = read_prepared(Path(folder), config, "eval")
        if any(card["site"] == seen for seen, _, _ in splits):
            raise BadInput(f"{folder}: a second eval split for site '{card['site']}'; give each site's folder once")
        splits.append((card["site"], torch.from_numpy(ids), torch.from_numpy(labels)))
    if base_model is None:
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
        shown = []
        if site_tasks:
            answers = _task_answers(model, tokenizer, site_tasks, max_new_tokens, batch_size, harness, name, log)
            for site, (_answers, metrics) in answers.items():
                sites[site]["task"] = {**metrics, "examples": len(site_tasks[site]), "max_new_tokens": max_new_tokens}
            if samples:
                shown = _samples(model, tokenizer, site_tasks, answers, samples, max_new_tokens, name, log)
    finally:
        if model is not base_model:
            model.unload()  # gives the caller its base model back without LoRA layers
    for note in notes:
        log(f"note: {note}")
    return {"adapter": name, "sites": sites, **({"samples": shown} if samples else {}),
            **({"notes": notes} if notes else {})}


def _task_answers(model, tokenizer, site_tasks: dict, max_new_tokens: int, batch_size: int, harness: str, name: str,
                  log: Callable[[str], None]) -> dict[str, tuple[list[str], dict[str, float]]]:
    """site → (the model's answers to its held-out prompts, their metric means), by the harness asked for."""
    if harness == "lm-eval":
        log(f"evaluate {name}: answering {sum(map(len, site_tasks.values()))} held-out prompts through lm-eval")
        return harness_answers(model, tokenizer, site_tasks, max_new_tokens, batch_size)
    out = {}
    for site, items in site_tasks.items():
        log(f"evaluate {name}: site {site}: answering {len(items)} held-out prompts (greedy, up to "
            f"{max_new_tokens} tokens)")
        answers = tasks.generate(model, tokenizer, [ids for ids, _ in items], max_new_tokens, batch_size)
        out[site] = (answers, tasks.mean_scores(answers, [answer for _, answer in items]))
    return out


def _samples(model, tokenizer, site_tasks: dict, answers: dict, count: int, max_new_tokens: int, name: str,
             log: Callable[[str], None]) -> list[dict]:
    """The first `count` tasks of each site with the base model's answer beside the adapter's."""
    shown = []
    for site, items in site_tasks.items():
        items = items[:count]
        if name == "base":
            base = answers[site][0][:count]
        else:
            log(f"evaluate {name}: site {site}: the base model's answers to {len(items)} samples")
            with model.disable_adapter():
                base = tasks.generate(model, tokenizer, [ids for ids, _ in items], max_new_tokens)
        for i, (ids, reference) in enumerate(items):
            shown.append({"site": site, "prompt": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                          "reference": reference, "base": base[i],
                          "version": None if name == "base" else answers[site][0][i]})
    return shown


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
