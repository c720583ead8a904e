"""Training throughput: fedtune's LoRA loop vs TRL's SFTTrainer (and the plain Hugging Face Trainer), same model,
data and settings.

    python benchmarks/train_throughput.py --repeats 3              # embedded SmolLM2-135M on the CPU
    python benchmarks/train_throughput.py --preset llama-tiny --steps 5 --peers fedtune trl   # checks the script
    python benchmarks/train_throughput.py --preset llama-1b --seq-len 1024 --batch-size 8 --steps 50

Each trainer runs in its own process (so peak memory and whole-process time are its own) on identical packed
sequences, with LoRA r 8 / alpha 16 on q_proj,v_proj, AdamW at a constant lr, grad-norm clipping 1.0, no gradient
checkpointing, bf16 autocast on GPU and fp32 on CPU. Tokens/s counts the steps after the warm-up; whole-process
time is the child process's wall time, from interpreter start to exit (imports, model load, data, training).
With --repeats the peers take turns and the medians are reported, with the load average around each run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
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
PEERS = {"fedtune": "fedtune loop", "trl": "TRL SFTTrainer", "trainer": "HF Trainer + peft"}


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


def build_tokenizer(args):
    """The model's tokenizer; for a preset model (no tokenizer of its own) a two-token one that only names the pad
    and end-of-sequence ids, which is all TRL asks of it on pre-tokenized data."""
    if not args.preset:
        from fedtune.models import load_tokenizer

        return load_tokenizer(args.model)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


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

    tokenizer = build_tokenizer(args)
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
    """Wall time and this process's CPU time at the end of each optimizer step (synchronised on GPU)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def tick(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def run_fedtune(args, model, ids, labels, clock):
    from fedtune.config import TrainingSettings
    from fedtune.train import train_loop

    settings = TrainingSettings(steps=args.steps + args.warmup, lr=args.lr, batch_size=args.batch_size)
    train_loop(model, ids, labels, settings, seed=0, log=lambda _s, _l: clock.tick())


def _common_args(args) -> dict:
    """TrainingArguments both Hugging Face peers share: the settings fedtune's loop runs with."""
    import torch

    return dict(
        per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=torch.cuda.is_available(), gradient_checkpointing=False, logging_strategy="no", save_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )


def _clock_callback(clock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            clock.tick()

    return Clock()


def run_trainer(args, model, ids, labels, clock):
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    dataset = [{"input_ids": torch.from_numpy(i), "labels": torch.from_numpy(l)} for i, l in zip(ids, labels)]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, **_common_args(args))
        Trainer(model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator,
                callbacks=[_clock_callback(clock)]).train()


def run_trl(args, model, ids, labels, clock):
    """TRL's SFTTrainer on the same packed rows: pre-tokenized, so TRL neither tokenizes nor packs again; its
    collator takes the labels as given (-100 where no loss is taken)."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_length=args.seq_len, packing=False,
                           dataset_kwargs={"skip_prepare_dataset": True}, **_common_args(args))
        SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=build_tokenizer(args),
                   callbacks=[_clock_callback(clock)]).train()


RUNNERS = {"fedtune": run_fedtune, "trl": run_trl, "trainer": run_trainer}


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
    RUNNERS[args.child](args, model, ids, labels, clock)
    timed = clock.times[args.warmup - 1 :] if args.warmup else [clock.times[0]] + clock.times
    cpu = clock.cpu[args.warmup - 1 :] if args.warmup else [clock.cpu[0]] + clock.cpu
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    tokens = steps * args.batch_size * args.seq_len
    result = {
        "trainer": args.child, "steps_timed": steps, "seconds": seconds, "tokens_per_second": tokens / seconds,
        # CPU seconds (all threads): the work done, which other processes on a shared machine change far less
        # than the wall time.
        "cpu_seconds": cpu[-1] - cpu[0], "tokens_per_cpu_second": tokens / (cpu[-1] - cpu[0]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["tflops"] = flops_per_token(model.get_base_model(), args.seq_len) * result["tokens_per_second"] / 1e12
        result["mfu"] = result["tflops"] / args.peak_tflops
    return result


def run_child(which: str, argv: list[str]) -> dict:
    """One peer in a fresh process; its whole-process wall time and the load average before and after."""
    cmd = [sys.executable, __file__, "--child", which] + argv
    load_before = os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    whole = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{which} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (used.ru_utime + used.ru_stime)
    return {**result, "whole_process_seconds": whole, "whole_process_cpu_seconds": cpu,
            "load_average": [load_before, os.getloadavg()[0]]}


def summarize(runs: list[dict], peers: list[str]) -> dict:
    """Per peer the median of its runs; ratios are the medians of the per-repeat ratios (each repeat's runs were
    taken back to back, so they saw much the same load)."""
    by_peer = {p: [r for r in runs if r["trainer"] == p] for p in peers}
    results = {}
    for peer, mine in by_peer.items():
        results[peer] = {**mine[-1], **{k: statistics.median(r[k] for r in mine)
                                        for k in ("seconds", "tokens_per_second", "cpu_seconds",
                                                  "tokens_per_cpu_second", "whole_process_seconds",
                                                  "whole_process_cpu_seconds", "peak_rss_mb")}}
        results[peer].pop("load_average", None)
    ratios = {}
    for peer in peers[1:]:
        pairs = list(zip(by_peer["fedtune"], by_peer[peer]))
        ratios[peer] = {
            "tokens_per_second": statistics.median(f["tokens_per_second"] / o["tokens_per_second"] for f, o in pairs),
            "whole_process": statistics.median(o["whole_process_seconds"] / f["whole_process_seconds"] for f, o in pairs),
            "tokens_per_cpu_second": statistics.median(f["tokens_per_cpu_second"] / o["tokens_per_cpu_second"]
                                                       for f, o in pairs),
            "whole_process_cpu": statistics.median(o["whole_process_cpu_seconds"] / f["whole_process_cpu_seconds"]
                                                   for f, o in pairs),
        }
    return {"results": results, "ratios": ratios}


def child_argv(args) -> list[str]:
    """The options a child process needs: what is trained and how, not what the parent does with the results."""
    argv = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
            "--peak-tflops", str(args.peak_tflops)]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.data:
        argv += ["--data", *args.data]
    return argv


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
    parser.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=["fedtune", "trl", "trainer"],
                        help="trainers to run; fedtune is always first, the others are compared with it")
    parser.add_argument("--repeats", type=int, default=1, help="run every peer this many times, taking turns")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path, help="also write the JSON record to this file")
    parser.add_argument("--child", choices=sorted(PEERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    peers = ["fedtune"] + [p for p in dict.fromkeys(args.peers) if p != "fedtune"]
    if "trl" in peers and importlib.util.find_spec("trl") is None:
        print("trl is not installed: TRL's SFTTrainer is left out (pip install trl)", file=sys.stderr)
        peers.remove("trl")
    argv = child_argv(args)
    runs = []
    for repeat in range(args.repeats):
        for which in peers:
            runs.append(run_child(which, argv))
            if not args.json:
                r = runs[-1]
                print(f"  repeat {repeat + 1}/{args.repeats} {which:<8} {r['tokens_per_second']:>9.1f} tokens/s "
                      f"{r['tokens_per_cpu_second']:>8.1f} per CPU s  whole process {r['whole_process_seconds']:6.1f} s "
                      f"({r['whole_process_cpu_seconds']:.1f} CPU s)  load {r['load_average'][0]:.1f}", file=sys.stderr)
    summary = summarize(runs, peers)
    record = {"model": args.preset or args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, **summary,
              "ratio": summary["ratios"][peers[1]]["tokens_per_second"] if len(peers) > 1 else None,
              "runs": runs}
    if args.save:
        args.save.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return
    results = summary["results"]
    print(f"model {record['model']}, batch {args.batch_size} × seq {args.seq_len}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, on {results['fedtune']['device']}; median of {args.repeats} run(s) each")
    for name in peers:
        r = results[name]
        line = (f"  {PEERS[name]:<18} {r['tokens_per_second']:>10.1f} tokens/s ({r['tokens_per_cpu_second']:.1f} per CPU s)"
                f"   whole process {r['whole_process_seconds']:>7.1f} s ({r['whole_process_cpu_seconds']:.1f} CPU s)"
                f"   peak RSS {r['peak_rss_mb']:>7.0f} MB")
        if "peak_gpu_mb" in r:
            line += f"   peak GPU {r['peak_gpu_mb']:>7.0f} MB   {r['tflops']:.1f} TFLOP/s   MFU {100 * r['mfu']:.1f}%"
        print(line)
    for peer, ratio in summary["ratios"].items():
        print(f"  ratio fedtune / {PEERS[peer]}: {ratio['tokens_per_second']:.3f} (tokens/s), "
              f"{ratio['whole_process']:.3f} (whole process); by CPU time {ratio['tokens_per_cpu_second']:.3f} "
              f"(tokens), {ratio['whole_process_cpu']:.3f} (whole process)")
    loads = [r["load_average"][0] for r in runs]
    print(f"  load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f}")


if __name__ == "__main__":
    main()
