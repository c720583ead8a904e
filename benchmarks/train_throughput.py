"""Training throughput: fedtune's LoRA loop vs Hugging Face Trainer + peft, same model, data and settings.

    python benchmarks/train_throughput.py                      # embedded SmolLM2-135M on the CPU
    python benchmarks/train_throughput.py --preset llama-1b --seq-len 1024 --batch-size 8 --steps 50

Each trainer runs in its own process (so peak memory is its own) on identical packed sequences, with
LoRA r=8 on q_proj,v_proj, AdamW, constant lr, grad-norm clipping 1.0, bf16 autocast on GPU, fp32 on CPU.
Tokens/s counts the steps after the warm-up. Prints both, their ratio and peak memory; --json for a record.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    # a few-MB model to check the script itself in seconds
    "llama-tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # ~1.1B parameters, the shape of TinyLlama-1.1B; built from the config, random weights.
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
}


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.preset:
        torch.manual_seed(0)
        config = LlamaConfig(**PRESETS[args.preset])
        config._attn_implementation = "sdpa"
        # Initialising a billion parameters on the CPU takes longer than the benchmark itself.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return LlamaForCausalLM(config)
    from fedtune.models import load_base_model

    return load_base_model(args.model)


def build_data(args, vocab_size: int):
    """Packed [rows, seq_len] ids/labels: the quickstart records tokenized by the model's tokenizer, or
    random tokens for a preset model that has no tokenizer."""
    import numpy as np

    rows = args.batch_size * (args.steps + args.warmup)
    if args.preset:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, vocab_size, size=(rows, args.seq_len), dtype=np.int64)
        return ids, ids.copy()
    from fedtune.data.sources import read_records
    from fedtune.data.tokenize import pack, tokenize_record
    from fedtune.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    files = [Path(f) for f in args.data] or sorted((ROOT / "recipes/quickstart/data").glob("*.jsonl"))
    samples = [tokenize_record(tokenizer, r) for f in files for r in read_records(f)]
    if not samples:
        sys.exit("no training records: give --data FILE")
    ids, labels = pack(samples, args.seq_len, tokenizer.pad_token_id)
    reps = -(-rows // len(ids))
    return np.tile(ids, (reps, 1))[:rows].astype(np.int64), np.tile(labels, (reps, 1))[:rows].astype(np.int64)


def lora(model, args):
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def flops_per_token(model, seq_len: int) -> float:
    """Forward + activation-gradient FLOPs for LoRA training of a frozen base: ≈ 2 × (2N + 4·L·s·d)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 2 * (2 * n + 4 * cfg.num_hidden_layers * seq_len * cfg.hidden_size)


class StepClock:
    """Wall time at the end of each optimizer step (synchronised on GPU)."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_fedtune(args, model, ids, labels, clock):
    from fedtune.config import TrainingSettings
    from fedtune.train import train_loop

    settings = TrainingSettings(steps=args.steps + args.warmup, lr=args.lr, batch_size=args.batch_size)
    train_loop(model, ids, labels, settings, seed=0, log=lambda _s, _l: clock.tick())


def run_trainer(args, model, ids, labels, clock):
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            clock.tick()

    dataset = [{"input_ids": torch.from_numpy(i), "labels": torch.from_numpy(l)} for i, l in zip(ids, labels)]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup,
            learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", bf16=torch.cuda.is_available(), logging_strategy="no", save_strategy="no",
            report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator,
                callbacks=[Clock()]).train()


def child(args) -> dict:
    import torch

    torch.manual_seed(0)
    model = build_model(args)
    ids, labels = build_data(args, model.config.vocab_size)
    model = lora(model, args)
    if torch.cuda.is_available():
        model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    (run_fedtune if args.child == "fedtune" else run_trainer)(args, model, ids, labels, clock)
    timed = clock.times[args.warmup - 1 :] if args.warmup else [clock.times[0]] + clock.times
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    tokens = steps * args.batch_size * args.seq_len
    result = {
        "trainer": args.child, "steps_timed": steps, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["tflops"] = flops_per_token(model.get_base_model(), args.seq_len) * result["tokens_per_second"] / 1e12
        result["mfu"] = result["tflops"] / args.peak_tflops
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="build this model from a config instead")
    parser.add_argument("--data", nargs="*", default=[], help="raw files to train on [default: the quickstart recipe]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path, help="also write the JSON record to this file")
    parser.add_argument("--child", choices=["fedtune", "trainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    results = {}
    for which in ("fedtune", "trainer"):
        cmd = [sys.executable, __file__, "--child", which] + sys.argv[1:]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            sys.exit(f"{which} run failed:\n{done.stderr[-3000:]}")
        results[which] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = results["fedtune"]["tokens_per_second"] / results["trainer"]["tokens_per_second"]
    record = {"model": args.preset or args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "steps": args.steps, "results": results, "ratio": ratio}
    if args.save:
        args.save.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return
    print(f"model {record['model']}, batch {args.batch_size} × seq {args.seq_len}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, on {results['fedtune']['device']}")
    for name, label in (("fedtune", "fedtune loop"), ("trainer", "HF Trainer + peft")):
        r = results[name]
        line = f"  {label:<18} {r['tokens_per_second']:>10.1f} tokens/s   peak RSS {r['peak_rss_mb']:>7.0f} MB"
        if "peak_gpu_mb" in r:
            line += f"   peak GPU {r['peak_gpu_mb']:>7.0f} MB   {r['tflops']:.1f} TFLOP/s   MFU {100 * r['mfu']:.1f}%"
        print(line)
    print(f"  ratio fedtune / Trainer: {ratio:.3f}")


if __name__ == "__main__":
    main()
