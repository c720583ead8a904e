"""Task metrics through EleutherAI's lm-eval harness (`evaluate --harness lm-eval`), offline.

Each site's held-out tasks become an lm-eval `generate_until` task built in code (its documents come from the
prepared tasks, nothing is downloaded), run on the already loaded model (with the version's adapter) wrapped in
lm-eval's HFLM, greedy, and scored by lm-eval with fedtune's own scorers (`process_results`), averaged by lm-eval's
`mean`. The prompt is given to lm-eval as text: the prompt tokens decoded, which HFLM encodes again without adding
a BOS (the chat template put in any the model needs). That is the one place the two paths could part: a decoded
prompt that does not encode back to the same tokens. `harness_answers` checks it and refuses such a prompt rather
than score another prompt than the built-in path does.
"""

from __future__ import annotations

import logging

from fedtune.errors import BadInput
from fedtune.tasks import METRICS, score

INSTALL = "pip install 'fedtune[eval]'"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BadInput(f"evaluate --harness lm-eval: lm-eval is not installed; {INSTALL}") from None


def _process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return score(results[0], doc["answer"])


def build_task(name: str, prompts: list[str], answers: list[str], max_new_tokens: int):
    """An lm-eval ConfigurableTask over in-memory documents {prompt, answer}: zero-shot, greedy, stopping at EOS."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    docs = datasets.Dataset.from_dict({"prompt": prompts, "answer": answers})
    config = {
        "task": name,
        "custom_dataset": lambda **_kwargs: {"test": docs},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "num_fewshot": 0,
        # until [] leaves only HFLM's own stop, the tokenizer's EOS; the model's generation config adds its own
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "process_results": _process_results,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }
    return ConfigurableTask(config=config)


def harness_answers(model, tokenizer, site_tasks: dict[str, list[tuple[list[int], str]]], max_new_tokens: int,
                    batch_size: int = 8) -> dict[str, tuple[list[str], dict[str, float]]]:
    """Run every site's tasks through lm-eval: site → (answers in the tasks' order, lm-eval's metric means)."""
    require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # its notes about a preloaded model are not the user's
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
    tasks, texts = {}, {}
    for site, items in site_tasks.items():
        texts[site] = [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                       for ids, _ in items]
        for (ids, _), text in zip(items, texts[site]):
            if tokenizer(text, add_special_tokens=False)["input_ids"] != list(ids):
                raise BadInput(f"site {site}: a held-out prompt does not encode back to its own tokens through "
                               "text, so lm-eval would answer another prompt; use --harness fedtune")
        tasks[f"fedtune_{site}"] = build_task(f"fedtune_{site}", texts[site], [a for _, a in items], max_new_tokens)
    results = evaluator.evaluate(lm=lm, task_dict=tasks, bootstrap_iters=0, log_samples=True)
    out = {}
    for site in site_tasks:
        name = f"fedtune_{site}"
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        answers = [s["filtered_resps"][0] for s in samples]
        means = {m: float(results["results"][name][f"{m},none"]) for m in METRICS}
        out[site] = (answers, means)
    return out
