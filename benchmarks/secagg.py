"""Secure aggregation: what masking and unmasking add to a round, in seconds and in bytes per site.

    python benchmarks/secagg.py --torch-threads 1 --repeat 5 --save      # quickstart + 7B shapes at 4, 8, 16 sites
    python benchmarks/secagg.py --sizes quickstart --sites 4 --repeat 1  # checks the script in seconds

Two adapter sizes, no model loaded (benchmarks/aggregate.py's way: LoRA shapes, a seeded v0000, random deltas):

  quickstart   SmolLM2-135M-Instruct, LoRA r 8 on q_proj,v_proj (30 layers, hidden 576, v_proj out 192): 1.8 MB
  7b           a 7B Llama, LoRA r 16 on q,k,v,o_proj (32 layers of 4096 × 4096): 67.1 MB of float32 per update

For each size and each number of sites n (--sites), a real federation is built under --work: a roster of n
sites, each with its own key pair (Ed25519 signing key + X25519 exchange key, both on the roster), the
coordinator's key beside a registry whose v0000 is signed the way `fedtune init` signs it, and
aggregation fedavg with uniform weighting and clip_norm 5 (no delta is clipped: their norms are ≤ 4.1; secure
aggregation's fixed point needs this bound — with none, security.max_update_norm 1e4 bounds each coordinate
and even uniform weighting needs 64-bit words). Every site's delta is N(0, 1e-3), the same for both rounds:

  plain round   each site's signed float32 update (`encode_update`, timed per site for reference), then
                `aggregate_round` in this process (signatures, lineage and content checks, private copies,
                merge, write, commit): its seconds.
  secure round  privacy.secure_aggregation on, same roster and registry. Each site runs `mask_update` (what
                train-local does after training: clip, encode to fixed point, add the self-mask and the n−1
                pairwise masks, seal its self-mask seed's shares, sign) — seconds per site, median over sites;
                `aggregate_round` checks the masked envelopes, writes the signed unmask request and raises
                Waiting (coordinator pass 1); every site runs `answer_unmask` (what `fedtune unmask` runs) —
                seconds per site, median; `aggregate_round` again unmasks, merges and commits (pass 2).
  extra         one site's masking (less the encode_update a plain site runs too) + one site's answer +
                (pass 1 + pass 2 − the plain aggregation): what secure aggregation adds to a round's critical
                path.

The 7B shape at 16 sites also runs once with count weighting (aggregation.weighting examples): each site's
weight travels masked as count / privacy.secagg_max_count, which needs 20 more fractional bits, so 64-bit words.

Rounds are consumed by aggregation: before each timed run (untimed) the registry is reset to v0000 and the
round's unmask request, the answers and the sites' answered-request records are removed, so every run is a
fresh round on the same, page-cache-warm files. Reported: the median of --repeat runs of each aggregation
(answers: median over sites and runs); where the coordinator's time goes (the engine's functions wrapped with
time.perf_counter); bytes per site of the plain update and of the masked one (tensors, secagg_shares.json,
manifest + signature, the site's answer) with the shares' and answer's bytes per other site; max |difference|
of each new version from the exact mean of the deltas; peak RSS of this process (ru_maxrss, cumulative).
Goals: the extra time is at most 2 × the plain aggregation at 16 sites, for both sizes; the shares' bytes grow
linearly in n (the bytes each further site adds are the same, within 10 %, between consecutive n).
--save writes JSON (benchmarks/results/secagg_cpu.json by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import aggregate as bench  # noqa: E402  (benchmarks/aggregate.py: LoRA shapes, seeded v0000, manifest fields)

DEFAULT_SAVE = ROOT / "benchmarks" / "results" / "secagg_cpu.json"
ADAPTER = "adapter_model.safetensors"
CLIP = 5.0  # above every random delta's norm (7B: 1e-3·√16.8M ≈ 4.1), and 16 sites × ±5 fit 32-bit words
GOAL_RATIO = 2.0
GOAL_LINEAR = 0.10

SIZES = {
    "quickstart": {"model": "smollm2-135m-instruct-shapes", "layers": 30, "r": 8, "alpha": 16,
                   "modules": {"self_attn.q_proj": (576, 576), "self_attn.v_proj": (576, 192)}},
    "7b": bench.PRESETS["llama-7b"],
}

# Where the time goes: functions wrapped with a timer, as the modules that call them look them up.
SITE_PHASES = [
    ("fedtune.privacy.secagg_site", "round_plan", "round plan"),
    ("fedtune.privacy.secagg_site", "flatten", "flatten to float64"),
    ("fedtune.privacy.secagg", "Encoding.encode", "fixed-point encode"),
    ("fedtune.privacy.secagg_site", "pair_seed", "seeds (X25519 + HKDF)"),
    ("fedtune.privacy.secagg_site", "add_masks", "masks (ChaCha20 + add)"),
    ("fedtune.privacy.secagg_site", "split_seed", "Shamir split + seal"),
    ("fedtune.privacy.secagg_site", "seal_share", "Shamir split + seal"),
    ("fedtune.privacy.secagg_site", "encode_update", "safetensors + sha256 + sign"),
]
COORDINATOR_PHASES = [
    ("fedtune.aggregate.secure", "collect_round", "collect_round (read, copy, hash, check)"),
    ("fedtune.aggregate.secure", "_answers", "answers (read, verify)"),
    ("fedtune.aggregate.secure", "_secrets", "seeds from the answers"),
    ("fedtune.aggregate.secure", "_masked_sum", "sum of the masked vectors"),
    ("fedtune.aggregate.secure", "remove_masks", "remove masks (ChaCha20)"),
    ("fedtune.privacy.secagg", "Encoding.decode", "decode"),
    ("fedtune.aggregate.engine", "collect_round", "collect_round (read, copy, hash, check)"),
    ("fedtune.aggregate.engine", "merge_tensors", "merge"),
    ("fedtune.aggregate.engine", "check_merged", "check the merged version"),
    ("fedtune.aggregate.engine", "publish_version", "write + commit"),
]


class Phases:
    """Accumulated seconds of wrapped functions, by label (a name missing from its module is skipped; a call
    inside another wrapped call counts in both)."""

    def __init__(self, specs):
        import importlib

        self.seconds: dict[str, float] = {}
        for module_name, path, label in specs:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for part in parents:
                owner = getattr(owner, part, None)
            original = getattr(owner, name, None)
            if original is not None:
                setattr(owner, name, self._wrap(original, label))

    def _wrap(self, fn, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


# --------------------------------------------------------------------------------------- the federation


def make_keys(root: Path, sites: int):
    """Each site's key pair under root/keys, and the coordinator's (written where `fedtune aggregate` looks)."""
    from fedtune.wire import SigningKey

    keys = []
    for index in range(sites):
        key = SigningKey.generate()
        path = root / "keys" / f"{bench.site_name(index)}.key"
        key.write(path, path.with_suffix(".pub"))
        keys.append(key)
    return keys, SigningKey.generate()


def federation(size: str, sites: int, keys, coordinator, secure: bool, weighting: str):
    from fedtune.config import FederationConfig

    spec = SIZES[size]
    return FederationConfig.model_validate({
        "name": f"secagg-{size}-{sites}",
        "base_model": {"id": spec["model"], "sha256": bench.FAKE_SHA},
        "lora": {"r": spec["r"], "alpha": spec["alpha"],
                 "target_modules": [path.rsplit(".", 1)[1] for path in spec["modules"]]},
        "aggregation": {"method": "fedavg", "weighting": weighting, "clip_norm": CLIP, "report_error": False},
        "privacy": {"secure_aggregation": secure},
        "coordinator_key": coordinator.public,
        "sites": [{"name": bench.site_name(i), "key": keys[i].public, "exchange_key": keys[i].exchange_public}
                  for i in range(sites)],
    })


def init_registry(fed: Path, config, coordinator, spec: dict) -> Path:
    """A registry with a signed v0000 (as `fedtune init` makes it) and the coordinator key beside it; LATEST
    and log.jsonl are kept aside to reset the registry between runs."""
    from fedtune.adapter import write_adapter
    from fedtune.federation import global_manifest
    from fedtune.registry import COORDINATOR_KEY, Registry, roster_sha256, version_name
    from fedtune.wire.version import write_version_manifest

    coordinator.write(fed / COORDINATOR_KEY, fed / "coordinator.pub")
    registry = Registry(fed / "registry", coordinator)
    registry.root.mkdir(parents=True)
    with registry.lock("init"):
        built = registry.root / f".{version_name(0)}.init.tmp"
        built.mkdir()
        sha = write_adapter(built, bench.seeded_tensors(spec), config)
        manifest = global_manifest(config, 0, sha, parent=None, method="seeded-init", params={"seed": config.seed},
                                   contributors=[], rejected=[])
        write_version_manifest(built, manifest, coordinator)
        registry.commit(registry.publish(built, version_name(0)), {"roster_sha256": roster_sha256(config)})
    (fed / "backup").mkdir()
    for name in ("LATEST", "log.jsonl"):
        shutil.copy2(registry.root / name, fed / "backup" / name)
    return registry.root


def reset(fed: Path, round_dir: Path | None = None, keys_dir: Path | None = None) -> None:
    """Back to v0000 (and, for a masked round, before its unmask request)."""
    from fedtune.privacy.secagg_site import ANSWERS_SUFFIX
    from fedtune.wire.secagg import REQUEST_FILE, RESPONSES_DIR

    registry = fed / "registry"
    for child in registry.iterdir():
        if child.name != "v0000" and child.is_dir():
            shutil.rmtree(child)
    for name in ("LATEST", "log.jsonl"):
        shutil.copy2(fed / "backup" / name, registry / name)
    if round_dir is not None:
        (round_dir / REQUEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(round_dir / RESPONSES_DIR, ignore_errors=True)
    if keys_dir is not None:
        for path in keys_dir.glob(f"*{ANSWERS_SUFFIX}"):
            path.unlink()


def delta_of(spec: dict, index: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1000 + index)
    return {key: torch.randn(shape, generator=generator).mul_(1e-3) for key, shape in bench.lora_keys(spec)}


class ExactMean:
    """Σ ω_k·clip(δ_k) / Σ ω_k in float64, accumulated as the deltas are made."""

    def __init__(self):
        self.total, self.weights = {}, 0.0

    def add(self, delta: dict, weight: float) -> None:
        norm = sum(float((t.double() ** 2).sum()) for t in delta.values()) ** 0.5
        scale = weight * min(1.0, CLIP / norm)
        for key, tensor in delta.items():
            part = tensor.double() * scale
            self.total[key] = self.total[key].add_(part) if key in self.total else part
        self.weights += weight

    def error(self, version: Path, parent: Path) -> float:
        """max |(version − parent) − exact mean| over every coordinate."""
        from safetensors.torch import load_file

        new, old = load_file(str(version / ADAPTER)), load_file(str(parent / ADAPTER))
        return max(float((new[k].double() - old[k].double() - self.total[k] / self.weights).abs().max())
                   for k in self.total)


# --------------------------------------------------------------------------------------- one configuration


def run_block(work: Path, size: str, sites: int, weighting: str, repeat: int, phases, say) -> dict:
    """Build the federation and both rounds for (size, n, weighting), time them, and remove them again."""
    from fedtune.adapter import adapter_config
    from fedtune.aggregate import aggregate_round
    from fedtune.errors import Waiting
    from fedtune.privacy.secagg import round_plan
    from fedtune.privacy.secagg_site import answer_unmask, mask_update, site_weight
    from fedtune.wire.secagg import response_path
    from fedtune.wire.update import encode_update, write_update
    from fedtune.wire.version import read_version_manifest

    spec = SIZES[size]
    root = work / f"{size}-{sites}-{weighting}"
    fed = root / "fed"
    shutil.rmtree(root, ignore_errors=True)  # what an interrupted run under the same --work left
    fed.mkdir(parents=True)
    keys, coordinator = make_keys(root, sites)
    secure_config = federation(size, sites, keys, coordinator, True, weighting)
    plain_config = federation(size, sites, keys, coordinator, False, weighting)
    registry = init_registry(fed, secure_config, coordinator, spec)
    parent = read_version_manifest(registry / "v0000", secure_config.coordinator_key)
    plan = round_plan(secure_config, parent)
    bits = plan.encoding.modulus_bits
    plain_round = root / "plain" / "round-0001"
    secure_round = root / "secure" / "round-0001"
    check_disk(work, spec, sites, bits)
    say(f"{size}, {sites} sites, weighting {weighting}: {bits}-bit words (scale 2^-{plan.encoding.scale_bits}, "
        f"t {plan.threshold}); writing plain and masked updates under {root}")

    exact = ExactMean()
    encode_s, mask_s = [], []
    lora_config = adapter_config(secure_config)
    for index in range(sites):
        site = bench.site_name(index)
        delta = delta_of(spec, index)
        fields = bench.update_fields(secure_config, parent, index)
        exact.add(delta, site_weight(secure_config, fields["num_examples"], fields["num_tokens"]))
        start = time.perf_counter()
        files = encode_update(delta, fields, lora_config, keys[index])
        encode_s.append(time.perf_counter() - start)
        write_update(plain_round / site, files)
        del files
        phases["site"].take()
        start = time.perf_counter()
        files = mask_update(secure_config, keys[index], parent, site, delta, fields, lora_config)
        mask_s.append(time.perf_counter() - start)
        site_phases = phases["site"].take()
        write_update(secure_round / site, files)
        del files, delta
    row = {"size": size, "sites": sites, "weighting": weighting, "modulus_bits": bits,
           "scale_bits": plan.encoding.scale_bits, "threshold": plan.threshold,
           "encode_s": encode_s, "mask_s": mask_s, "mask_phases_last_site": site_phases}

    others = bench.Others()
    warnings: list[str] = []
    plain_s = []
    for _ in range(repeat):
        reset(fed)
        bench.warm([f / ADAPTER for f in plain_round.iterdir()] + [registry / "v0000" / ADAPTER])
        phases["coordinator"].take()
        start = time.perf_counter()
        aggregate_round(plain_config, registry, plain_round, strict=True, warn=warnings.append)
        plain_s.append(time.perf_counter() - start)
    row["plain_phases_last_run"] = phases["coordinator"].take()
    row["plain_s"] = plain_s
    row["plain_error"] = exact.error(registry / "v0001", registry / "v0000")
    plain_bytes = {
        "plain_tensors": median_bytes(plain_round, sites, lambda f: f[ADAPTER]),
        "plain_manifest_and_sig": median_bytes(plain_round, sites, lambda f: f["manifest.json"] + f["manifest.sig"]),
        "plain_folder": median_bytes(plain_round, sites, lambda f: sum(f.values()))}
    shutil.rmtree(plain_round.parent)  # disk: the masked round and its private copies come next

    first_s, second_s, answer_s = [], [], []
    for _ in range(repeat):
        reset(fed, secure_round, root / "keys")
        bench.warm([f / ADAPTER for f in secure_round.iterdir() if f.is_dir()] + [registry / "v0000" / ADAPTER])
        phases["coordinator"].take()
        start = time.perf_counter()
        try:
            aggregate_round(secure_config, registry, secure_round, warn=warnings.append)
            raise SystemExit(f"{secure_round}: the first aggregation of a masked round did not wait for answers")
        except Waiting:
            first_s.append(time.perf_counter() - start)
        first_phases = phases["coordinator"].take()
        for index in range(sites):
            site = bench.site_name(index)
            start = time.perf_counter()
            answer_unmask(secure_config, site, root / "keys" / f"{site}.key", secure_round)
            answer_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = aggregate_round(secure_config, registry, secure_round, warn=warnings.append)
        second_s.append(time.perf_counter() - start)
        second_phases = phases["coordinator"].take()
        if result.rejected or result.secure_aggregation["survivors"] != secure_config.site_names():
            raise SystemExit(f"{secure_round}: every masked update must pass: {result.rejected[:2]}")
    if warnings:
        raise SystemExit(f"the benchmark's updates must all pass; warnings: {warnings[:3]}")
    row.update(first_s=first_s, second_s=second_s, answer_s=answer_s, first_phases_last_run=first_phases,
               second_phases_last_run=second_phases, others_cpu_share=others.share(),
               secure_error=exact.error(registry / "v0001", registry / "v0000"))

    # Bytes per site (every site's files have the same size but for a few bytes of JSON: the median).
    masked_total = median_bytes(secure_round, sites, lambda f: sum(f.values()))
    shares = median_bytes(secure_round, sites, lambda f: f["secagg_shares.json"])
    answer = statistics.median(response_path(secure_round, bench.site_name(i)).stat().st_size for i in range(sites))
    row["bytes"] = {"masked_tensors": median_bytes(secure_round, sites, lambda f: f[ADAPTER]), "shares": shares,
                    "masked_manifest_and_sig": median_bytes(secure_round, sites,
                                                            lambda f: f["manifest.json"] + f["manifest.sig"]),
                    "masked_folder": masked_total, "answer": answer, "shares_per_other_site": shares / (sites - 1),
                    "answer_per_other_site": answer / (sites - 1), "secure_total": masked_total + answer, **plain_bytes}
    shutil.rmtree(root)
    row["peak_rss_mb_so_far"] = peak_rss_mb()
    summarize(row)
    say(describe(row))
    return row


def median_bytes(round_dir: Path, sites: int, pick) -> float:
    return statistics.median(pick(folder_bytes(round_dir / bench.site_name(i))) for i in range(sites))


def summarize(row: dict) -> None:
    for name in ("encode", "mask", "answer", "plain", "first", "second"):
        row[f"{name}_median_s"] = statistics.median(row[f"{name}_s"])
    # a plain site serializes and signs its update too (encode_update): only the rest is masking's cost
    row["extra_s"] = (row["mask_median_s"] - row["encode_median_s"] + row["answer_median_s"] + row["first_median_s"]
                      + row["second_median_s"] - row["plain_median_s"])
    row["extra_over_plain"] = row["extra_s"] / row["plain_median_s"]


def describe(row: dict) -> str:
    return (f"  plain {row['plain_median_s']:.3f} s, mask {row['mask_median_s']:.3f} s/site, answer "
            f"{row['answer_median_s'] * 1e3:.1f} ms/site, pass 1 {row['first_median_s']:.3f} s, pass 2 "
            f"{row['second_median_s']:.3f} s, extra {row['extra_s']:.3f} s (×{row['extra_over_plain']:.2f}); "
            f"peak RSS so far {row['peak_rss_mb_so_far']:.0f} MB")


def check_disk(work: Path, spec: dict, sites: int, bits: int) -> None:
    """Plain updates + masked updates + the coordinator's private copies of one round + two versions (the plain
    updates are removed before the masked round is aggregated; counted anyway)."""
    per = bench.update_bytes(spec)
    need = sites * per + 2 * sites * per * bits // 32 + 2 * per + (256 << 20)
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"{work}: {sites} sites of {per / 1e6:.1f} MB need ~{need / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free")


# --------------------------------------------------------------------------------------- report


def goals(rows: list[dict], sizes: list[str]) -> list[dict]:
    out = []
    for size in sizes:
        row = next((r for r in rows if r["size"] == size and r["sites"] == 16 and r["weighting"] == "uniform"
                    and "extra_s" in r), None)
        label = (f"masking + unmasking adds at most {GOAL_RATIO:g}× the plain round's aggregation time at 16 sites "
                 f"({size})")
        if row is None:
            out.append({"goal": label, "result": "NOT RUN", "detail": "no 16-site row"})
            continue
        out.append({"goal": label, "result": "PASS" if row["extra_over_plain"] <= GOAL_RATIO else "MISS",
                    "detail": f"extra {row['extra_s']:.3f} s / plain {row['plain_median_s']:.3f} s = "
                              f"×{row['extra_over_plain']:.2f}"})
    for size in sizes:
        label = f"per-site bytes grow linearly in n (shares only) ({size})"
        series = sorted((r["sites"], r["bytes"]["shares"]) for r in rows
                        if r["size"] == size and r["weighting"] == "uniform")
        if len(series) < 3:  # any two points lie on a line
            out.append({"goal": label, "result": "NOT RUN", "detail": "needs three or more site counts"})
            continue
        # the bytes each further site adds, between consecutive n: the same when growth is linear
        steps = [(b2 - b1) / (n2 - n1) for (n1, b1), (n2, b2) in zip(series, series[1:])]
        spread = max(steps) / min(steps) - 1
        detail = ("bytes added per further site " + ", ".join(f"{n1}→{n2}: {s:.1f}" for ((n1, _), (n2, _)), s in
                                                         zip(zip(series, series[1:]), steps))
                  + f" (spread {100 * spread:.1f} %); bytes per other site "
                  + ", ".join(f"{n}: {b / (n - 1):.1f}" for n, b in series))
        out.append({"goal": label, "result": "PASS" if spread <= GOAL_LINEAR else "MISS", "detail": detail})
    return out


def print_report(record: dict) -> None:
    rows = record["rows"]
    print(f"\nsecure aggregation on {record['machine']['cpu_count']} CPU cores, torch threads "
          f"{record['machine']['torch_threads']}; fedavg, clip_norm {CLIP:g}; median of {record['repeat']} runs per "
          "aggregation, in-process, files in the page cache")
    header = (f"{'size':<10} {'weighting':<9} {'bits':>4} {'sites':>5} {'plain agg s':>11} {'encode s/site':>13} "
              f"{'mask s/site':>11} {'answer s/site':>13} {'coord pass 1 s':>14} {'coord pass 2 s':>14} {'extra s':>8} "
              f"{'extra/plain':>11} {'others':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:<10} {r['weighting']:<9} {r['modulus_bits']:>4} {r['sites']:>5} "
              f"{r['plain_median_s']:>11.3f} "
              f"{r['encode_median_s']:>13.3f} {r['mask_median_s']:>11.3f} {r['answer_median_s']:>13.4f} "
              f"{r['first_median_s']:>14.3f} {r['second_median_s']:>14.3f} {r['extra_s']:>8.3f} "
              f"{r['extra_over_plain']:>10.2f}× {100 * r['others_cpu_share']:>5.0f}%")
    print("\nencode = a plain site's encode_update (for reference: mask_update includes it); "
          "extra = mask − encode (one site) + answer (one site) + pass 1 + pass 2 − plain aggregation; others = the share of the "
          "machine's CPU other processes used during the aggregations (above ~10 %: not a quiet machine)")

    print("\nbytes per site")
    header = (f"{'size':<10} {'weighting':<9} {'sites':>5} {'plain update':>12} {'masked tensors':>14} "
              f"{'shares (/other)':>17} {'manifest+sig plain/masked':>25} {'answer (/other)':>16} {'extra bytes':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        b = r["bytes"]
        manifests = f"{b['plain_manifest_and_sig']:,.0f} / {b['masked_manifest_and_sig']:,.0f}"
        print(f"{r['size']:<10} {r['weighting']:<9} {r['sites']:>5} {b['plain_folder']:>12,.0f} "
              f"{b['masked_tensors']:>14,.0f} {b['shares']:>8,.0f} ({b['shares_per_other_site']:>5.1f}) "
              f"{manifests:>25} {b['answer']:>7,.0f} ({b['answer_per_other_site']:>5.1f}) "
              f"{b['secure_total'] - b['plain_folder']:>11,.0f}")
    print("\nplain update = its folder (tensors, adapter_config.json, manifest.json, manifest.sig); "
          "extra bytes = masked folder + answer − plain update")

    print("\nwhere the time goes (last run; seconds)")
    for r in rows:
        if r["sites"] != max(x["sites"] for x in rows if x["size"] == r["size"]):
            continue
        print(f"  {r['size']}, {r['weighting']}, {r['sites']} sites:")
        for title, key, total in (("plain aggregation", "plain_phases_last_run", r["plain_s"][-1]),
                                  ("coordinator pass 1", "first_phases_last_run", r["first_s"][-1]),
                                  ("coordinator pass 2", "second_phases_last_run", r["second_s"][-1]),
                                  ("masking (last site)", "mask_phases_last_site", r["mask_s"][-1])):
            parts = ", ".join(f"{label} {seconds:.3f}" for label, seconds in r[key].items())
            rest = total - sum(r[key].values())
            print(f"    {title:<20} {total:7.3f}: {parts}, other {rest:.3f}")

    print("\nmax |new version − parent − exact mean of the deltas|: " + "; ".join(
        f"{r['size']} {r['weighting']} {r['sites']}: "
        f"plain {r['plain_error']:.1e}, secure {r['secure_error']:.1e}"
        for r in rows))
    share = max(r["others_cpu_share"] for r in rows)
    print(f"other processes used up to {100 * share:.0f} % of the machine's CPU during the timed runs")
    print(f"peak RSS of the process: {record['peak_rss_mb']:.0f} MB")
    print("\ngoals")
    for goal in record["goals"]:
        print(f"  {goal['result']:<8} {goal['goal']}: {goal['detail']}")


def machine_info() -> dict:
    from importlib.metadata import version

    import numpy
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
            "cryptography": version("cryptography"), "pycryptodome": version("pycryptodome"),
            "safetensors": version("safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="4,8,16", help="site counts, comma-separated (each ≥ 3)")
    parser.add_argument("--sizes", default="quickstart,7b", help=f"adapter sizes: {', '.join(SIZES)}")
    parser.add_argument("--count", default="7b:16", help="SIZE:N run once more with count weighting (64-bit words); "
                        "'none' skips it [default 7b:16]")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each aggregation (median reported)")
    parser.add_argument("--torch-threads", type=int, help="torch's threads [default: torch's own, one per core]; 1 keeps "
                        "the timings steady when other processes hold a core (a parallel op waits for a descheduled "
                        "worker)")
    parser.add_argument("--work", type=Path,
                        help="where rounds are built [default: a temp dir under /tmp, removed after]")
    parser.add_argument("--save", type=Path, nargs="?", const=DEFAULT_SAVE,
                        help=f"write the JSON record [default {DEFAULT_SAVE.relative_to(ROOT)}]")
    args = parser.parse_args()
    sites = sorted({int(s) for s in args.sites.split(",")})
    sizes = [s.strip() for s in args.sizes.split(",")]
    if min(sites) < 3:
        sys.exit("--sites: secure aggregation needs at least 3 sites")
    if unknown := [s for s in sizes if s not in SIZES]:
        sys.exit(f"--sizes: {', '.join(unknown)} unknown; choose from {', '.join(SIZES)}")
    count = None
    if args.count != "none":
        size, _, n = args.count.partition(":")
        if size in sizes and n.isdigit() and int(n) in sites:
            count = (size, int(n))
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-secagg-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    phases = {"site": Phases(SITE_PHASES), "coordinator": Phases(COORDINATOR_PHASES)}
    started = time.time()
    rows = []
    try:
        for size in sizes:
            spec = SIZES[size]
            say(f"{size}: {len(bench.lora_keys(spec)) // 2} LoRA modules, r {spec['r']}, "
                f"{bench.update_bytes(spec) / 1e6:.2f} MB of float32 per update")
            for n in sites:
                rows.append(run_block(work, size, n, "uniform", args.repeat, phases, say))
            if count and count[0] == size:
                rows.append(run_block(work, size, count[1], "examples", args.repeat, phases, say))
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "secagg", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "repeat": args.repeat, "clip_norm": CLIP, "seconds_total": time.time() - started,
        "peak_rss_mb": peak_rss_mb(), "rows": rows, "goals": goals(rows, sizes),
    }
    print_report(record)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {args.save}")


if __name__ == "__main__":
    main()
