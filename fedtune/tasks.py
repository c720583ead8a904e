"""Task metrics: does an adapter answer a site's held-out prompts better, not only lower its loss?

Each site's held-out generation tasks (`prepare` writes them to eval_tasks.parquet: a conversation's prompt up to
its last assistant turn, and that turn's text) are answered by greedy decoding, and each answer is scored against
the site's own by exact match and token F1 (SQuAD's normalisation: lower case, no punctuation, no articles, single
spaces) and ROUGE-L (Google's rouge-score, the scorer lm-eval uses, on the same normalised tokens).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from fedtune.config import FederationConfig
from fedtune.data.prepared import read_eval_tasks
from fedtune.errors import BadInput

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TASK_EXAMPLES = 32
METRICS = ("exact_match", "token_f1", "rouge_l")
HARNESSES = ("fedtune", "lm-eval")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over normalised tokens (two empty answers agree: 1.0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


class _Normalized:
    """rouge-score's tokenizer interface over SQuAD-normalised tokens. Its default tokenizer keeps only [a-z0-9],
    which would score every answer in a non-Latin script 0; this one keeps letters of any script."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), as rouge-score computes it."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Normalized())
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def score(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of one answer."""
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}


def mean_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Each metric's mean over the answers."""
    rows = [score(p, r) for p, r in zip(predictions, references)]
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRICS}


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and whatever the model's generation config names
    (an instruct model's end of turn is often there and not the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             log: Callable[[str], None] = lambda _msg: None) -> list[str]:
    """Greedy answers to `prompts` (token ids), batched and left-padded, in the prompts' order.

    Prompts are taken longest first, as lm-eval's HFLM takes them, so both pad a batch the same way and give the
    same answers. An answer ends at the first stop token; its text is decoded without special tokens.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad, eos_token_id=stops, use_cache=True)
        for row, i in enumerate(chunk):
            tokens = out[row, width:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            answers[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        log(f"generated {min(start + batch_size, len(order))}/{len(order)} answers")
    return answers


def load_site_tasks(folders: list[Path], config: FederationConfig, examples: int, tokenizer,
                    notes: list[str]) -> dict[str, list[tuple[list[int], str]]]:
    """Each site's first `examples` held-out tasks as (prompt ids, reference answer text); a site without any gets
    a line in `notes` and no entry."""
    tasks = {}
    for folder in folders:
        card, site_tasks = read_eval_tasks(Path(folder), config)
        if site_tasks is None:
            notes.append(f"site {card['site']}: no task metrics: {folder} was prepared before fedtune kept "
                         "held-out prompts; run `fedtune prepare` again")
        elif not site_tasks:
            notes.append(f"site {card['site']}: no task metrics: its held-out records have no assistant turn "
                         "(plain text); only conversations give prompts and answers")
        else:
            tasks[card["site"]] = [(prompt, tokenizer.decode(answer, skip_special_tokens=True).strip())
                                   for prompt, answer in site_tasks[:examples]]
    return tasks


def check_task_options(task_examples: int, max_new_tokens: int, samples: int, harness: str) -> None:
    if task_examples < 0 or samples < 0:
        raise BadInput(f"evaluate: --task-examples {task_examples} --samples {samples}: give 0 or more")
    if max_new_tokens < 1:
        raise BadInput(f"evaluate: --max-new-tokens {max_new_tokens}: give 1 or more")
    if harness not in HARNESSES:
        raise BadInput(f"evaluate: --harness {harness}: unknown; choose {' or '.join(HARNESSES)}")
    if samples > task_examples:
        raise BadInput(f"evaluate: --samples {samples} is more than --task-examples {task_examples}; samples are "
                       "taken from the tasks scored")


def task_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a simulate report's task metrics: one row per adapter evaluated (base, versions,
    baselines), one column per site holding "exact match / token F1 / ROUGE-L" ("-" where not evaluated)."""
    tasks = report.get("tasks") or {}
    sites = list(report["base"])
    rows = [[name] + [("{exact_match:.2f} / {token_f1:.2f} / {rouge_l:.2f}".format(**entry[site]) if site in entry
                       else "-") for site in sites]
            for name, entry in tasks.items()]
    return ["adapter", *sites], rows
