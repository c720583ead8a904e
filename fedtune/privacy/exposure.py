"""`fedtune audit`: what an adapter leaks about a site's training records, measured two ways.

Canary exposure (Carlini et al., "The Secret Sharer", 2019): each canary's secret is scored by its log-likelihood
after the canary's prompt and ranked among R random secrets of the same format; exposure = log2(R+1) − log2(rank).
A secret the model has not learnt ranks anywhere (exposure ≈ log2 e ≈ 1.44 on average); a memorized one ranks
first (exposure log2(R+1), ≈ 13.3 for R = 10⁴).

Membership inference (loss-based, calibrated by the base model): a row's score is its loss under the adapter
minus its loss under the base model. Training rows (members) score lower than held-out rows (non-members) when
the adapter fits its training records more than the records' distribution; the AUC of that test is
P(member scores lower than non-member), 0.5 when the adapter does not tell them apart.
"""

from __future__ import annotations

import copy
import inspect
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from fedtune import models
from fedtune.config import FederationConfig
from fedtune.data.prepared import read_prepared
from fedtune.errors import BadInput, StageFailed
from fedtune.models import IGNORE
from fedtune.privacy.canaries import CANARIES_FILE, Canary, CanarySet, SecretFormat, read_canaries, secret_tokens
from fedtune.registry import VERSION_RE, Registry

MIN_CANDIDATES = 10_000  # what the command line accepts: below this the exposure scale is too short to read
# Candidates per forward pass by default: as many as keep one batch's logits under 2^24 floats (64 MB), so a small
# vocabulary gets large batches and a 50k one about sixty.
LOGITS_BUDGET = 1 << 24


# --- canary exposure --------------------------------------------------------------------------------------

@torch.inference_mode()
def score_continuations(model, prompt: list[int], continuations: list[list[int]],
                        batch_size: int | None = None) -> np.ndarray:
    """Σ log p(token) of each continuation after `prompt`, in nats.

    The prompt is the same for every continuation, so it runs once; its key/value cache is copied across each
    batch, and a batch of continuations only runs its own tokens. The prompt's last logits give every
    continuation's first token. Continuations are batched by length, so no padding or mask is needed.
    `batch_size` None: sized by LOGITS_BUDGET.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if not prompt:
        raise StageFailed("the canary's prompt tokenizes to nothing; exposure needs a prompt")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed the cache argument (past_key_values → cache); the cache object is filled in place.
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    cache = DynamicCache(config=base.config)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **{cache_arg: cache})
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = np.zeros(len(continuations))
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, tokens in enumerate(continuations):
        by_length[len(tokens)].append(i)
    for length, members in by_length.items():
        if length == 0:
            continue
        size = batch_size or max(8, min(1024, LOGITS_BUDGET // (first.numel() * max(1, length - 1))))
        for begin in range(0, len(members), size):
            chunk = members[begin:begin + size]
            tokens = torch.tensor([continuations[i] for i in chunk], device=device)
            total = first[tokens[:, 0]]
            if length > 1:
                batch_cache = copy.deepcopy(cache)  # the forward pass extends the cache it is given
                batch_cache.batch_repeat_interleave(len(chunk))
                logits = model(input_ids=tokens[:, :-1], use_cache=True, **{cache_arg: batch_cache}).logits.float()
                picked = logits.gather(-1, tokens[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1)
                total = total + picked.sum(dim=-1)
            scores[chunk] = total.double().cpu().numpy()
    return scores


def exposure_of(true_score: float, candidate_scores: np.ndarray) -> tuple[float, float]:
    """(exposure, rank) of a secret among R candidates: rank = 1 + candidates scoring higher (ties count half),
    exposure = log2(R+1) − log2(rank)."""
    rank = 1 + float(np.sum(candidate_scores > true_score)) + 0.5 * float(np.sum(candidate_scores == true_score))
    return math.log2(len(candidate_scores) + 1) - math.log2(rank), rank


def draw_candidates(fmt: SecretFormat, secret: str, count: int) -> list[str]:
    """`count` distinct random secrets of `fmt`, none equal to `secret`, from the OS's random source."""
    if not 1 <= count < fmt.space:
        raise BadInput(f"--candidates {count}: give between 1 and {fmt.space - 1} (the secrets' format has "
                       f"{fmt.space})")
    numbers = secrets.SystemRandom().sample(range(fmt.space), count + 1)
    true = fmt.number(secret)
    return [fmt.render(n) for n in numbers if n != true][:count]


def canary_exposure(model, tokenizer, canary: Canary, fmt: SecretFormat, candidates: int = MIN_CANDIDATES,
                    batch_size: int | None = None) -> dict:
    """Exposure of one canary under `model`: {"exposure", "rank", "candidates", "seconds"}."""
    started = time.perf_counter()
    others = draw_candidates(fmt, canary.secret, candidates)
    prompt, tokens = secret_tokens(tokenizer, canary, [canary.secret] + others)
    scores = score_continuations(model, prompt, tokens, batch_size)
    exposure, rank = exposure_of(scores[0], scores[1:])
    return {"exposure": exposure, "rank": rank, "candidates": len(others),
            "seconds": round(time.perf_counter() - started, 3)}


# --- membership inference -----------------------------------------------------------------------------------

@torch.inference_mode()
def row_losses(model, ids: np.ndarray, labels: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Each row's mean next-token cross-entropy over its labelled tokens (NaN for a row with none)."""
    device = next(model.parameters()).device
    out = np.full(len(ids), np.nan)
    for begin in range(0, len(ids), batch_size):
        batch_ids = torch.as_tensor(ids[begin:begin + batch_size], device=device)
        batch_labels = torch.as_tensor(labels[begin:begin + batch_size], device=device)
        logits, target = models.labelled_logits(model, batch_ids, batch_labels)
        losses = torch.nn.functional.cross_entropy(logits, target, reduction="none").double()
        row = (batch_labels[:, 1:] != IGNORE).nonzero()[:, 0]  # the row of each labelled position, in order
        total = torch.zeros(len(batch_ids), dtype=torch.float64, device=device).index_add_(0, row, losses)
        count = torch.bincount(row, minlength=len(batch_ids)).double()
        out[begin:begin + len(batch_ids)] = (total / count).cpu().numpy()  # 0/0 → NaN: nothing to score
    return out


def membership_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(a member scores lower than a non-member), ties counting half: the Mann-Whitney U of the non-members
    over the pooled ranks, divided by the number of pairs."""
    members, non_members = np.asarray(members, float), np.asarray(non_members, float)
    if not len(members) or not len(non_members):
        raise ValueError("membership_auc needs at least one member and one non-member")
    ranks = rankdata(np.concatenate([non_members, members]))  # tied scores share their average rank
    u = ranks[:len(non_members)].sum() - len(non_members) * (len(non_members) + 1) / 2
    return float(u / (len(members) * len(non_members)))


def chance_std(members: int, non_members: int) -> float:
    """The AUC's standard deviation when members and non-members score alike (no leak)."""
    return math.sqrt((members + non_members + 1) / (12 * members * non_members))


def _sample(rows: np.ndarray, count: int) -> np.ndarray:
    return np.sort(np.asarray(secrets.SystemRandom().sample(rows.tolist(), count), dtype=np.int64))


def membership(model, train: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray],
               exclude: list[int], rows: int = 200, batch_size: int = 8, compare: bool = True) -> dict:
    """The loss-difference attack on a balanced random sample of at most `rows` train rows (members, leaving out
    `exclude`: the rows that hold canaries) and as many held-out rows (non-members).

    `model` is a peft model; its base is the reference (adapter disabled). With `compare` False (the model is
    the base itself) every score is 0 and the AUC 0.5 without running the model.
    """
    usable = [np.flatnonzero((labels[:, 1:] != IGNORE).any(axis=1)) for _, labels in (train, held_out)]
    usable[0] = np.setdiff1d(usable[0], np.asarray(exclude, dtype=np.int64))
    count = min(rows, len(usable[0]), len(usable[1]))
    result = {"members": count, "non_members": count, "auc": None, "chance_std": None}
    if count == 0:
        result["note"] = "no train or no held-out rows with labelled tokens to compare"
        return result
    scores = []
    for (ids, labels), candidates in zip((train, held_out), usable):
        picked = _sample(candidates, count)
        if not compare:
            scores.append(np.zeros(count))
            continue
        tuned = row_losses(model, ids[picked], labels[picked], batch_size)
        with model.disable_adapter():
            reference = row_losses(model, ids[picked], labels[picked], batch_size)
        scores.append(tuned - reference)
    result["auc"] = membership_auc(scores[0], scores[1])
    result["chance_std"] = chance_std(count, count)
    if not compare:
        result["note"] = "the base model against itself: no adapter, so no signal (AUC 0.5 by definition)"
    return result


# --- the audit stage ------------------------------------------------------------------------------------------

def _adapter_folder(adapter: str | Path, registry: Path | None) -> Path:
    text = str(adapter)
    if text == "latest" or VERSION_RE.match(text):
        if registry is None or not Registry(registry).exists():
            raise BadInput(f"{registry}: not a registry (no LATEST file); give the registry with --registry DIR, or "
                           f"the version folder's path as --adapter")
        book = Registry(registry)
        folder = book.latest() if text == "latest" else book.path_of(text)
        if not (folder / "manifest.json").is_file():
            raise BadInput(f"{book.root}: has no version {text} (LATEST is {book.latest_name()}); give an "
                           "existing version, latest or base")
        return folder
    if not Path(adapter).is_dir():
        raise BadInput(f"--adapter {adapter}: no such folder, and not a version name; give base, vNNNN, latest or "
                       "a version folder")
    return Path(adapter)


def _read_site(folder: Path, config: FederationConfig) -> dict:
    folder = Path(folder)
    if not (folder / "data_card.json").is_file():
        raise BadInput(f"{folder}: not a prepared folder (no data_card.json); give a folder `fedtune prepare --out` "
                       "wrote")
    card, train_ids, train_labels = read_prepared(folder, config, "train")
    config.require_site(card["site"], f"audit: {folder / 'data_card.json'}")
    _, eval_ids, eval_labels = read_prepared(folder, config, "eval")
    planted = read_canaries(folder, card)
    if planted is not None:
        note = None
    elif card.get("canaries", {}).get("count"):
        # The rows that hold them are unknown too, so the membership test cannot leave them out.
        note = (f"{folder / CANARIES_FILE} is missing, though the data card says {card['canaries']['count']} canaries "
                "were planted: copy it back to measure exposure")
    else:
        note = f"no {CANARIES_FILE} in {folder}: exposure needs canaries (prepare with --canaries N)"
    return {"folder": folder, "card": card, "train": (train_ids, train_labels), "eval": (eval_ids, eval_labels),
            "canaries": planted, "note": note}


def _exposures(model, tokenizer, planted: CanarySet, candidates: int, batch_size: int | None, log, label: str) -> dict:
    values, ranks = [], []
    for number, canary in enumerate(planted.canaries, start=1):
        result = canary_exposure(model, tokenizer, canary, planted.format, candidates, batch_size)
        values.append(result["exposure"])
        ranks.append(result["rank"])
        log(f"{label}: canary {number}/{len(planted.canaries)}: exposure {result['exposure']:.2f} "
            f"({result['seconds']:.1f} s)")
    return {"exposure": values, "exposure_mean": float(np.mean(values)), "ranks": ranks}


def audit_sites(
    config: FederationConfig,
    adapter: str | Path,
    data: list[Path],
    *,
    registry: Path | None = None,
    model_dir: Path | None = None,
    candidates: int = MIN_CANDIDATES,
    mia_rows: int = 200,
    batch_size: int | None = None,
    base_model=None,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Canary exposure and membership-inference AUC of `adapter` on each prepared site folder in `data`.

    Args:
        config: the federation.
        adapter: "base", a version name (vNNNN or latest) in `registry`, or a version or baseline folder (a global
            version's coordinator signature and files are checked).
        data: prepared site folders (their canaries.json, when `prepare --canaries` wrote one, gives the canaries).
        registry: where version names are looked up.
        model_dir: the folder holding this machine's copy of the base model (else FEDTUNE_MODEL_DIR or its id).
        candidates: R, random secrets each canary is ranked among.
        mia_rows: at most this many train rows and as many held-out rows in the membership test.
        batch_size: candidate secrets per forward pass (None: as many as LOGITS_BUDGET allows).
        base_model: an already loaded base model to reuse (left as it was on return).
        log: receives progress lines.

    Returns:
        {"adapter", "candidates", "exposure_max", "sites": {site: {"canaries", "repeats", "exposure" (one per
        canary, or None without canaries), "exposure_mean", "ranks", "mia_auc", "mia_rows": {"members",
        "non_members"}, "mia_chance_std", "notes"}}, "seconds"}
    """
    from fedtune.evaluate import _checked_adapter

    started = time.perf_counter()
    if not data:
        raise BadInput("audit: give at least one --data folder")
    if mia_rows < 1:
        raise BadInput(f"--mia-rows {mia_rows}: give at least 1")
    sites = []
    for folder in data:
        site = _read_site(folder, config)
        if any(site["card"]["site"] == seen["card"]["site"] for seen in sites):
            raise BadInput(f"{folder}: a second prepared folder for site '{site['card']['site']}'; give each site's "
                           "folder once")
        sites.append(site)
        if site["canaries"] is not None and not 1 <= candidates < site["canaries"].format.space:
            raise BadInput(f"--candidates {candidates}: give between 1 and {site['canaries'].format.space - 1} (the "
                           f"canaries of {folder} have {site['canaries'].format.space} possible secrets)")
    version = None if str(adapter) == "base" else _checked_adapter(_adapter_folder(adapter, registry), config)
    name = "base" if version is None else version[1]
    weights = models.locate_base(config.base_model.id, config.base_model.sha256, model_dir, "audit")
    tokenizer = models.load_tokenizer(weights)
    for site in sites:
        if site["card"].get("tokenizer", {}).get("fingerprint") != models.tokenizer_fingerprint(tokenizer):
            raise BadInput(f"{site['folder'] / 'data_card.json'}: prepared with another tokenizer than this base "
                           "model's; prepare it again")
    if base_model is None:
        log(f"audit: loading the base model from {weights}")
        base_model = models.load_base_model(weights)
    base_model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, version[0]) if version else base_model
    model.eval()
    report = {}
    try:
        for site in sites:
            label, card, planted = f"audit {name}: {site['card']['site']}", site["card"], site["canaries"]
            entry = {"canaries": 0, "repeats": 0, "exposure": None, "exposure_mean": None, "ranks": None, "notes": []}
            if planted is None:
                entry["notes"].append(site["note"])
            else:
                entry.update(canaries=len(planted.canaries), repeats=planted.canaries[0].repeats)
                entry.update(_exposures(model, tokenizer, planted, candidates, batch_size, log, label))
            log(f"{label}: membership inference")
            mia = membership(model, site["train"], site["eval"], planted.rows if planted else [], mia_rows,
                             compare=version is not None)
            entry.update(mia_auc=mia["auc"], mia_rows={"members": mia["members"], "non_members": mia["non_members"]},
                         mia_chance_std=mia["chance_std"])
            if "note" in mia:
                entry["notes"].append(f"membership inference: {mia['note']}")
            report[card["site"]] = entry
    finally:
        if model is not base_model:
            model.unload()  # gives the caller its base model back without LoRA layers
    return {"adapter": name, "candidates": candidates, "exposure_max": math.log2(candidates + 1), "sites": report,
            "seconds": round(time.perf_counter() - started, 2)}
