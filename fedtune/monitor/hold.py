"""Holding a version on alerts: `aggregate --hold-on-alert` publishes a version whose round raised monitoring
alerts without committing it (LATEST stays at its parent); `fedtune promote` commits it (the signed log line is the
commit, as for any version) and moves LATEST, or `--reject` sets it aside so the round can be merged again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedtune.artifacts import now, write_text_atomic
from fedtune.errors import BadInput
from fedtune.registry import Registry, _fsync_dir, held_manifest
from fedtune.wire.version import check_version_files, read_version_manifest


def promote(registry: Registry, name: str, reason: str | None = None) -> dict:
    """Commit a held version and move LATEST to it; returns the log entry.

    Refused: a name that is not a version folder here, one already committed (not held), one whose manifest is
    not the coordinator's signed one or whose files do not match it (forged), and one whose parent is not LATEST.
    """
    with registry.lock("promote"):
        folder = _held_folder(registry, name)
        manifest = read_version_manifest(folder, registry.key.public if registry.key else None)
        check_version_files(folder, manifest)
        if not (manifest.get("monitor") or {}).get("held"):
            raise BadInput(f"{folder}: not a held version (its signed manifest does not say it was held); "
                           f"nothing promoted")
        latest = registry.latest_name()
        if manifest.get("parent") != latest or manifest["version"] != folder.name:
            raise BadInput(f"{folder}: its parent is {manifest.get('parent')}, not LATEST ({latest}); nothing "
                           "promoted")
        alerts = len((manifest.get("monitor") or {}).get("alerts", []))
        # The log line records the hold (how many alerts, when and why it was promoted) beside the usual fields.
        return registry.commit(folder, {"held": {"alerts": alerts, "promoted": now(),
                                                 **({"reason": reason} if reason else {})}})


def reject(registry: Registry, name: str, reason: str) -> Path:
    """Set a held version aside (renamed `vNNNN.rejected-TIME`, never deleted) so its round can be redone; the
    reason is written beside it. Nothing was committed, so the log and LATEST stay as they are."""
    with registry.lock("promote"):
        folder = _held_folder(registry, name)
        if held_manifest(folder) is None:
            raise BadInput(f"{folder}: not a held version; nothing set aside")
        aside = registry.root / f"{folder.name}.rejected-{now().replace(':', '').replace('+0000', 'Z')}"
        os.rename(folder, aside)
        write_text_atomic(aside / "REJECTED", json.dumps({"reason": reason, "at": now()}) + "\n")
        _fsync_dir(registry.root)
        return aside


def _held_folder(registry: Registry, name: str) -> Path:
    folder = registry.path_of(name)
    logged = {v.get("version") for v in registry.versions()}
    if name in logged:
        raise BadInput(f"{folder}: already committed, not held (LATEST is {registry.latest_name()}); nothing to do")
    if not (folder / "manifest.json").is_file():
        raise BadInput(f"{name}: no such version in {registry.root} (`fedtune status` names a held one)")
    return folder
