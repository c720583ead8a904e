"""Publishing a round's version: its tensors, adapter config and signed manifest written into a hidden folder,
renamed into the registry, and committed to the log (or held, under --hold-on-alert, until `fedtune promote`)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from fedtune.aggregate.server import STATE_FILE
from fedtune.artifacts import read_json, sha256_file
from fedtune.errors import BadInput, StageFailed
from fedtune.federation import global_manifest
from fedtune.registry import Registry, version_name
from fedtune.wire.codec import WireError, pretty_json
from fedtune.wire.tensors import ADAPTER_FILE, CONFIG_FILE
from fedtune.wire.version import write_version_manifest


@dataclass
class RoundResult:
    version: str
    folder: Path
    contributors: list[dict]
    rejected: list[dict] = field(default_factory=list)
    reconstruction_error: dict | None = None
    equivocations: list[dict] = field(default_factory=list)
    secure_aggregation: dict | None = None
    alerts: list[dict] = field(default_factory=list)
    held: bool = False  # published under --hold-on-alert with alerts: LATEST not moved until `fedtune promote`



def publish_version(config, registry: Registry, parent_dir: Path, parent: dict, merged: dict, state: dict, out_rank: int,
             fields: dict, hold_on_alert: bool = False) -> RoundResult:
    """Write the new version's files and signed manifest, publish it and commit it to the log (or, held on an
    alert, leave it published and uncommitted: LATEST stays until `fedtune promote`)."""
    number = parent["round"] + 1
    alerts = (fields.get("monitor") or {}).get("alerts", [])
    held = hold_on_alert and bool(alerts)
    if held:
        fields = {**fields, "monitor": {**fields["monitor"], "held": True}}
    built = registry.root / f".{version_name(number)}.{os.getpid()}.tmp"
    built.mkdir()
    try:
        save_tensors(merged, built / ADAPTER_FILE, {"format": "pt"})
        sha = sha256_file(built / ADAPTER_FILE)
        adapter_config = read_json(parent_dir / CONFIG_FILE)
        adapter_config.update(r=out_rank, lora_alpha=config.lora.alpha * out_rank / config.lora.r)
        (built / CONFIG_FILE).write_bytes(pretty_json(adapter_config))
        extra = {}
        if state:
            save_tensors(state, built / STATE_FILE)
            extra["server_state_sha256"] = sha256_file(built / STATE_FILE)
        manifest = global_manifest(config, number, sha, parent=parent["version"],
                                   parent_sha256=parent["adapter_sha256"], **fields, **extra)
        write_version_manifest(built, manifest, registry.key)
        _sync_folder(built)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write (disk full) as its own error
        shutil.rmtree(built, ignore_errors=True)
        raise BadInput(f"{registry.root}: could not write {version_name(number)} "
                       f"({getattr(err, 'strerror', None) or err}); the registry is unchanged") from None
    except WireError as err:  # the version's own manifest breaks its schema: a value no site should see
        shutil.rmtree(built, ignore_errors=True)
        raise StageFailed(f"aggregate: the new version's manifest is not valid ({err}); nothing written") from None
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    folder = registry.publish(built, version_name(number))
    result = RoundResult(version=folder.name, folder=folder, contributors=fields["contributors"],
                         rejected=fields["rejected"], reconstruction_error=fields["reconstruction_error"],
                         equivocations=fields["equivocations"], secure_aggregation=fields.get("secure_aggregation"),
                         alerts=alerts, held=held)
    if held:
        return result
    try:
        registry.commit(folder)
    except OSError as err:
        raise BadInput(f"{registry.log_path}: could not be written ({err.strerror}); {folder.name} is published but "
                       "not committed — the next fedtune command on this registry finishes or drops it") from None
    return result


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write numpy arrays (the linear merge) or torch tensors (the others) as one safetensors file; both writers
    lay out the same bytes for the same values."""
    if all(isinstance(value, np.ndarray) for value in tensors.values()):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _sync_folder(folder: Path) -> None:
    for child in folder.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
