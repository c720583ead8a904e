"""Helpers shared by the aggregation, training and bad-input tests: a trained round built once per module
and cloned per test, and tools that forge or damage updates the way a faulty or hostile site would.

Imported as `fedkit` (tests/ is on sys.path through conftest.py, like `from conftest import ...`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_OVERRIDES, TOPICS, site_records, write_jsonl

ADAPTER = "adapter_model.safetensors"


def run_fedtune(*args) -> tuple[int, str, str]:
    """`fedtune ARGS` run in this process: (exit code, stdout, stderr)."""
    from fedtune import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["fedtune", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = old
    return code, stdout.getvalue(), stderr.getvalue()


@dataclass
class World:
    """A federation folder with v0000, prepared data for every site and a trained round 1."""

    root: Path
    config: object
    site_data: dict[str, Path]

    @property
    def fed(self) -> Path:
        return self.root / "fed"

    @property
    def config_path(self) -> Path:
        return self.fed / "federation.yaml"

    @property
    def registry(self) -> Path:
        return self.fed / "registry"

    @property
    def updates(self) -> Path:
        return self.root / "updates"

    @property
    def round1(self) -> Path:
        return self.updates / "round-0001"

    def prepared(self, site: str) -> Path:
        return self.root / "prepared" / site


def build_world(root: Path, tiny_model: Path, extra_sites: dict[str, tuple[str, int]] | None = None,
                train: bool = True, overrides: dict | None = None, ranks: dict[str, int] | None = None,
                keys: bool = False) -> World:
    """init + prepare + train-local for clinic, bank, dev (and `extra_sites`: name → (topic, record count)).

    Does what conftest's federation/prepared/round_one fixtures do, so a module can build it once.
    `overrides` are merged into the federation's settings (e.g. {"aggregation": {"method": "ffa"}});
    `ranks` gives sites a smaller LoRA rank; with `keys` every site gets a key pair (root/keys/SITE.key), its
    public key goes on the roster and its updates are signed.
    """
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation
    from fedtune.train import train_local
    from fedtune.wire.keys import SigningKey

    extra_sites = extra_sites or {}
    sources = {site: (site, 40) for site in TOPICS} | extra_sites
    settings = json.loads(json.dumps(TINY_OVERRIDES)) | (overrides or {})
    roster = [{"name": site, **({"lora_r": ranks[site]} if site in (ranks or {}) else {})} for site in sources]
    if keys:
        for entry in roster:
            key = SigningKey.generate()
            key.write(root / "keys" / f"{entry['name']}.key", root / "keys" / f"{entry['name']}.pub")
            entry["key"] = key.public
            entry["exchange_key"] = key.exchange_public
    config = init_federation(root / "fed", roster, str(tiny_model), settings)
    world = World(root=root, config=config, site_data={})
    for site, (topic, count) in sources.items():
        raw = write_jsonl(root / "raw" / f"{site}.jsonl", site_records(topic, count))
        prepare_site(config, site, [raw], world.prepared(site))
        world.site_data[site] = world.prepared(site)
        if train:
            key = root / "keys" / f"{site}.key" if keys else None
            train_local(config, site, world.prepared(site), world.registry, world.updates, key=key)
    return world


def clone_world(world: World, dest: Path) -> World:
    """A private copy of `world` under `dest` (the config is re-read from the copied federation.yaml)."""
    from fedtune.config import load_federation

    shutil.copytree(world.root, dest, symlinks=True)
    config = load_federation(dest / "fed" / "federation.yaml")
    return World(root=dest, config=config, site_data={s: dest / "prepared" / s for s in world.site_data})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def sign_version(folder: Path, coordinator_key: Path) -> None:
    """Sign a (forged) version's manifest.json with the coordinator's key, as the coordinator would."""
    from fedtune.wire import SigningKey, canonical_json

    signature = SigningKey.load(coordinator_key).sign(canonical_json(read_manifest(folder)))
    (folder / "manifest.sig").write_text(signature + "\n")


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER))


def forge_update(folder: Path, tensors: dict[str, torch.Tensor] | None = None, rehash: bool = True,
                 metadata: dict[str, str] | None = None, **manifest_changes) -> dict:
    """Rewrite an (unsigned) update in place: new tensors and/or manifest fields.

    With `rehash` the manifest's sha256 of the tensors is recomputed, so only the check under test can catch
    the change. `metadata` goes into the safetensors header (same values, different bytes).
    """
    manifest = read_manifest(folder)
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER),
                  metadata={"format": "pt", **(metadata or {})})
        if rehash:
            manifest["sha256"] = sha256(folder / ADAPTER)
    manifest.update(manifest_changes)
    write_manifest(folder, manifest)
    return manifest


def copy_update(src: Path, dest: Path, site: str | None = None, scale: float | None = None, seed: int = 0) -> Path:
    """Copy an update folder as a new update (fresh nonce); optionally rename its site and perturb its delta
    (sha256 kept consistent)."""
    shutil.copytree(src, dest)
    tensors = None
    if scale is not None:
        generator = torch.Generator().manual_seed(seed)
        tensors = {k: v * scale + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in load_tensors(src).items()}
    changes = {"site": site} if site is not None else {}
    forge_update(dest, tensors=tensors, nonce=secrets.token_hex(16), **changes)
    return dest


def first_key(folder: Path, part: str = "lora_B") -> str:
    return sorted(k for k in load_tensors(folder) if part in k)[0]


def with_value(folder: Path, value: float, part: str = "lora_B") -> dict[str, torch.Tensor]:
    tensors = load_tensors(folder)
    key = first_key(folder, part)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    return tensors


# Each corruption turns round-0001/dev (or a new folder) into an invalid update; it returns the folder
# name the rejection is recorded under and a fragment the reason must contain.
def _wrong_base(round_dir: Path):
    manifest = read_manifest(round_dir / "dev")
    forge_update(round_dir / "dev", base_model={**manifest["base_model"], "sha256": "f" * 64})
    return "dev", "another base model"


def _nan(round_dir: Path):
    forge_update(round_dir / "dev", tensors=with_value(round_dir / "dev", float("nan")))
    return "dev", "NaN or Inf"


def _inf(round_dir: Path):
    forge_update(round_dir / "dev", tensors=with_value(round_dir / "dev", float("-inf"), part="lora_A"))
    return "dev", "NaN or Inf"


def _shape(round_dir: Path):
    tensors = load_tensors(round_dir / "dev")
    key = first_key(round_dir / "dev", "lora_A")
    rows, cols = tensors[key].shape
    tensors[key] = torch.zeros(rows + 1, cols)
    forge_update(round_dir / "dev", tensors=tensors)
    return "dev", f"[{rows + 1}, {cols}], expected F32[{rows}, {cols}]"


def _dtype(round_dir: Path):
    tensors = {k: v.to(torch.float16) for k, v in load_tensors(round_dir / "dev").items()}
    forge_update(round_dir / "dev", tensors=tensors)
    return "dev", "expected F32"


def _missing_key(round_dir: Path):
    tensors = load_tensors(round_dir / "dev")
    tensors.pop(first_key(round_dir / "dev"))
    forge_update(round_dir / "dev", tensors=tensors)
    return "dev", "tensor keys differ"


def _tampered(round_dir: Path):
    # Changed after the manifest was written: the sha256 no longer matches.
    forge_update(round_dir / "dev", tensors=with_value(round_dir / "dev", 0.5), rehash=False)
    return "dev", "does not match the sha256"


def _wrong_round_in_manifest(round_dir: Path):
    forge_update(round_dir / "dev", round=7)
    return "dev", "update is for round 7"


def _foreign_parent(round_dir: Path):
    # Trained from a v0000 of another federation: same name, different adapter.
    manifest = read_manifest(round_dir / "dev")
    forge_update(round_dir / "dev", parent={"version": "v0000", "sha256": "e" * 64})
    assert manifest["parent"]["sha256"] != "e" * 64
    return "dev", "trained from a different v0000"


def _lora_shape(round_dir: Path):
    manifest = read_manifest(round_dir / "dev")
    forge_update(round_dir / "dev", lora={**manifest["lora"], "r": 8})
    return "dev", "LoRA settings"


def _bad_num_examples(round_dir: Path):
    forge_update(round_dir / "dev", num_examples=0)
    return "dev", "manifest.json: num_examples: Input should be greater than or equal to 1"


def _second_claim(round_dir: Path):
    # A second folder whose manifest also says it is clinic's update.
    copy_update(round_dir / "dev", round_dir / "clinic-2", site="clinic")
    shutil.rmtree(round_dir / "dev")
    return "clinic-2", "manifest.json names site 'clinic' but the folder is 'clinic-2'"


def _off_roster(round_dir: Path):
    copy_update(round_dir / "dev", round_dir / "mallory", site="mallory")
    shutil.rmtree(round_dir / "dev")
    return "mallory", "site 'mallory' is not on the roster"


def _not_json(round_dir: Path):
    (round_dir / "dev" / "manifest.json").write_text("{not json")
    return "dev", "not valid JSON"


def _no_tensors(round_dir: Path):
    (round_dir / "dev" / ADAPTER).unlink()
    return "dev", f"{ADAPTER}: missing"


def _parent_not_a_mapping(round_dir: Path):
    forge_update(round_dir / "dev", parent="v0000")
    return "dev", "manifest.json: parent: Input should be a valid dictionary"


def _base_model_not_a_mapping(round_dir: Path):
    forge_update(round_dir / "dev", base_model="tiny")
    return "dev", "manifest.json: base_model: Input should be a valid dictionary"


def _loss_not_a_number(round_dir: Path):
    manifest = read_manifest(round_dir / "dev")
    forge_update(round_dir / "dev", train={**manifest["train"], "loss_last": "nan-ish"})
    return "dev", "manifest.json: train.loss_last: Input should be a valid number"


CORRUPTIONS = {
    "wrong-base-model": _wrong_base,
    "nan-tensor": _nan,
    "inf-tensor": _inf,
    "shape-mismatch": _shape,
    "dtype-mismatch": _dtype,
    "missing-key": _missing_key,
    "tampered-file": _tampered,
    "wrong-round-in-manifest": _wrong_round_in_manifest,
    "foreign-parent": _foreign_parent,
    "lora-settings": _lora_shape,
    "bad-num-examples": _bad_num_examples,
    "second-claim-on-site": _second_claim,
    "site-not-on-roster": _off_roster,
    "manifest-not-json": _not_json,
    "tensors-missing": _no_tensors,
    "parent-not-a-mapping": _parent_not_a_mapping,
    "base-model-not-a-mapping": _base_model_not_a_mapping,
    "loss-not-a-number": _loss_not_a_number,
}


def tree_entries(folder: Path) -> list[str]:
    """Every path under `folder`, folders included (tree_digest sees only files)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
