"""`fedtune verify`: re-check a registry, or one global version, from the files alone.

Verification only reads. It re-checks every hash chain link, signature, manifest and file the registry's
commits promise, and stops at the first item that breaks a promise. States an interrupted writer leaves
(which `Registry.recover()` finishes on the next write, or `fedtune roster sync` for a federation.yaml one
committed roster change behind) are reported as pending, not as failures, since a writer killed at any point
must not make an honest registry look tampered with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NoReturn

from fedtune.config import FederationConfig
from fedtune.errors import BadInput, VerifyFailed
from fedtune.registry import (
    GENESIS,
    LEFTOVER,
    VERSION_RE,
    checked_version,
    held_manifest,
    roster_sha256,
    sites_sha256,
    verify_line,
    version_name,
    version_number,
)
from fedtune.wire.codec import WireError, open_regular, parse_json, printable
from fedtune.wire.tensors import ADAPTER_FILE
from fedtune.wire.update import MANIFEST_FILE, read_envelope
from fedtune.wire.version import check_version_files, read_version_manifest

LOG_FILE = "log.jsonl"
MAX_UPDATE_BYTES = 1 << 40  # no real adapter comes near; the cap only keeps a sparse or growing file finite


def log_lines(root: Path) -> tuple[list[bytes], bytes | None]:
    """The log's complete lines and, apart, a torn last line (one without its newline) or None."""
    path = root / LOG_FILE
    if not path.is_file():
        raise BadInput(f"{root}: not a registry (no {LOG_FILE}); create one with `fedtune init`")
    lines = path.read_bytes().splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        return lines[:-1], lines[-1]
    return lines, None


def _sha256_regular(path: Path) -> str:
    """sha256 of a file a site sent, read through one descriptor that refuses links, FIFOs and devices."""
    fd, _size = open_regular(path, MAX_UPDATE_BYTES)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class _Verifier:
    """One read-only pass over a registry; `fail` raises at the first broken item."""

    def __init__(self, root: Path, config: FederationConfig | None, updates: Path | None):
        self.root, self.config, self.updates = root, config, updates
        self.key = config.coordinator_key if config else None
        self.log = root / LOG_FILE
        self.pending: list[str] = []
        self.signatures = 0
        self.updates_checked = 0
        self.versions: list[dict] = []  # log entries of the versions checked so far, in order
        # The roster the log leaves in force (name → key): federation.yaml's, or the log's own when federation.yaml
        # is one committed change behind it.
        self.sites: dict[str, str | None] = {s.name: s.key for s in config.sites} if config else {}

    def fail(self, message: str) -> NoReturn:
        raise VerifyFailed(message)

    def run(self) -> dict:
        lines, torn = log_lines(self.root)
        if torn is not None:
            self.pending.append(f"{self.log}: line {len(lines) + 1} was cut off mid-write; the next fedtune command "
                                "on this registry removes it")
        entries = self.chain(lines)
        if not entries or entries[0]["event"] != "version":
            self.fail(f"{self.log}: does not start with v0000 (written by `fedtune init`)")
        self.roster(entries)
        keys = self.roster_keys(entries)
        for number, entry in enumerate(entries, start=1):
            if entry["event"] == "version":
                self.version(number, entry, keys[number - 1])
        self.folders()
        self.latest(entries)
        return {"ok": True, "registry": str(self.root), "versions": len(self.versions),
                "latest": self.versions[-1]["version"], "signatures_checked": self.signatures,
                "updates_checked": self.updates_checked, "pending": self.pending}

    def chain(self, lines: list[bytes]) -> list[dict]:
        """Every line parsed, chained to the one before and signed by the coordinator."""
        entries, previous = [], GENESIS
        for number, raw in enumerate(lines, start=1):
            where = f"{self.log}: line {number}"
            try:
                entry = parse_json(raw, where)
            except WireError as err:
                self.fail(f"{err} (the line was edited)")
            if not isinstance(entry, dict):
                self.fail(f"{where}: not a JSON object (the line was edited)")
            if entry.get("prev") != previous:
                self.fail(f"{where}: its prev hash is not the sha256 of line {number - 1} (a line before it was "
                          "removed, inserted or changed)" if number > 1 else
                          f"{where}: its prev hash is not the genesis value (lines before it were removed)")
            if self.key is not None:
                if not verify_line(entry, self.key):
                    self.fail(f"{where}: not signed by the coordinator key in federation.yaml (the line was altered, "
                              "or written with another key)")
                self.signatures += 1
            if entry.get("event") not in ("version", "roster"):
                self.fail(f"{where}: unknown event {printable(entry.get('event'), 40)}")
            entries.append(entry)
            previous = hashlib.sha256(raw).hexdigest()
        return entries

    def roster_keys(self, entries: list[dict]) -> list[dict[str, str | None]]:
        """The sites' keys in force at each log line, from today's roster (federation.yaml's, or the log's when the
        file is one change behind) walked back through the log's roster events (an add means the site was absent
        before it; a remove names the key it had)."""
        keys = dict(self.sites)
        at: list[dict[str, str | None]] = [{}] * len(entries)
        for index in range(len(entries) - 1, -1, -1):
            at[index] = dict(keys)
            entry = entries[index]
            if entry["event"] == "roster":
                if entry.get("action") == "add":
                    keys.pop(entry.get("site"), None)
                elif entry.get("action") == "remove" and isinstance(entry.get("site"), str):
                    keys[entry["site"]] = entry.get("key")
        return at

    def version(self, line: int, entry: dict, keys: dict[str, str | None]) -> None:
        where = f"{self.log}: line {line}"
        name = entry.get("version")
        if not isinstance(name, str) or not VERSION_RE.match(name):
            self.fail(f"{where}: names no version ({printable(name, 40)})")
        previous = self.versions[-1] if self.versions else None
        expected = version_name(len(self.versions))
        if name != expected:
            self.fail(f"{where}: records {name} where {expected} comes next (a version is missing from the log)")
        want_parent = previous["version"] if previous else None
        if entry.get("parent") != want_parent:
            self.fail(f"{where}: {name}'s parent is {entry.get('parent')}, not the version before it ({want_parent})")
        want_round = previous["round"] + 1 if previous else 0
        if entry.get("round") != want_round:
            self.fail(f"{where}: {name} is round {printable(entry.get('round'), 20)}, expected {want_round}")
        folder = self.root / name
        manifest = self.version_files(folder, entry, where)
        for field in ("version", "round", "parent", "adapter_sha256"):
            if manifest.get(field) != entry.get(field):
                self.fail(f"{folder / MANIFEST_FILE}: its {field} is {printable(manifest.get(field), 70)}, the log "
                          f"({where}) records {printable(entry.get(field), 70)}")
        if previous and manifest.get("parent_sha256") != previous["adapter_sha256"]:
            self.fail(f"{folder / MANIFEST_FILE}: parent_sha256 is not {previous['version']}'s adapter sha256")
        self.rollback_target(folder, entry, manifest, where)
        if self.updates is not None:
            for contributor in manifest.get("contributors", []):
                self.update(name, manifest["round"], contributor, keys)
            if manifest.get("secure_aggregation"):
                self.unmask_request(name, manifest)
        self.versions.append(entry)

    def unmask_request(self, version: str, manifest: dict) -> None:
        """Secure aggregation: the round's unmask request is still there, signed, and the one the version names."""
        from fedtune.wire.secagg import REQUEST_FILE, document_sha256, read_request

        folder = self.updates / f"round-{manifest['round']:04d}"
        try:
            request = read_request(folder, self.key)
        except BadInput as err:
            self.fail(str(err))
        if request is None:
            self.fail(f"{folder / REQUEST_FILE}: missing (the unmask request {version} was made from)")
        if document_sha256(request) != manifest["secure_aggregation"]["request_sha256"]:
            self.fail(f"{folder / REQUEST_FILE}: not the unmask request {version} was made from (sha256 differs)")
        self.signatures += 1

    def version_files(self, folder: Path, entry: dict, where: str) -> dict:
        """The version's manifest (bytes as logged, signature, federation) and files (sha256 as signed)."""
        if not folder.is_dir():
            self.fail(f"{folder}: missing ({where} records it)")
        path = folder / MANIFEST_FILE
        if not path.is_file():
            self.fail(f"{path}: missing ({where} records it)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("manifest_sha256"):
            self.fail(f"{path}: not the bytes {where} records (manifest_sha256 differs: the manifest was changed)")
        try:
            manifest = read_version_manifest(folder, self.key)
            check_version_files(folder, manifest)
        except BadInput as err:
            self.fail(str(err))
        if self.key is not None:
            self.signatures += 1
        if self.config is not None:
            if manifest["base_model"]["sha256"] != self.config.base_model.sha256:
                self.fail(f"{path}: built on another base model than federation.yaml's")
            if manifest["lora"] != self.config.lora.shape():
                self.fail(f"{path}: LoRA settings differ from federation.yaml's")
        return manifest

    def rollback_target(self, folder: Path, entry: dict, manifest: dict, where: str) -> None:
        # The manifest is what the log line commits to (manifest_sha256); a line a recovery wrote does not repeat
        # rolled_back_to, one the rollback wrote must agree with it.
        target = manifest.get("rolled_back_to")
        if "rolled_back_to" in entry and entry["rolled_back_to"] != target:
            self.fail(f"{folder / MANIFEST_FILE}: rolled_back_to is {target}, the log ({where}) records "
                      f"{printable(entry['rolled_back_to'], 20)}")
        if target is None:
            return
        earlier = next((v for v in self.versions if v["version"] == target), None)
        if earlier is None:
            self.fail(f"{where}: {entry['version']} rolls back to {printable(target, 20)}, not an earlier version")
        if earlier["adapter_sha256"] != entry["adapter_sha256"]:
            self.fail(f"{folder / ADAPTER_FILE}: a rollback to {target} whose adapter is not {target}'s")

    def update(self, version: str, number: int, contributor: dict, keys: dict[str, str | None]) -> None:
        """A merged update is still in the updates root: its bytes as merged, its manifest signed by its site."""
        site = contributor["site"]
        # An asynchronous version names the round each update was sent for: its folder is round-(that)/<site>.
        folder = self.find_update(contributor.get("round") or number, site, contributor["update_sha256"])
        try:
            envelope = read_envelope(folder)
        except WireError as err:
            self.fail(f"{folder}: {err}")
        if (envelope.manifest.sha256, envelope.manifest.nonce) != (contributor["update_sha256"], contributor["nonce"]):
            self.fail(f"{folder / MANIFEST_FILE}: not the manifest of the update merged into {version}")
        try:
            digest = _sha256_regular(folder / ADAPTER_FILE)
        except WireError as err:
            self.fail(f"{folder}: {err}")
        if digest != contributor["update_sha256"]:
            self.fail(f"{folder / ADAPTER_FILE}: not the bytes merged into {version} (sha256 differs)")
        key = keys.get(site)
        if key is not None:
            if not envelope.signed_by(key):
                self.fail(f"{folder / 'manifest.sig'}: not site {site}'s signature of its manifest (roster key)")
            self.signatures += 1
        self.updates_checked += 1

    def find_update(self, number: int, site: str, sha: str) -> Path:
        # Usually round-NNNN/<site>; a round merged with --force-new-round came from a folder of another name.
        usual = self.updates / f"round-{number:04d}" / site
        if usual.is_dir():
            return usual
        for other in sorted(self.updates.glob(f"*/{site}")):
            try:
                if read_envelope(other).manifest.sha256 == sha:
                    return other
            except WireError:
                continue
        self.fail(f"{usual}: missing (site {site}'s update merged into {version_name(number)})")

    def roster(self, entries: list[dict]) -> None:
        """Every roster event is well-formed (its full roster, when it carries one, hashes to its roster_sha256);
        federation.yaml holds the roster the log last recorded (the last roster event's, else the one v0000 was
        made with) or is one committed change behind it (pending); every event fits the roster the later ones
        leave."""
        events = [(number, e) for number, e in enumerate(entries, start=1) if e["event"] == "roster"]
        for number, entry in events:
            where = f"{self.log}: line {number}"
            if entry.get("action") not in ("add", "remove") or not isinstance(entry.get("site"), str):
                self.fail(f"{where}: a roster event without a valid action and site")
            roster = entry.get("roster", [])
            matches = isinstance(roster, list) and sites_sha256(roster) == entry.get("roster_sha256")
            if "roster" in entry and not matches:
                self.fail(f"{where}: its roster does not hash to its roster_sha256 (the line was altered)")
        if self.config is not None:
            self.roster_in_force([(1, entries[0])] + events)
        members = set(self.sites) if self.config else None
        for number, entry in reversed(events):
            if members is not None:
                # Walking back from today's roster: an added site was there after its event, a removed one not.
                if (entry["site"] in members) != (entry["action"] == "add"):
                    self.fail(f"{self.log}: line {number}: {entry['action']} of site {printable(entry['site'], 64)} "
                              "does not fit the roster the later lines leave")
                (members.discard if entry["action"] == "add" else members.add)(entry["site"])

    def roster_in_force(self, setters: list[tuple[int, dict]]) -> None:
        """federation.yaml's roster against the lines that set the roster (v0000's, then each roster event)."""
        line, last = setters[-1]
        mine = roster_sha256(self.config)
        if last.get("roster_sha256") == mine:
            return
        # A roster change logs its line (with the whole roster) first, then rewrites federation.yaml: a command
        # killed in between leaves the file with the roster recorded just before.
        if len(setters) > 1 and setters[-2][1].get("roster_sha256") == mine and "roster" in last:
            if not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in last["roster"]):
                self.fail(f"{self.log}: line {line}: its roster is not a list of sites")
            self.sites = {e["name"]: e.get("key") for e in last["roster"]}
            self.pending.append(f"federation.yaml: one roster change behind {self.log} (line {line}: {last['action']} "
                                f"{printable(last['site'], 64)}), committed but not yet written to it; `fedtune "
                                f"roster sync --config federation.yaml --registry {self.root}` applies it")
            return
        self.fail(f"federation.yaml: its roster (sites) is not the one the registry's log records ({self.log} "
                  f"line {line}): it was edited by hand; change the roster with `fedtune roster add/remove`")

    def folders(self) -> None:
        """No version folder the log does not record, except the next one a writer published but did not log."""
        logged = {v["version"] for v in self.versions}
        following = version_name(version_number(self.versions[-1]["version"]) + 1)
        for child in sorted(self.root.iterdir()):
            if LEFTOVER.match(child.name):
                self.pending.append(f"{child}: left by an interrupted command; the next fedtune command on this "
                                    "registry removes it")
            elif VERSION_RE.match(child.name) and child.name not in logged:
                if child.name != following:
                    self.fail(f"{child}: a version folder the log does not record")
                if held_manifest(child) is not None:
                    self.pending.append(f"{child}: held on monitoring alerts; LATEST stays at its parent until "
                                        f"`fedtune promote {child.name}` (or `fedtune promote {child.name} --reject`)")
                    continue
                why = self.unfinished_problem(child)
                self.pending.append(f"{child}: published but not yet logged; the next fedtune command on this "
                                    "registry " + ("commits it" if why is None else f"drops it ({why})"))

    def unfinished_problem(self, folder: Path) -> str | None:
        try:
            manifest = read_version_manifest(folder, self.key)
            check_version_files(folder, manifest)
        except BadInput as err:
            return str(err)
        if manifest.get("parent") != self.versions[-1]["version"] or manifest["version"] != folder.name:
            return f"its parent is {manifest.get('parent')}, the log's last version is {self.versions[-1]['version']}"
        return None

    def latest(self, entries: list[dict]) -> None:
        path = self.root / "LATEST"
        last = self.versions[-1]["version"]
        if not path.is_file():
            self.pending.append(f"{path}: missing; the next fedtune command on this registry writes it ({last})")
            return
        named = path.read_text(errors="replace").strip()
        if named == last:
            return
        # A commit writes the log line, then LATEST: a writer stopped in between leaves LATEST one behind.
        behind = len(self.versions) > 1 and named == self.versions[-2]["version"] and entries[-1] is self.versions[-1]
        if not behind:
            self.fail(f"{path}: names {printable(named, 40)}, but the log's last version is {last}")
        self.pending.append(f"{path}: names {named}, one behind the log's last version {last}; the next fedtune "
                            "command on this registry moves it")


def verify_registry(registry: Path, config: FederationConfig | None = None, updates: Path | None = None) -> dict:
    """Re-check a registry from its files alone; reads only (no lock, nothing written).

    Args:
        registry: the registry folder.
        config: the federation (its coordinator key, base model, LoRA settings and roster); without it, signatures
            and the roster are not checked.
        updates: the updates root holding round-NNNN/<site>/; when given, every merged update must still be there,
            with the bytes that were merged and its site's signature.

    Returns:
        {"ok": True, "registry", "versions", "latest", "signatures_checked", "updates_checked", "pending"}; pending
        lists what an interrupted command left for the next one to finish.

    Raises:
        VerifyFailed: naming the first broken item (file, log line or version) and what is wrong.
    """
    root = Path(registry)
    if not root.is_dir():
        raise BadInput(f"{root}: registry folder not found")
    if updates is not None and not Path(updates).is_dir():
        raise BadInput(f"{updates}: updates folder not found")
    return _Verifier(root, config, Path(updates) if updates is not None else None).run()


def verify_version(folder: Path, config: FederationConfig) -> dict:
    """A site's offline check of one global version folder: the coordinator's signature, its files, and the base
    model and LoRA settings of federation.yaml.

    Raises:
        BadInput: the path is missing or not a version folder.
        VerifyFailed: the version does not verify.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: folder not found")
    if (folder / "LATEST").is_file():
        raise BadInput(f"{folder}: a registry; verify it with `fedtune verify --registry {folder}`")
    try:
        _, manifest = checked_version(folder, config)
    except BadInput as err:
        raise VerifyFailed(str(err)) from None
    return {"ok": True, "folder": str(folder), "version": manifest["version"], "round": manifest["round"],
            "adapter_sha256": manifest["adapter_sha256"], "signed": config.coordinator_key is not None}
