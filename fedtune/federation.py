"""`fedtune init`: write federation.yaml and the seeded initial global version v0000."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from fedtune import models
from fedtune.artifacts import stamp, write_text_atomic
from fedtune.config import DEFAULT_MODEL, FederationConfig, federation_to_yaml, parse_model, read_yaml
from fedtune.errors import BadInput
from fedtune.registry import COORDINATOR_KEY, Registry, roster_sha256, version_name
from fedtune.wire import VERSION_FORMAT, SigningKey
from fedtune.wire.version import write_version_manifest


def global_manifest(config: FederationConfig, number: int, adapter_sha256: str, privacy: dict | None = None,
                    **fields) -> dict:
    """A global version's manifest (wire.VersionManifest); `fields` adds parent, method, contributors, …;
    `privacy` is what the versions up to this one spent (privacy.dp_fedavg.version_record)."""
    return {
        "format": VERSION_FORMAT,
        "federation": config.name,
        "version": version_name(number),
        "round": number,
        **fields,
        "base_model": {"id": config.base_model.id, "sha256": config.base_model.sha256},
        "lora": config.lora.shape(),
        "privacy": privacy or {"mode": "none"},
        "adapter_sha256": adapter_sha256,
        **stamp(),
    }


def init_federation(
    folder: Path,
    sites: list[str | dict],
    model: str | None = None,
    overrides: dict | None = None,
    *,
    model_id: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> FederationConfig:
    """Create `folder/federation.yaml` and `folder/registry/v0000`.

    Args:
        folder: the federation's folder (created if missing).
        sites: the roster: names, or mappings such as {"name": "lab", "lora_r": 4}.
        model: base model: a folder, a hub id in the local Hugging Face cache or `embedded:NAME`; the embedded
            SmolLM2-135M-Instruct when None. The federation records its id and fingerprint, never a path.
        overrides: nested values for the federation file, e.g. {"lora": {"r": 16}}.
        model_id: the id to record for a model given as a folder (its hub id); inferred when None.
        log: receives progress lines.
    """
    from fedtune.adapter import seeded_adapter, write_adapter  # torch: the coordinator's merge never needs it

    config_path = folder / "federation.yaml"
    key_path, public_path = folder / COORDINATOR_KEY, (folder / COORDINATOR_KEY).with_suffix(".pub")
    for existing in (config_path, folder / "registry", key_path, public_path):
        if existing.exists():
            raise BadInput(f"{existing}: already exists; `fedtune init` starts a new federation in an empty folder")
    if not sites:
        raise BadInput("init: name at least one site with --site NAME")
    data: dict = dict(overrides or {})
    data["sites"] = [s if isinstance(s, dict) else {"name": s} for s in sites]
    if "name" not in data:
        data["name"] = folder.resolve().name
    model = model or DEFAULT_MODEL
    if model.startswith(models.EMBEDDED_PREFIX):
        log(f"init: locating {model} (its GGUF file is converted to safetensors once, about 20 s)")
    data["base_model"], weights = _base_model(model, model_id)
    # The coordinator signs every version and log line; sites check them against this public key.
    coordinator = SigningKey.generate()
    data["coordinator_key"] = coordinator.public
    config = parse_model(FederationConfig, data, "init")
    from fedtune.privacy.dp_fedavg import calibrated, version_record

    config.privacy = calibrated(config.privacy)
    tokenizer = models.load_tokenizer(weights)
    # The data contract names the token space every site must prepare in.
    config.contract.tokenizer = config.contract.tokenizer or models.tokenizer_fingerprint(tokenizer)
    config.contract.chat_template = config.contract.chat_template or models.chat_template_sha(tokenizer)
    log(f"init: loading {config.base_model.id} to seed the initial adapter")
    base = models.load_base_model(weights)
    _check_targets(base, config)
    tensors = seeded_adapter(base, config)

    registry = Registry(folder / "registry", coordinator)
    registry.root.mkdir(parents=True)
    try:
        coordinator.write(key_path, public_path)
        with registry.lock("init"):
            built = registry.root / f".{version_name(0)}.init.tmp"
            built.mkdir()
            sha = write_adapter(built, tensors, config)
            manifest = global_manifest(config, 0, sha, version_record(config, 0), parent=None, method="seeded-init",
                                       params={"seed": config.seed}, contributors=[], rejected=[])
            write_version_manifest(built, manifest, coordinator)
            registry.commit(registry.publish(built, version_name(0)), {"roster_sha256": roster_sha256(config)})
        write_text_atomic(config_path, federation_to_yaml(config))
    except BaseException:
        shutil.rmtree(registry.root, ignore_errors=True)
        for path in (key_path, public_path):
            path.unlink(missing_ok=True)
        raise
    return config


def merge_settings(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s values laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


# What a preset may not set: init fills these in from the command line and the base model.
PRESET_FORBIDDEN = ("sites", "format", "contract")


def load_preset(path: Path) -> dict:
    """A federation preset (configs/*.yaml): federation-file values without a roster, checked key by key."""
    data = read_yaml(Path(path))
    given = [key for key in PRESET_FORBIDDEN if key in data]
    if given:
        raise BadInput(f"{path}: a preset does not set {', '.join(given)} (init fills them in; name sites with --site)")
    if "sha256" in (data.get("base_model") or {}):
        raise BadInput(f"{path}: base_model.sha256 comes from the weights; remove it from the preset")
    parse_model(FederationConfig, {**data, "sites": [{"name": "preset-check"}]}, str(path))
    return data


def _base_model(model: str, model_id: str | None) -> tuple[dict, Path]:
    """The federation's base_model entry (id and fingerprint) and the folder holding the weights."""
    model_id, weights = models.identify(model, model_id)
    return {"id": model_id, "sha256": models.fingerprint_folder(weights)}, weights


def _check_targets(model, config: FederationConfig) -> None:
    if config.lora.target_modules == "all-linear":
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.lora.target_modules if t not in names]
    if missing:
        raise BadInput(
            f"--target-modules: {', '.join(missing)} not found in the base model; "
            f"linear layers include e.g. q_proj,k_proj,v_proj,o_proj or use all-linear"
        )
