"""The live transport (Flower) against the file transport: seconds per round, bytes on the wire, same versions.

    python benchmarks/live_transport.py --tiny --rounds 2             # a tiny random Llama: Flower's own cost
    python benchmarks/live_transport.py --rounds 2 --steps 12         # the embedded SmolLM2-135M-Instruct
    python benchmarks/live_transport.py --tiny --save benchmarks/results/live_transport_tiny.json

One federation of two sites (clinic and bank, recipes/quickstart's data), each with its own key pair, is built
under --work and copied twice, then run for --rounds rounds each way, every party as its own process:

  files   per round, `fedtune train-local` for both sites at once (two sites work in parallel), then
          `fedtune aggregate`; a round's seconds run from starting the two train-locals to aggregate's exit.
  live    `fedtune serve --insecure` with two `fedtune join`s on loopback; a round's seconds are the ServerApp's,
          from opening the round to committing its version (the SuperLink's start and the sites' joining are
          before round 1); bytes on the wire per site: the version's files sent and the update's files received.

Then each version's adapter sha256 is compared between the two registries: a live round and a file round with
the same seeds must make the same bytes. --tiny uses a 2-layer Llama (hidden 32) on the embedded model's
tokenizer, so the rounds are nearly all transport: process start-up, imports, Flower's messages. Both runs share
the machine's cores (train-local processes, or ClientApp processes), each with --threads torch threads (two sites
each using every core of a small machine slow each other down), and --repeat runs each transport again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITES = ("clinic", "bank")
FEDTUNE = [sys.executable, "-m", "fedtune.cli"]


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with the embedded model's tokenizer (random init, seeded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune import models

    embedded = models.locate_base("embedded:SmolLM2-135M-Instruct", None, None, "benchmark")
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build(work: Path, model: str, steps: int) -> Path:
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation
    from fedtune.wire.keys import SigningKey

    root = work / "federation"
    roster = []
    for site in SITES:
        key = SigningKey.generate()
        key.write(root / site / f"{site}.key", root / site / f"{site}.pub")
        roster.append({"name": site, "key": key.public, "exchange_key": key.exchange_public})
    settings = {"seq_len": 128, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                "training": {"steps": steps, "batch_size": 4, "lr": 0.002}}
    config = init_federation(root / "coordinator", roster, model, settings)
    model_dir = Path(model) if Path(model).is_dir() else None
    for site in SITES:
        prepare_site(config, site, [ROOT / "recipes" / "quickstart" / "data" / f"{site}.jsonl"],
                     root / site / "prepared", model_dir=model_dir)
    return root


def adapters(registry: Path) -> dict[str, str]:
    return {v.name: hashlib.sha256((v / "adapter_model.safetensors").read_bytes()).hexdigest()
            for v in sorted(registry.glob("v[0-9]*"))}


def run_files(fed: Path, rounds: int, model: list[str]) -> list[float]:
    coordinator = fed / "coordinator"
    seconds = []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        sites = [subprocess.Popen([*FEDTUNE, "train-local", "--config", str(coordinator / "federation.yaml"),
                                   "--site", site, "--key", str(fed / site / f"{site}.key"),
                                   "--data", str(fed / site / "prepared"), "--global", str(coordinator / "registry"),
                                   "--out", str(coordinator / "updates"), *model], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for site in SITES]
        if any(p.wait() for p in sites):
            raise SystemExit("train-local failed")
        subprocess.run([*FEDTUNE, "aggregate", "--config", str(coordinator / "federation.yaml"), "--registry",
                        str(coordinator / "registry"), "--updates", str(coordinator / "updates" / f"round-{number:04d}")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
    return seconds


def run_live(fed: Path, rounds: int, model: list[str]) -> dict:
    from fedtune.live.processes import Child, free_port

    coordinator = fed / "coordinator"
    address = f"127.0.0.1:{free_port()}"
    nodes = [Child(site, [*FEDTUNE, "join", "--config", str(coordinator / "federation.yaml"), "--site", site,
                          "--data", str(fed / site / "prepared"), "--key", str(fed / site / f"{site}.key"),
                          "--superlink", address, "--insecure", "--port", str(free_port()), *model],
                   dict(os.environ), log=fed / f"join-{site}.log") for site in SITES]
    try:
        started = time.perf_counter()
        done = subprocess.run([*FEDTUNE, "serve", "--config", str(coordinator / "federation.yaml"), "--registry",
                               str(coordinator / "registry"), "--updates", str(coordinator / "updates"), "--rounds",
                               str(rounds), "--insecure", "--address", address, "--json"],
                              capture_output=True, text=True)
        total = time.perf_counter() - started
    finally:
        for node in nodes:
            node.stop()
    if done.returncode:
        raise SystemExit(f"serve failed: {done.stderr}")
    result = json.loads(done.stdout)
    return {"seconds": [r["seconds"] for r in result["rounds"]], "total_seconds": total,
            "bytes": [r["bytes"] for r in result["rounds"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per site per round")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each transport")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every site process: the two "
                        "sites share this machine's cores (0: torch's default, all cores each)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--save", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by train-local, join and their ClientApps
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-live-bench-"))
    model = str(tiny_model(work / "tiny")) if args.tiny else "embedded:SmolLM2-135M-Instruct"
    fed = build(work, model, args.steps)
    model_args = ["--model", model] if args.tiny else []
    record: dict = {"model": "tiny llama (2 layers, hidden 32)" if args.tiny else model, "rounds": args.rounds,
                    "steps": args.steps, "threads_per_site": args.threads or "default", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "files": [], "live": [], "identical": []}
    for run in range(args.repeat):
        copies = {kind: work / f"{kind}-{run}" for kind in ("files", "live")}
        for folder in copies.values():
            shutil.copytree(fed, folder)
        record["files"].append(run_files(copies["files"], args.rounds, model_args))
        record["live"].append(run_live(copies["live"], args.rounds, model_args))
        record["identical"].append(adapters(copies["files"] / "coordinator" / "registry")
                                   == adapters(copies["live"] / "coordinator" / "registry"))
    print(f"{record['model']}, {args.rounds} rounds of {args.steps} steps, 2 sites "
          f"({record['threads_per_site']} threads each), {record['machine']}")
    for number in range(args.rounds):
        files = [run[number] for run in record["files"]]
        live = [run["seconds"][number] for run in record["live"]]
        wire = record["live"][0]["bytes"][number]
        print(f"round {number + 1}: files {statistics.median(files):.1f} s, live {statistics.median(live):.1f} s; "
              "on the wire " + ", ".join(f"{site} {t['sent']} B out / {t['received']} B in" for site, t in
                                         sorted(wire.items())))
    print(f"live, serve's whole run (SuperLink start, joins, rounds): "
          f"{statistics.median(r['total_seconds'] for r in record['live']):.1f} s")
    print(f"same versions both ways: {all(record['identical'])}")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(record, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
