"""QLoRA on a GPU: fedtune's training loop with the base held as train-local holds it by default (float32 weights,
bf16 autocast: quantization "none") vs in 4-bit NF4 with bf16 compute (lora.quantization: 4bit), and one process
vs two (data-parallel under torchrun, when the machine has two GPUs).

    HF_HUB_OFFLINE=1 python benchmarks/qlora_gpu.py                        # 1.1B Llama (TinyLlama shape)
    HF_HUB_OFFLINE=1 python benchmarks/qlora_gpu.py --preset llama-tiny --steps 3   # checks the script in seconds

The model is built from a config with random weights (nothing is downloaded) and saved once as safetensors, so
each run loads it through fedtune.models.load_base_model exactly as train-local does. Every run is its own process
(its peak GPU memory is its own): LoRA r 8 / alpha 16 on q_proj,v_proj, random tokens, bf16 autocast. Tokens/s
counts the steps after the warm-up. Prints one JSON record; it needs a CUDA GPU, and bitsandbytes for the 4-bit
runs (pip install "fedtune[qlora]").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {  # the shapes of train_throughput.py
    "llama-tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # ~1.1B parameters, the shape of TinyLlama-1.1B
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build(preset: str, folder: Path) -> None:
    """Save a random-init Llama of `preset` as a safetensors model folder (bf16: half the bytes to write and read)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising a billion parameters on the CPU takes longer than the benchmark
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[preset]))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def child(args) -> dict | None:
    """One run, in this process (or in each process of a torchrun group): load, wrap in LoRA, train, measure."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from fedtune import launch
    from fedtune.config import TrainingSettings
    from fedtune.models import load_base_model
    from fedtune.train import train_loop

    rank, world = launch.group()
    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.cuda.reset_peak_memory_stats()
    base = load_base_model(args.model_dir, quantization=args.child)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    steps = args.steps + args.warmup
    rng = np.random.default_rng(0)
    ids = rng.integers(0, base.config.vocab_size, size=(args.batch_size * steps, args.seq_len), dtype=np.int64)
    ticks: list[float] = []

    def tick(_step: int, _loss: float) -> None:
        torch.cuda.synchronize()
        ticks.append(time.perf_counter())

    result = train_loop(model, ids, ids.copy(), TrainingSettings(steps=steps, lr=2e-4, batch_size=args.batch_size),
                        seed=0, log=tick)
    seconds = ticks[-1] - ticks[args.warmup - 1] if args.warmup else ticks[-1] - ticks[0]
    timed = args.steps if args.warmup else args.steps - 1
    factors = {p.dtype for n, p in result.model.named_parameters() if "lora_" in n}
    record = {
        "quantization": args.child, "processes": world, "steps_timed": timed, "seconds": seconds,
        # batch_size sequences per step in all, however many processes share them
        "tokens_per_second": timed * args.batch_size * args.seq_len / seconds,
        "peak_gpu_mb_per_process": torch.cuda.max_memory_allocated() / 2**20,
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
        "lora_dtype": sorted(str(d) for d in factors),
        "device": torch.cuda.get_device_name(),
    }
    return record if rank == 0 else None


def run(args, mode: str, processes: int) -> dict:
    command = [__file__, "--child", mode, "--model-dir", str(args.model_dir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"quantization": mode, "processes": processes, "error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (split over the processes)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--save", type=Path, help="also write the JSON record to this file")
    parser.add_argument("--child", choices=["none", "4bit"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        fail("qlora_gpu.py needs a CUDA GPU (torch sees none); run it on a machine with one")
    if args.child:
        record = child(args)
        if record is not None:
            print(json.dumps(record))
        return
    sys.path.insert(0, str(ROOT))
    from fedtune import qlora

    if qlora.missing():
        fail("qlora_gpu.py: 4-bit runs need " + " and ".join(qlora.missing()))
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="qlora-gpu-") as tmp:
        args.model_dir = Path(tmp) / args.preset
        build(args.preset, args.model_dir)
        runs = [("none", 1), ("4bit", 1)] + ([("none", 2), ("4bit", 2)] if gpus >= 2 else [])
        results = [run(args, mode, processes) for mode, processes in runs]
    by = {(r["quantization"], r["processes"]): r for r in results}
    record = {"model": f"{args.preset} (random init)", "batch_size": args.batch_size, "seq_len": args.seq_len,
              "steps": args.steps, "gpus": gpus, "results": results}
    if "tokens_per_second" in by.get(("4bit", 1), {}) and "tokens_per_second" in by[("none", 1)]:
        record["4bit_over_none"] = {
            "tokens_per_second": by[("4bit", 1)]["tokens_per_second"] / by[("none", 1)]["tokens_per_second"],
            "peak_gpu_mb": by[("4bit", 1)]["peak_gpu_mb_per_process"] / by[("none", 1)]["peak_gpu_mb_per_process"]}
    if args.save:
        args.save.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
