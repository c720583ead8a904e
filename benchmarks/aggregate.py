"""Aggregation: fedtune's streaming merge vs Flower's `aggregate` and peft's `add_weighted_adapter`.

    python benchmarks/aggregate.py                          # 7B-Llama LoRA shapes at 4, 16, 64 sites + whole process
    python benchmarks/aggregate.py --sites 4,16             # less disk (1.1 GB instead of 4.3 GB of updates)
    python benchmarks/aggregate.py --preset tiny --whole-preset tiny --sites 2,4 --repeat 1   # checks the script
    python benchmarks/aggregate.py --only none --whole-repeat 5 --whole-rows threads2,before --before-tree /tmp/old
                                                            # whole process only, against an earlier source tree

Round 1 of a real federation is built on disk under --work (reused by later runs): federation.yaml with
a coordinator key and a roster of 64 sites, each with its own Ed25519 key; a registry whose v0000 is
signed by the coordinator the way `fedtune init` signs it; and rounds/kK/round-0001/<site>/ holding
random deltas N(0, 1e-3) encoded and signed by `fedtune.wire.update.encode_update` (manifest.json +
manifest.sig), so `fedtune aggregate` accepts every one with signatures on. Every contender runs in
its own process, on warm page-cache files, so peak RSS is its own:

  fedtune ...        `merge_tensors` in-process on the private copies that `collect_round` made while
                     validating (untimed): the merge `fedtune aggregate` runs (numpy for fedavg, torch for
                     trimmed-mean and svd), reading the files key by key; returns parent + merged delta.
  flower ...         `flwr.server.strategy.aggregate.aggregate` / `aggregate_trimmed_avg(…, 0.2)` on the
                     arrays as a Flower server holds them (list[(NDArrays, num_examples)], loaded untimed);
                     returns the merged delta.
  peft ...           `add_weighted_adapter` on a peft model holding every site's adapter (parent + delta;
                     base weights are stride-0 views, so only the LoRA factors use memory). "linear" is
                     A ← Σ√(p_k·s)·A_k, B ← Σ√(p_k·s)·B_k (not fedavg's product, same cost); "svd" forms
                     each dense d×k product and takes its SVD.
  whole process      `fedtune aggregate` (signature checks, validation, merge, write, commit), with
                     fedtune's default settings, vs "the Flower way": a process that loads every update
                     with safetensors.numpy, runs `aggregate`, adds the parent and saves. --whole-rows adds
                     aggregation.report_error: true (error), FEDTUNE_THREADS=2 (threads2) and an earlier
                     fedtune source tree (before, --before-tree DIR, e.g. `git archive HEAD | tar -x -C DIR`).
                     The rows run interleaved; each fedtune row's v0001 sha256 is recorded (the same bytes
                     from every row and run), with the load average before each run and the thread count
                     the merge chose.

Prints wall time (the median of the runs after the first in one process, and the first run), update
GB/s (total update bytes / wall time), peak RSS (VmHWM, file pages mapped by mmap included) and peak
anonymous RSS, the speed ratio (peer time / fedtune time: > 1 means fedtune faster), then PASS/MISS for
each goal. --save writes JSON (benchmarks/results/aggregate_cpu.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAVE = ROOT / "benchmarks" / "results" / "aggregate_cpu.json"
ADAPTER = "adapter_model.safetensors"
FAKE_SHA = "5eed" * 16  # the base model's fingerprint: never loaded, only compared
ROSTER = 64  # sites on the federation's roster (a round uses the first K of them)
GENERATOR = 2  # bump when the generated data changes, to rebuild cached rounds

# LoRA shapes: module path → (in_features, out_features); lora_A is [r, in], lora_B [out, r].
_LLAMA_7B = {f"self_attn.{m}_proj": (4096, 4096) for m in "qkvo"}
_SMOLLM2 = {
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
PRESETS = {
    # r 16 on q,k,v,o of a 7B Llama (32 layers of width 4096): 67 MB of float32 per update.
    "llama-7b": {"model": "llama-7b-shapes", "layers": 32, "r": 16, "alpha": 32, "modules": _LLAMA_7B},
    # r 64 on every linear layer of SmolLM2-135M (30 layers, hidden 576, intermediate 1536, 3 kv heads): 78 MB.
    "smollm2-135m": {"model": "smollm2-135m-shapes", "layers": 30, "r": 64, "alpha": 128, "modules": _SMOLLM2},
    # a few hundred KB, to check the script itself in seconds
    "tiny": {"model": "tiny-shapes", "layers": 2, "r": 4, "alpha": 8,
             "modules": {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32)}},
}

# Rows of the in-process table: name → (kind, parameters, what it computes).
CONTENDERS = {
    "fedtune fedavg": ("engine", {"method": "fedavg", "report_error": False},
                       "merge_tensors, fedavg, report_error=False: parent + Σp_k·δ_k per key"),
    "fedtune fedavg+err": ("engine", {"method": "fedavg", "report_error": True},
                           "merge_tensors, fedavg with report_error=True: also the per-layer ‖ΔW*−B′A′‖/‖ΔW*‖"),
    "fedtune trimmed": ("engine", {"method": "trimmed-mean", "trim": 0.2},
                        "merge_tensors, trimmed-mean 0.2 (unweighted, per coordinate)"),
    "fedtune svd": ("engine", {"method": "svd"},
                    "merge_tensors, svd: exact mean of the products, rank-r re-factoring via QR + small SVD"),
    "flower aggregate": ("flower", {"fn": "aggregate"}, "flwr aggregate(results): weighted mean of the deltas"),
    "flower trimmed": ("flower", {"fn": "trimmed"}, "flwr aggregate_trimmed_avg(results, 0.2)"),
    "peft linear": ("peft", {"combination": "linear"},
                    "add_weighted_adapter linear: A←Σ√(p·s)A_k, B←Σ√(p·s)B_k over all sites' adapters"),
    "peft svd": ("peft", {"combination": "svd"},
                 "add_weighted_adapter svd: Σp_k·ΔW_k dense per module + full SVD (timed on a subset, scaled)"),
}
# fedtune row → the peer rows it is compared with (speed ratio = peer time / fedtune time).
PEERS = {
    "fedtune fedavg": ["flower aggregate", "peft linear"],
    "fedtune fedavg+err": ["flower aggregate", "peft linear"],
    "fedtune trimmed": ["flower trimmed"],
    "fedtune svd": ["peft svd"],
}


# --------------------------------------------------------------------------------------- shapes, data


def spec_of(preset: str) -> dict:
    return PRESETS[preset]


def lora_keys(spec: dict, layers: int | None = None) -> list[tuple[str, tuple[int, int]]]:
    """(key, shape) of every LoRA factor, in peft's naming."""
    r, out = spec["r"], []
    for i in range(spec["layers"] if layers is None else layers):
        for path, (fin, fout) in spec["modules"].items():
            prefix = f"base_model.model.model.layers.{i}.{path}"
            out.append((f"{prefix}.lora_A.weight", (r, fin)))
            out.append((f"{prefix}.lora_B.weight", (fout, r)))
    return out


def update_bytes(spec: dict) -> int:
    return sum(4 * a * b for _, (a, b) in lora_keys(spec))


def federation(layout: Layout, preset: str, report_error: bool | None = None):
    """The federation as federation.yaml holds it: the roster's and the coordinator's public keys from the
    key files under `layout`; aggregation.report_error is left at fedtune's default unless given."""
    from fedtune.config import FederationConfig
    from fedtune.wire.keys import read_public_file

    spec = spec_of(preset)
    return FederationConfig.model_validate({
        "name": f"bench-{preset}",
        "base_model": {"id": spec["model"], "sha256": FAKE_SHA},
        "lora": {"r": spec["r"], "alpha": spec["alpha"],
                 "target_modules": [path.rsplit(".", 1)[1] for path in spec["modules"]]},
        "aggregation": {} if report_error is None else {"report_error": report_error},
        "coordinator_key": read_public_file(layout.coordinator_pub),
        "sites": [{"name": site_name(i), "key": read_public_file(layout.site_key(i).with_suffix(".pub"))}
                  for i in range(ROSTER)],
    })


def site_name(index: int) -> str:
    return f"site{index:03d}"


def num_examples(index: int) -> int:
    return 50 + (index * 7919) % 451  # 50…500, different for each site


class Layout:
    """Where one preset's round lives under --work."""

    def __init__(self, work: Path, preset: str):
        from fedtune.registry import COORDINATOR_KEY

        self.root = work / preset
        self.fed = self.root / "fed"
        self.config = self.fed / "federation.yaml"
        self.config_error = self.fed / "federation-report-error-on.yaml"
        self.registry = self.fed / "registry"
        self.coordinator_key = self.fed / COORDINATOR_KEY  # beside the registry, where `fedtune aggregate` looks
        self.coordinator_pub = self.coordinator_key.with_suffix(".pub")
        self.keys = self.root / "keys"  # each site's private key (a site keeps its own; here one folder holds all)
        self.backup = self.root / "registry-backup"  # LATEST and log.jsonl as v0000 left them
        self.pool = self.root / "pool"
        self.stamp = self.root / "bench.json"

    def site_key(self, index: int) -> Path:
        return self.keys / f"{site_name(index)}.key"

    def round_dir(self, sites: int) -> Path:
        return self.root / "rounds" / f"k{sites}" / "round-0001"

    def update_files(self, sites: int) -> list[Path]:
        return [self.pool / site_name(i) / ADAPTER for i in range(sites)]


def cached_bytes(layout: Layout, sites: int) -> int:
    return sum(f.stat().st_size for f in layout.update_files(sites) if f.is_file())


def seeded_tensors(spec: dict) -> dict:
    """v0000's tensors with peft's init: A ~ U(±1/√in), B = 0 (no model is loaded for these shapes)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in lora_keys(spec):
        if key.endswith("lora_A.weight"):
            bound = 1 / shape[1] ** 0.5
            tensors[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            tensors[key] = torch.zeros(shape)
    return tensors


def init_registry(layout: Layout, preset: str) -> None:
    """Keys, federation.yaml and a signed v0000, made as `fedtune.federation.init_federation` makes them
    (which needs a real model to seed the adapter; these shapes have none)."""
    from fedtune.adapter import write_adapter
    from fedtune.artifacts import write_text_atomic
    from fedtune.config import federation_to_yaml
    from fedtune.federation import global_manifest
    from fedtune.registry import Registry, roster_sha256, version_name
    from fedtune.wire import SigningKey
    from fedtune.wire.version import write_version_manifest

    for index in range(ROSTER):
        SigningKey.generate().write(layout.site_key(index), layout.site_key(index).with_suffix(".pub"))
    coordinator = SigningKey.generate()
    coordinator.write(layout.coordinator_key, layout.coordinator_pub)
    config = federation(layout, preset)
    registry = Registry(layout.registry, coordinator)
    registry.root.mkdir(parents=True)
    with registry.lock("init"):
        built = registry.root / f".{version_name(0)}.init.tmp"
        built.mkdir()
        sha = write_adapter(built, seeded_tensors(spec_of(preset)), config)
        manifest = global_manifest(config, 0, sha, parent=None, method="seeded-init",
                                   params={"seed": config.seed}, contributors=[], rejected=[])
        write_version_manifest(built, manifest, coordinator)
        registry.commit(registry.publish(built, version_name(0)), {"roster_sha256": roster_sha256(config)})
    write_text_atomic(layout.config, federation_to_yaml(config))


def update_fields(config, parent: dict, index: int) -> dict:
    """A site's manifest fields as `fedtune.train.compute_update` fills them (encoding adds sha256, nonce, stamp)."""
    from fedtune.wire import UPDATE_FORMAT

    return {
        "format": UPDATE_FORMAT, "site": site_name(index), "round": 1,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "target_modules": config.lora.target_modules},
        "trained": "AB", "num_examples": num_examples(index), "num_tokens": 128 * num_examples(index),
        "train": {"steps": 20, "lr": 2e-3, "batch_size": 4, "grad_accum": 1, "loss_first": 2.5,
                  "loss_last": 2.0 - index / 1000, "seconds": 1.0, "tokens_per_second": 1.0},
        "privacy": {"mechanism": None},
    }


def build_round(layout: Layout, preset: str, sites: int, log=print) -> None:
    """A federation with v0000 and round-0001 of `sites` signed updates, reusing what an earlier run wrote."""
    import torch

    from fedtune.adapter import adapter_config
    from fedtune.artifacts import read_json
    from fedtune.config import federation_to_yaml
    from fedtune.registry import Registry
    from fedtune.wire import SigningKey
    from fedtune.wire.update import encode_update, write_update
    from fedtune.wire.version import read_version_manifest

    spec = spec_of(preset)
    want = {"preset": preset, "spec": json.loads(json.dumps(spec)), "roster": ROSTER, "generator": GENERATOR}
    if layout.stamp.is_file() and json.loads(layout.stamp.read_text()) != want:
        log(f"  {layout.root}: made by another version of this script; rebuilding")
        shutil.rmtree(layout.root)
    registry = Registry(layout.registry)
    if not registry.exists():
        shutil.rmtree(layout.root, ignore_errors=True)
        layout.fed.mkdir(parents=True)
        init_registry(layout, preset)
        layout.backup.mkdir(parents=True, exist_ok=True)
        for name in ("LATEST", "log.jsonl"):
            shutil.copy2(layout.registry / name, layout.backup / name)
        layout.stamp.write_text(json.dumps(want, indent=2) + "\n")
    config = federation(layout, preset)
    layout.config.write_text(federation_to_yaml(config))
    layout.config_error.write_text(federation_to_yaml(federation(layout, preset, report_error=True)))
    reset_registry(layout)
    parent = read_version_manifest(registry.latest(), config.coordinator_key)
    made = 0
    for index in range(sites):
        folder = layout.pool / site_name(index)
        manifest_path = folder / "manifest.json"
        if manifest_path.is_file() and read_json(manifest_path)["parent"]["sha256"] == parent["adapter_sha256"]:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        generator = torch.Generator().manual_seed(1000 + index)
        delta = {key: torch.randn(shape, generator=generator).mul_(1e-3) for key, shape in lora_keys(spec)}
        key = SigningKey.load(layout.site_key(index))
        write_update(folder, encode_update(delta, update_fields(config, parent, index), adapter_config(config), key))
        made += 1
        if made % 8 == 0:
            log(f"  wrote {made} updates")
    if made:
        log(f"  {preset}: wrote {made} new update(s) into {layout.pool}")
    # The round holds real folders (the coordinator refuses links): hard links to the pool's files, no extra disk.
    round_dir = layout.round_dir(sites)
    shutil.rmtree(round_dir, ignore_errors=True)
    round_dir.mkdir(parents=True)
    for index in range(sites):
        target = round_dir / site_name(index)
        target.mkdir()
        for path in (layout.pool / site_name(index)).iterdir():
            os.link(path, target / path.name)


def reset_registry(layout: Layout) -> None:
    """Undo a `fedtune aggregate` run: drop v0001 (and any half-written folder), restore LATEST and the log."""
    for child in layout.registry.iterdir():
        if child.name != "v0000" and child.is_dir():
            shutil.rmtree(child)
    for name in ("LATEST", "log.jsonl"):
        shutil.copy2(layout.backup / name, layout.registry / name)


def warm(files: list[Path]) -> None:
    """One read pass so the timed runs find the files in the page cache."""
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 23):
                pass


# --------------------------------------------------------------------------------------- measuring


class AnonPeak:
    """Peak anonymous RSS (RssAnon), sampled every 20 ms: ru_maxrss also counts file pages mapped by
    mmap (safetensors' safe_open), which the kernel can drop; this shows what the process itself allocated."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def now_kb() -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now_kb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_kb()) / 1024


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Others:
    """The share of the machine's CPU that other processes used while this one was timed: busy CPU
    time of the machine minus this process's own, over wall time × cores. Above ~10 % the timings are
    not from a quiet machine (torch's thread pool suffers most: a parallel op waits for a descheduled
    worker)."""

    def __init__(self):
        import resource

        self._resource = resource
        self.start = (time.perf_counter(), busy_seconds(), self._own())

    def _own(self) -> float:
        usage = self._resource.getrusage(self._resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def share(self, since: Others | None = None) -> float:
        """Since this object was made; or since `since` when the timed runs lasted under 2 s, which
        /proc/stat's 10 ms ticks cannot resolve."""
        now = (time.perf_counter(), busy_seconds(), self._own())
        start = self.start
        if since is not None and now[0] - start[0] < 2.0:
            start = since.start
        wall, busy, own = (b - a for a, b in zip(start, now))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def timed(fn, repeat: int, budget: float) -> list[float]:
    """Run `fn` up to `repeat` times, at least twice (the first call in a process pays for fresh pages;
    the reported time is the median of the later ones) unless the first took over 3 × `budget`;
    stop once `budget` seconds are spent. Each result is dropped before the next run."""
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
        if len(times) == 1 and times[0] > 3 * budget:
            break
        if len(times) >= 2 and sum(times) > budget:
            break
    return times


def warm_seconds(times: list[float]) -> float:
    """The median of the runs after the first (the only run when there is one)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def sample(arrays: dict) -> dict[str, list[float]]:
    """A few values of the merged delta per key, to check the contenders agree."""
    return {key: [float(v) for v in values.reshape(-1)[:: max(1, values.size // 64)][:64]] for key, values in arrays.items()}


def child_engine(task: dict) -> dict:
    import tempfile

    import numpy as np

    from fedtune.aggregate import make_method, merge_workers, round_threads
    from fedtune.aggregate.base import LinearMethod
    from fedtune.aggregate.engine import clip_factors, merge_tensors, outlier_factors, site_weights
    from fedtune.aggregate.updates import file_layout
    from fedtune.wire.tensors import ADAPTER_FILE
    from fedtune.aggregate.validate import RoundChecks, collect_round
    from fedtune.config import AggregationSettings, load_federation
    from fedtune.registry import Registry
    from fedtune.wire.version import read_version_manifest

    if task.get("threads"):  # the merge's threads, as `fedtune aggregate` takes them (numpy's and torch's)
        os.environ["FEDTUNE_THREADS"] = str(task["threads"])
    layout = Layout(Path(task["work"]), task["preset"])
    config = load_federation(layout.config)
    parent_dir = Registry(layout.registry).latest()
    parent = read_version_manifest(parent_dir, config.coordinator_key)
    shapes = file_layout(parent_dir / ADAPTER_FILE)
    round_dir = layout.round_dir(task["sites"])
    params = task["params"]
    settings = AggregationSettings(**params)
    for attempt in range(10):  # the robust module may be mid-edit by someone else
        try:
            rule = make_method(params["method"], settings, seed=1)
            break
        except (ImportError, SyntaxError, AttributeError):
            if attempt == 9:
                raise
            time.sleep(30)
    # Validation as `fedtune aggregate` runs it (untimed): signatures, lineage, and the private copies merged below.
    work = Path(tempfile.mkdtemp(prefix=".copies-", dir=layout.root))
    try:
        checks = RoundChecks(config, parent, shapes, max_bytes=2 * (parent_dir / ADAPTER_FILE).stat().st_size + (1 << 20),
                             trains=rule.trains, work=work)
        valid, rejected, _ = collect_round(round_dir, checks)
        if rejected:
            raise SystemExit(f"{round_dir}: the benchmark's updates must all pass, rejected: {rejected[:2]}")
        # Weights and clipping as the engine computes them.
        counts = [u.num_tokens if settings.weighting == "tokens" else u.num_examples for u in valid]
        weighted = rule.weighted and settings.weighting != "uniform"
        weights = site_weights(counts, weighted, settings.max_weight)
        scale = clip_factors([u.norm for u in valid], settings.clip_norm) * outlier_factors([u.norm for u in valid],
                                                                                            settings.norm_bound)
        anon = AnonPeak()

        # The merge `fedtune aggregate` runs, on its threads: numpy for the linear rules (one worker per core, or
        # FEDTUNE_THREADS), torch for the others (the load-aware count, or FEDTUNE_THREADS).
        linear = isinstance(rule, LinearMethod)
        threads = merge_workers() if linear else round_threads()[0]
        if not linear:
            import torch

            torch.set_num_threads(threads)

        def run():
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=round_threads()[0], user_api="blas"):
                return merge_tensors(rule, valid, parent_dir, parent, config, settings, shapes, weights, scale, {},
                                     None, False)

        others = Others()
        times = timed(run, task["repeat"], task["budget"])
        out = {"times": times, "others_cpu_share": others.share(CHILD_START[0])}
        merged = run() if task.get("sample") else None
        out["anon_peak_mb"] = anon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # max_weight caps a site's share, which Flower's num_examples weighting does not: then the two differ by design.
    plain = site_weights(counts, weighted, None)
    out["weights_capped"] = bool(abs(weights - plain).max() > 1e-12) or bool((scale < 1).any())
    if merged is not None:
        from safetensors.numpy import load_file

        base = load_file(str(parent_dir / ADAPTER_FILE))
        keys = list(base)[:: max(1, len(shapes) // 8)]
        out["sample"] = sample({k: np.asarray(merged[0][k]) - base[k] for k in keys})
        out["errors"] = None if not merged[2] or "skipped" in merged[2] else max(merged[2].values())
    out["threads"] = threads
    return out


def child_flower(task: dict) -> dict:
    from flwr.server.strategy.aggregate import aggregate, aggregate_trimmed_avg
    from safetensors import safe_open
    from safetensors.numpy import load_file

    layout = Layout(Path(task["work"]), task["preset"])
    round_dir = layout.round_dir(task["sites"])
    with safe_open(str(layout.registry / "v0000" / ADAPTER), framework="np") as handle:
        keys = list(handle.keys())
    results = []
    for folder in sorted(round_dir.iterdir()):
        arrays = load_file(str(folder / ADAPTER))
        results.append(([arrays[k] for k in keys], json.loads((folder / "manifest.json").read_text())["num_examples"]))
        del arrays
    anon = AnonPeak()
    if task["params"]["fn"] == "aggregate":
        run = lambda: aggregate(results)
    else:
        run = lambda: aggregate_trimmed_avg(results, 0.2)
    others = Others()
    times = timed(run, task["repeat"], task["budget"])
    out = {"times": times, "others_cpu_share": others.share(CHILD_START[0]), "anon_peak_mb": anon.stop()}
    if task.get("sample"):
        merged = run()
        picked = keys[:: max(1, len(keys) // 8)]
        out["sample"] = sample({k: merged[keys.index(k)] for k in picked})
    return out


def peft_skeleton(spec: dict, layers: int, modules: list[str]):
    """A module tree with peft's key names whose target Linear layers have the real shapes but hold
    no memory: each weight is a stride-0 view of one zero."""
    import torch
    from torch import nn

    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(layers):
        layer = nn.Module()
        for path in modules:
            group, name = path.split(".")
            if not hasattr(layer, group):
                setattr(layer, group, nn.Module())
            fin, fout = spec["modules"][path]
            linear = nn.Linear(fin, fout, bias=False, device="meta")
            linear.weight = nn.Parameter(torch.zeros(1, 1).expand(fout, fin), requires_grad=False)
            setattr(getattr(layer, group), name, linear)
        root.model.layers.append(layer)
    return root


def child_peft(task: dict) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    if task.get("threads"):  # the merge's threads, as `fedtune aggregate` takes them (numpy's and torch's)
        os.environ["FEDTUNE_THREADS"] = str(task["threads"])
    layout = Layout(Path(task["work"]), task["preset"])
    spec = spec_of(task["preset"])
    combination = task["params"]["combination"]
    # svd: a dense d×k SVD per module (~80 s each at 4096² on 2 cores), so time `subset` modules and scale.
    subset = task.get("subset")
    all_keys = [k for k, _ in lora_keys(spec)]
    if subset:
        paths = list(spec["modules"])[:subset]
        layers = 1
        keys = [k for k, _ in lora_keys(spec, 1) if any(f".{p}." in k for p in paths)]
    else:
        paths, layers, keys = list(spec["modules"]), spec["layers"], all_keys
    model = peft_skeleton(spec, layers, paths)
    names = [p.rsplit(".", 1)[1] for p in paths]
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=names, lora_dropout=0.0)
    round_dir = layout.round_dir(task["sites"])
    folders = sorted(round_dir.iterdir())
    counts = np.array([json.loads((f / "manifest.json").read_text())["num_examples"] for f in folders], dtype=np.float64)
    weights = (counts / counts.sum()).tolist()
    with safe_open(str(layout.registry / "v0000" / ADAPTER), framework="pt") as handle:
        parent = {k: handle.get_tensor(k) for k in keys}
    peft_model = None
    adapters = []
    for folder in folders:
        name = folder.name
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
        params = dict(peft_model.named_parameters())
        with safe_open(str(folder / ADAPTER), framework="pt") as handle:
            for key in keys:  # the site's local adapter: parent + delta
                target = key.replace(".lora_A.weight", f".lora_A.{name}.weight").replace(".lora_B.weight", f".lora_B.{name}.weight")
                params[target].data.copy_(parent[key]).add_(handle.get_tensor(key))
        adapters.append(name)
    del parent
    anon = AnonPeak()
    count = [0]

    def run():
        count[0] += 1
        merged = f"merged{count[0]}"
        peft_model.add_weighted_adapter(adapters, weights, merged, combination_type=combination)
        peft_model.delete_adapter(merged)  # so the next repeat does not hold two merged adapters

    torch.set_grad_enabled(False)
    others = Others()
    times = timed(run, task["repeat"], task["budget"])
    out = {"times": times, "others_cpu_share": others.share(CHILD_START[0]), "anon_peak_mb": anon.stop()}
    out["threads"] = torch.get_num_threads()
    if subset:
        out["scaled_from"] = f"{len(keys) // 2} of {len(all_keys) // 2} modules"
        out["scale"] = (len(all_keys) // 2) / (len(keys) // 2)
    return out


def flower_process(round_dir: Path, parent_file: Path, out_file: Path) -> None:
    """The Flower way, as a whole process: load every update, aggregate, add the parent, save."""
    from flwr.server.strategy.aggregate import aggregate
    from safetensors.numpy import load_file, save_file

    parent = load_file(str(parent_file))
    keys = list(parent)
    results = []
    for folder in sorted(round_dir.iterdir()):
        arrays = load_file(str(folder / ADAPTER))
        results.append(([arrays[k] for k in keys], json.loads((folder / "manifest.json").read_text())["num_examples"]))
    merged = aggregate(results)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: parent[k] + delta for k, delta in zip(keys, merged)}, str(out_file))


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM). ru_maxrss of RUSAGE_SELF is the same number
    except that Linux carries the parent's peak across fork + exec into it, so a big parent would
    leak into every child's figure; the parent here stays small either way."""
    import resource

    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CHILD_START: list = [None]


def child(task: dict) -> dict:
    import resource

    CHILD_START[0] = Others()
    kind = task["kind"]
    digest = sources_digest()
    if kind == "build":
        layout = Layout(Path(task["work"]), task["preset"])
        for sites in task["sites"]:
            build_round(layout, task["preset"], sites, lambda *a: print(*a, file=sys.stderr, flush=True))
        return {}
    if kind == "config":  # federation.yaml as the fedtune on sys.path writes it (an earlier one may lack keys)
        layout = Layout(Path(task["work"]), task["preset"])
        from fedtune.config import federation_to_yaml

        Path(task["out"]).write_text(federation_to_yaml(federation(layout, task["preset"])))
        return {}
    if kind == "compare":
        return {"max_abs_diff": whole_agreement(Path(task["ours"]), Path(task["theirs"]))}
    result = {"engine": child_engine, "flower": child_flower, "peft": child_peft}[kind](task)
    result["fedtune_aggregate_sha256"] = digest
    result["peak_rss_mb"] = peak_rss_mb()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_process(cmd: list[str], log_file: Path, env: dict) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS MB, exit code, other processes' CPU share) of one process, its RSS and
    CPU time from wait4 on it alone."""
    with open(log_file, "wb") as out:
        busy = busy_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy = busy_seconds() - busy
    proc.returncode = os.waitstatus_to_exitcode(status)
    others = max(0.0, (busy - usage.ru_utime - usage.ru_stime) / (wall * (os.cpu_count() or 1)))
    return wall, usage.ru_maxrss / 1024, proc.returncode, others


# --------------------------------------------------------------------------------------- main


def run_child(task: dict, env: dict, show_stderr: bool = False, isolated: bool = False) -> dict:
    """Run `task` in a child process; `isolated`: import fedtune from PYTHONPATH only (not beside this script)."""
    cmd = [sys.executable, *(["-P"] if isolated else []), __file__, "--child", json.dumps(task)]
    done = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        return {"failed": (done.stderr or "")[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_check(layout: Layout, spec: dict, sites: int, what: str) -> None:
    """Room for the round's updates (less what is cached) and for the private copies validation makes of them."""
    need = sites * update_bytes(spec) * 1.01 - cached_bytes(layout, sites) + sites * update_bytes(spec) \
        + 3 * update_bytes(spec)
    layout.root.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(layout.root.parent).free
    if need > free - (2 << 30):
        sys.exit(f"{what}: {sites} updates and their private copies need {need / 1e9:.1f} GB more under "
                 f"{layout.root.parent}, {free / 1e9:.1f} GB free (keeping 2 GB); use fewer --sites or another --work")


def memory_need(name: str, sites: int, per_update: int) -> float:
    """Bytes a contender holds at once, roughly: the loaded updates (and Flower's weighted copies)."""
    kind = CONTENDERS[name][0]
    if kind == "flower":
        return (2 if name == "flower aggregate" else 1.1) * sites * per_update
    if kind == "peft":
        return 1.2 * sites * per_update if name == "peft linear" else 0
    return 0


def speed(record: dict) -> float | None:
    return record.get("seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b", help="in-process rows")
    parser.add_argument("--sites", default="4,16,64", help="site counts for the in-process rows")
    parser.add_argument("--only", default="", help="comma-separated rows to run [default: all]; 'none' skips them")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--budget", type=float, default=20.0, help="stop repeating a row after this many seconds")
    parser.add_argument("--svd-sites", default="", help="site counts for the svd rows [default: the smallest of --sites]")
    parser.add_argument("--peft-svd-modules", type=int, default=1, help="peft svd: modules timed (then scaled)")
    parser.add_argument("--whole-preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--whole-sites", type=int, default=16, help="updates for the whole-process rows; 0 skips them")
    parser.add_argument("--whole-repeat", type=int, default=3)
    parser.add_argument("--whole-rows", default="error", help="whole-process rows besides flower and fedtune: "
                        f"{', '.join(k for k in WHOLE_ROWS if k not in ('flower', 'fedtune'))} [default: error]")
    parser.add_argument("--before-tree", type=Path, help="a source tree of an earlier fedtune, run as the 'before' row")
    parser.add_argument("--torch-threads", type=int, help="torch threads for fedtune and peft (OMP_NUM_THREADS for "
                        "the whole-process runs) [default: torch's own, one per core]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-bench-aggregate"), help="cache of generated rounds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path, nargs="?", const=DEFAULT_SAVE, help=f"write the JSON record [default {DEFAULT_SAVE.relative_to(ROOT)}]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--flower-process", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.flower_process:
        flower_process(*args.flower_process)
        return

    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    say = (lambda *_a, **_k: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    site_counts = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    if site_counts and site_counts[-1] > ROSTER:
        sys.exit(f"--sites: at most {ROSTER}")
    svd_sites = sorted({int(s) for s in args.svd_sites.split(",") if s.strip()}) or site_counts[:1]
    rows = list(CONTENDERS) if not args.only else [r.strip() for r in args.only.split(",") if r.strip() and r.strip() != "none"]
    unknown = [r for r in rows if r not in CONTENDERS]
    if unknown:
        sys.exit(f"--only: unknown rows {unknown}; choose from {', '.join(CONTENDERS)}")
    spec = spec_of(args.preset)
    per_update = update_bytes(spec)
    layout = Layout(args.work, args.preset)
    say(f"{args.preset}: {len(lora_keys(spec)) // 2} LoRA modules, r {spec['r']}, {per_update:,} bytes "
        f"({per_update / 1e6:.1f} MB) of float32 per update")
    record = {"preset": args.preset, "update_bytes": per_update, "cpu": f"{psutil.cpu_count()} cores",
              "torch_threads": args.torch_threads or "default", "load_average_at_start": os.getloadavg(),
              "fedtune_aggregate_sha256": sources_digest(), "rows": [], "whole": None, "goals": []}

    if rows and site_counts:
        disk_check(layout, spec, site_counts[-1], "--sites")
        say(f"building round 1 with {site_counts[-1]} updates under {layout.root} (reused when cached)")
        built = run_child({"kind": "build", "preset": args.preset, "sites": site_counts, "work": str(args.work)}, env,
                          show_stderr=not args.json)
        if "failed" in built:
            sys.exit("building the rounds failed")
        for sites in site_counts:
            warm(layout.update_files(sites) + [layout.registry / "v0000" / ADAPTER])
            total = cached_bytes(layout, sites)
            for name in rows:
                kind, params, _ = CONTENDERS[name]
                if name.endswith("svd") and sites not in svd_sites:
                    continue
                row = {"contender": name, "sites": sites, "update_bytes_total": total}
                need = memory_need(name, sites, per_update)
                available = psutil.virtual_memory().available
                if need > available - (2 << 30):
                    row["skipped"] = f"needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
                    say(f"  {name:<20} {sites:>3} sites: skipped ({row['skipped']})")
                    record["rows"].append(row)
                    continue
                task = {"kind": kind, "params": params, "preset": args.preset, "sites": sites, "work": str(args.work),
                        "repeat": args.repeat, "budget": args.budget, "threads": args.torch_threads,
                        "sample": name in ("fedtune fedavg", "fedtune trimmed", "flower aggregate", "flower trimmed")}
                if name == "peft svd":
                    task.update(repeat=1, subset=args.peft_svd_modules)
                result = run_child(task, env)
                if "failed" in result:
                    row["failed"] = result["failed"]
                    say(f"  {name:<20} {sites:>3} sites: FAILED\n{result['failed']}")
                    record["rows"].append(row)
                    continue
                seconds = warm_seconds(result["times"]) * result.get("scale", 1.0)
                row.update(seconds=seconds, gb_per_s=total / seconds / 1e9, **result)
                record["rows"].append(row)
                note = f" (est. from {result['scaled_from']})" if "scaled_from" in result else ""
                say(f"  {name:<20} {sites:>3} sites: {seconds:8.3f} s{note}  runs {[f'{t:.3f}' for t in result['times']]}"
                    f"  peak RSS {result['peak_rss_mb']:.0f} MB (anon {result['anon_peak_mb']:.0f} MB)"
                    f"  others {100 * result['others_cpu_share']:.0f}% CPU")
        agreement(record, say)
        versions = {r["fedtune_aggregate_sha256"] for r in record["rows"] if "fedtune_aggregate_sha256" in r}
        if len(versions | {record["fedtune_aggregate_sha256"]}) > 1:
            say("  warning: fedtune/aggregate/*.py changed during the run; rows carry the sha256 of the sources they ran")
            record["sources_changed_during_run"] = True

    if args.whole_sites:
        record["whole"] = whole_process(args, env, say)
    record["load_average_at_end"] = os.getloadavg()
    record["goals"] = goals(record, site_counts)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        clean = json.loads(json.dumps(record))
        for row in clean["rows"]:
            row.pop("sample", None)
        args.save.write_text(json.dumps(clean, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return
    print_table(record, args)


def sources_digest() -> str:
    """sha256 of fedtune/aggregate/*.py: which engine the numbers belong to (it is edited often)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "fedtune" / "aggregate").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def agreement(record: dict, say) -> None:
    """Max |difference| between the merged deltas of fedtune and Flower (sampled values)."""
    checks = []
    by = {(r["contender"], r["sites"]): r for r in record["rows"] if "sample" in r}
    for ours, theirs in (("fedtune fedavg", "flower aggregate"), ("fedtune trimmed", "flower trimmed")):
        for (name, sites), row in by.items():
            other = by.get((theirs, sites))
            if name != ours or other is None:
                continue
            diff = max(abs(a - b) for k in row["sample"] for a, b in zip(row["sample"][k], other["sample"][k]))
            scale = max(abs(b) for k in other["sample"] for b in other["sample"][k])
            capped = bool(row.get("weights_capped"))
            checks.append({"pair": f"{ours} vs {theirs}", "sites": sites, "max_abs_diff": diff, "max_abs_value": scale,
                           "weights_capped": capped})
            note = " — fedtune's max_weight/norm_bound changed the weights here, so they differ by design" if capped else ""
            say(f"  check {ours} vs {theirs} at {sites} sites: max |diff| {diff:.2e} (values up to {scale:.2e}){note}")
    record["agreement"] = checks


# Whole-process rows: short name (for --whole-rows) → row name. "flower" and "fedtune" are always run; the
# default config runs last in each round of runs, so its v0001 is there afterwards to compare with Flower's.
WHOLE_ROWS = {
    "flower": "flower way",
    "before": "fedtune aggregate (before: --before-tree)",
    "threads2": "fedtune aggregate (FEDTUNE_THREADS=2)",
    "error": "fedtune aggregate (report_error: true)",
    "fedtune": "fedtune aggregate",
}


def whole_process(args, env: dict, say) -> dict:
    from fedtune.aggregate import merge_workers

    spec = spec_of(args.whole_preset)
    per_update = update_bytes(spec)
    layout = Layout(args.work, args.whole_preset)
    sites = args.whole_sites
    disk_check(layout, spec, sites, "--whole-sites")
    say(f"whole process: {args.whole_preset}, {len(lora_keys(spec)) // 2} LoRA modules, r {spec['r']}, "
        f"{per_update:,} bytes ({per_update / 1e6:.1f} MB) per update, {sites} updates")
    built = run_child({"kind": "build", "preset": args.whole_preset, "sites": [sites], "work": str(args.work)}, env,
                      show_stderr=not args.json)
    if "failed" in built:
        sys.exit("building the round failed")
    round_dir = layout.round_dir(sites)
    total = cached_bytes(layout, sites)
    flower_out = layout.root / "flower-out" / ADAPTER
    fedtune_cli = Path(sys.executable).parent / "fedtune"
    fedtune_cmd = [str(fedtune_cli)] if fedtune_cli.is_file() else [sys.executable, "-m", "fedtune.cli"]
    merge = ["aggregate", "--registry", str(layout.registry), "--updates", str(round_dir)]
    wanted = {"flower", "fedtune"} | {r.strip() for r in args.whole_rows.split(",") if r.strip()}
    unknown = wanted - set(WHOLE_ROWS)
    if unknown or ("before" in wanted and not args.before_tree):
        sys.exit(f"--whole-rows: choose from {', '.join(WHOLE_ROWS)} ('before' needs --before-tree)")
    before_config = layout.fed / "federation-before.yaml"
    if "before" in wanted:
        written = run_child({"kind": "config", "preset": args.whole_preset, "work": str(args.work),
                             "out": str(before_config)}, {**env, "PYTHONPATH": str(args.before_tree)}, isolated=True)
        if "failed" in written:
            sys.exit(f"--before-tree {args.before_tree}: could not write its federation.yaml\n{written['failed']}")
    # name → (command, environment)
    commands = {
        "flower": ([sys.executable, __file__, "--flower-process", str(round_dir),
                    str(layout.registry / "v0000" / ADAPTER), str(flower_out)], env),
        # An earlier fedtune (a source tree, e.g. from `git archive`) in the same interleaved runs: before/after.
        "before": ([sys.executable, "-P", "-m", "fedtune.cli", *merge, "--config", str(before_config)],
                   {**env, "PYTHONPATH": str(args.before_tree)}),
        "threads2": (fedtune_cmd + merge + ["--config", str(layout.config)], {**env, "FEDTUNE_THREADS": "2"}),
        "error": (fedtune_cmd + merge + ["--config", str(layout.config_error)], env),
        "fedtune": (fedtune_cmd + merge + ["--config", str(layout.config)], env),
    }
    commands = {WHOLE_ROWS[k]: v for k, v in commands.items() if k in wanted}
    runs = {name: [] for name in commands}
    logs = layout.root / "logs"
    logs.mkdir(exist_ok=True)
    for attempt in range(args.whole_repeat):
        for name, (cmd, run_env) in commands.items():  # interleaved, so a noisy moment hits every contender
            reset_registry(layout)
            warm(layout.update_files(sites) + [layout.registry / "v0000" / ADAPTER])
            load = os.getloadavg()[0]
            # The threads the numpy merge reads on (an earlier fedtune, the before row, left torch at its default)
            threads = merge_workers() if name == "fedtune aggregate" or "report_error" in name else None
            log = logs / f"{name.split()[0]}-{attempt}.log"
            wall, rss, code, others = run_process(cmd, log, run_env)
            if code != 0:
                sys.exit(f"{name} failed ({code}):\n{log.read_text()[-3000:]}")
            run = {"seconds": wall, "peak_rss_mb": rss, "others_cpu_share": others, "load_average_1min": load}
            if name != "flower way":
                # What the merge chose (FEDTUNE_THREADS unset: from the load just before it started), and what it
                # wrote: every fedtune row must write the same bytes.
                run["threads"] = threads or int(run_env.get("FEDTUNE_THREADS", 0)) or None
                run["merged_sha256"] = sha256_of(layout.registry / "v0001" / ADAPTER)
            runs[name].append(run)
            say(f"  {name:<42} run {attempt + 1}: {wall:6.2f} s   peak RSS {rss:6.0f} MB   others {100 * others:3.0f}% CPU"
                f"   load {load:4.1f}" + (f"   threads {run['threads']}" if run.get("threads") else ""))
    # The fedtune output (last run of the default config) against the Flower way's.
    diff = run_child({"kind": "compare", "ours": str(layout.registry / "v0001" / ADAPTER), "theirs": str(flower_out)},
                     env).get("max_abs_diff", float("nan"))
    say(f"  check fedtune v0001 vs the Flower way's output: max |diff| {diff:.2e}")
    merged = {r["merged_sha256"] for items in runs.values() for r in items if "merged_sha256" in r}
    say(f"  fedtune v0001 {ADAPTER} sha256: {', '.join(sorted(merged))}"
        + (" (the same from every fedtune row and run)" if len(merged) == 1 else " — DIFFERENT BYTES"))
    reset_registry(layout)
    result = {"preset": args.whole_preset, "sites": sites, "update_bytes": per_update, "update_bytes_total": total,
              "max_abs_diff_vs_flower": diff, "merged_sha256": sorted(merged), "cpu_count": os.cpu_count(),
              "rows": {}}
    flower = runs["flower way"]
    for name, items in runs.items():
        seconds = statistics.median(r["seconds"] for r in items)
        row = {"seconds": seconds, "gb_per_s": total / seconds / 1e9,
               "peak_rss_mb": max(r["peak_rss_mb"] for r in items),
               "others_cpu_share": max(r["others_cpu_share"] for r in items),
               "load_average_1min": statistics.median(r["load_average_1min"] for r in items), "runs": items}
        if name != "flower way":
            # Flower's time over fedtune's (> 1: fedtune faster): of the medians, and the median of the ratios of
            # runs made one after the other (less sensitive to the load changing during the benchmark).
            row["ratio_vs_flower"] = statistics.median(r["seconds"] for r in flower) / seconds
            row["ratio_vs_flower_paired"] = statistics.median(f["seconds"] / r["seconds"] for f, r in zip(flower, items))
        result["rows"][name] = row
    return result


def sha256_of(path: Path) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def whole_agreement(ours: Path, theirs: Path) -> float:
    from safetensors.numpy import load_file

    a, b = load_file(str(ours)), load_file(str(theirs))
    return max(float(abs(a[k].astype("float64") - b[k]).max()) for k in a)


def goals(record: dict, site_counts: list[int]) -> list[dict]:
    rows = {(r["contender"], r["sites"]): r for r in record["rows"] if "seconds" in r}
    out = []

    def rate_goal(name: str, target: float, label: str):
        row = rows.get((name, 16))
        if row is None:
            out.append({"goal": label, "result": "NOT RUN", "detail": f"no {name} row at 16 sites"})
            return
        ok = row["gb_per_s"] >= target
        out.append({"goal": label, "result": "PASS" if ok else "MISS", "detail": f"{row['gb_per_s']:.2f} GB/s"})

    rate_goal("fedtune fedavg", 4.0, "fedavg ≥ 4 GB/s at 16 sites (report_error=False)")
    rate_goal("fedtune fedavg+err", 4.0, "  same, with report_error=True")
    rate_goal("fedtune trimmed", 1.0, "trimmed mean ≥ 1 GB/s at 16 sites")
    for name in ("fedtune fedavg", "fedtune fedavg+err", "fedtune trimmed"):
        peaks = [(s, rows[(name, s)]["peak_rss_mb"], rows[(name, s)]["anon_peak_mb"]) for s in site_counts if (name, s) in rows]
        if len(peaks) < 2:
            continue
        growth = peaks[-1][1] / peaks[0][1]
        anon_growth = peaks[-1][2] / peaks[0][2]
        detail = ", ".join(f"{s}: {p:.0f} MB" for s, p, _ in peaks) + f" (×{growth:.2f}); anon: " + \
            ", ".join(f"{s}: {a:.0f} MB" for s, _, a in peaks) + f" (×{anon_growth:.2f})"
        out.append({"goal": f"{name}: peak RSS flat as sites grow (≤ ×1.25 from {peaks[0][0]} to {peaks[-1][0]} sites)",
                    "result": "PASS" if growth <= 1.25 else "MISS", "detail": detail})
    whole = record.get("whole")
    if whole:
        ours, theirs = whole["rows"]["fedtune aggregate"], whole["rows"]["flower way"]
        out.append({"goal": f"whole `fedtune aggregate` not slower than the Flower way ({whole['sites']} updates, "
                            "fedtune's default settings)",
                    "result": "PASS" if ours["seconds"] <= theirs["seconds"] else "MISS",
                    "detail": f"{ours['seconds']:.2f} s vs {theirs['seconds']:.2f} s (×{ours['ratio_vs_flower']:.2f}; "
                              f"paired runs ×{ours['ratio_vs_flower_paired']:.2f}; load {ours['load_average_1min']:.1f} "
                              f"on {whole['cpu_count']} cores)"})
        off = whole["rows"].get("fedtune aggregate (report_error: true)")
        if off:
            out.append({"goal": "  same, with aggregation.report_error: true",
                        "result": "PASS" if off["seconds"] <= theirs["seconds"] else "MISS",
                        "detail": f"{off['seconds']:.2f} s vs {theirs['seconds']:.2f} s"})
    return out


def print_table(record: dict, args) -> None:
    rows = {(r["contender"], r["sites"]): r for r in record["rows"]}
    print(f"\n{record['preset']}: {record['update_bytes'] / 1e6:.1f} MB of float32 per update; {record['cpu']}, torch threads "
          f"{record['torch_threads']}; up to {args.repeat} runs in one process: wall s = median of the runs after the first, "
          f"1st run s = the first; files in the page cache; load average {record['load_average_at_start'][0]:.1f} at the start")
    header = (f"{'contender':<20} {'sites':>5} {'wall s':>9} {'1st run s':>9} {'GB/s':>7} {'peak RSS MB':>12} {'anon MB':>8}"
              f" {'others':>6}  speed ratio (peer s / fedtune s)")
    print(header)
    print("-" * len(header))
    for row in record["rows"]:
        name, sites = row["contender"], row["sites"]
        if "seconds" not in row:
            print(f"{name:<20} {sites:>5}  {'skipped: ' + row['skipped'] if 'skipped' in row else 'FAILED'}")
            continue
        ratios = []
        for peer in PEERS.get(name, []):
            other = rows.get((peer, sites))
            if other and "seconds" in other:
                ratios.append(f"×{other['seconds'] / row['seconds']:.2f} vs {peer}")
        est = " est." if "scaled_from" in row else ""
        first = row["times"][0] * row.get("scale", 1.0)
        print(f"{name:<20} {sites:>5} {row['seconds']:>9.3f} {first:>9.3f} {row['gb_per_s']:>7.2f} {row['peak_rss_mb']:>12.0f} "
              f"{row['anon_peak_mb']:>8.0f} {100 * row['others_cpu_share']:>5.0f}%  {', '.join(ratios)}{est}")
    for row in record["rows"]:
        if "scaled_from" in row:
            print(f"  est.: {row['contender']} at {row['sites']} sites timed on {row['scaled_from']} and scaled "
                  f"(a dense SVD per module; all of them would take {row['seconds'] / 60:.0f} min)")
    whole = record.get("whole")
    if whole:
        print(f"\nwhole process, {whole['preset']}: {whole['sites']} updates of {whole['update_bytes'] / 1e6:.1f} MB "
              f"(median of {args.whole_repeat} interleaved runs, imports and writing included)")
        print(f"  {'':<42} {'wall s':>7} {'GB/s':>6}   {'peak RSS':>8}   {'others':>6}  {'load':>5}  speed vs Flower "
              f"(its s / ours: of medians, paired runs)")
        for name, row in whole["rows"].items():
            ratio = (f"×{row['ratio_vs_flower']:.2f}, ×{row['ratio_vs_flower_paired']:.2f}"
                     if "ratio_vs_flower" in row else "")
            print(f"  {name:<42} {row['seconds']:>7.2f} {row['gb_per_s']:>6.2f}   {row['peak_rss_mb']:>5.0f} MB   "
                  f"≤{100 * row['others_cpu_share']:4.0f}%  {row['load_average_1min']:>5.1f}  {ratio}")
        print(f"  fedtune's v0001 vs the Flower way's output: max |diff| {whole['max_abs_diff_vs_flower']:.1e}; "
              f"v0001 sha256 {', '.join(h[:16] + '…' for h in whole['merged_sha256'])}"
              + (" (all fedtune rows and runs)" if len(whole["merged_sha256"]) == 1 else " — DIFFERENT BYTES"))
    noisy = [r for r in record["rows"] if r.get("others_cpu_share", 0) > 0.1]
    if whole:
        noisy += [r for r in whole["rows"].values() if r["others_cpu_share"] > 0.1]
    print("\nothers: the share of the machine's CPU other processes used during the timed runs" +
          (f"; {len(noisy)} row(s) above 10 %: not a quiet machine, rerun those" if noisy else " (all ≤ 10 %)"))
    print("\ngoals")
    for goal in record["goals"]:
        print(f"  {goal['result']:<8} {goal['goal']}: {goal['detail']}")


if __name__ == "__main__":
    main()
