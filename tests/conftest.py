"""Shared fixtures: a tiny random-init Llama with a tokenizer trained here, sample site data, and a
federation initialised on them. Everything is offline and takes a few seconds."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Hugging Face cache of the test session's own (read when huggingface_hub is imported): the tiny model is
# placed in it under a hub id, as a downloaded model would be, and nothing lands in the user's cache.
_HUB_CACHE = tempfile.mkdtemp(prefix="fedtune-test-hub-")
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
atexit.register(shutil.rmtree, _HUB_CACHE, ignore_errors=True)
os.environ.pop("FEDTUNE_MODEL_DIR", None)
TINY_HUB_ID = "fedtune-tests/tiny-llama"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOPICS = {
    "clinic": [
        ("What code is used for {x} hypertension?", "Use I10 for essential {x} hypertension without heart involvement."),
        ("How is {x} asthma coded?", "Asthma of {x} severity is coded in category J45 with a fifth character."),
        ("Which chapter covers {x} fractures?", "Injuries such as {x} fractures are in chapter 19, codes S00 to T88."),
    ],
    "bank": [
        ("What does {x} amortization mean?", "{x} amortization spreads a loan's repayment over scheduled instalments."),
        ("Define a {x} overdraft.", "A {x} overdraft lets an account go below zero up to an agreed limit."),
        ("What is a {x} escrow account?", "A {x} escrow account holds funds for a third party until conditions are met."),
    ],
    "dev": [
        ("How do we name {x} booleans?", "Prefix {x} booleans with is_, has_ or can_ so conditions read naturally."),
        ("Where do {x} tests live?", "Put {x} tests under tests/ mirroring the package layout."),
        ("How long may a {x} function be?", "Keep a {x} function under forty lines; split it when it grows."),
    ],
}
WORDS = ["alpha", "beta", "gamma", "delta", "north", "south", "early", "late", "small", "large", "quick", "plain"]


def site_records(site: str, count: int = 40) -> list[dict]:
    templates = TOPICS[site]
    records = []
    for i in range(count):
        q, a = templates[i % len(templates)]
        word = f"{WORDS[i % len(WORDS)]}-{i}"
        records.append({"instruction": q.format(x=word), "output": a.format(x=word)})
    return records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hub_snapshot(hub_id: str, revision: str = "0" * 40) -> Path:
    """The snapshot folder of `hub_id` in the session's Hugging Face cache, laid out as a download leaves it."""
    repo = Path(_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    folder = repo / "snapshots" / revision
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained on the sample data, in the session's
    Hugging Face cache as `fedtune-tests/tiny-llama` (the folder returned is its snapshot)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = hub_snapshot(TINY_HUB_ID)
    corpus = [f"{r['instruction']} {r['output']}" for site in TOPICS for r in site_records(site)]
    corpus += ["user assistant system", "Contact me at someone@example.org or +44 20 7946 0958."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token=None)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


TINY_OVERRIDES = {
    "seq_len": 32,
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "training": {"steps": 3, "batch_size": 4, "lr": 0.01},
    "data": {"eval_fraction": 0.2},
}


@pytest.fixture
def site_files(tmp_path) -> dict[str, Path]:
    return {site: write_jsonl(tmp_path / "raw" / f"{site}.jsonl", site_records(site)) for site in TOPICS}


@pytest.fixture
def federation(tmp_path, tiny_model):
    """(config, folder) of a federation of clinic, bank and dev on the tiny model, v0000 in its registry."""
    from fedtune.federation import init_federation

    folder = tmp_path / "fed"
    config = init_federation(folder, list(TOPICS), str(tiny_model), json.loads(json.dumps(TINY_OVERRIDES)))
    return config, folder


@pytest.fixture
def prepared(federation, site_files, tmp_path) -> dict[str, Path]:
    from fedtune.data import prepare_site

    config, _ = federation
    out = {}
    for site, path in site_files.items():
        out[site] = tmp_path / "prepared" / site
        prepare_site(config, site, [path], out[site])
    return out


@pytest.fixture
def round_one(federation, prepared, tmp_path) -> Path:
    """updates/round-0001 with one trained update per site."""
    from fedtune.train import train_local

    config, folder = federation
    for site, data in prepared.items():
        train_local(config, site, data, folder / "registry", tmp_path / "updates")
    return tmp_path / "updates" / "round-0001"


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `folder` (to prove nothing changed)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def decoded_tokens(folder: Path, tokenizer) -> str:
    """Every token of a prepared folder's train and eval splits, decoded back to text."""
    import pyarrow.parquet as pq

    texts = []
    for split in ("train", "eval"):
        table = pq.read_table(folder / f"{split}.parquet")
        texts.append(tokenizer.decode([t for row in table.column("input_ids").to_pylist() for t in row]))
    return "\n".join(texts)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the fedtune CLI in this process as `fedtune ARGS`; returns (exit code, stdout, stderr)."""
    from fedtune import cli

    old = sys.argv
    sys.argv = ["fedtune", *map(str, args)]
    code = 0
    try:
        cli.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err
