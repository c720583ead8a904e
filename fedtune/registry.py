"""The coordinator's registry: global versions v0000, v0001, …, LATEST and a hash-chained, signed log.

Every write happens under an exclusive lock and follows one commit sequence, each step of which can be
redone: build the version in a hidden folder, publish it under its final name (never replacing a folder),
append its signed line to the log (the commit point), move LATEST. A command killed anywhere leaves a state
the next command finishes (a published version whose line is missing is checked and logged, or dropped; a
LATEST behind the log is moved) and its leftover hidden folders are removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fedtune.artifacts import now, write_text_atomic
from fedtune.errors import BadInput
from fedtune.wire.codec import WireError, canonical_json, parse_json, printable
from fedtune.wire.keys import SigningKey, verify
from fedtune.wire.version import check_version_files, read_version_manifest

if TYPE_CHECKING:
    from fedtune.config import FederationConfig

VERSION_RE = re.compile(r"^v(\d{4,})$")
GENESIS = "0" * 64
LOCK_FILE = ".lock"
COORDINATOR_KEY = "coordinator.key"
LEFTOVER = re.compile(r"^\..*\.(tmp|old|work)$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


ROUND_DIR_RE = re.compile(r"^round-(\d{4,})$")


def round_dir_name(number: int) -> str:
    """The folder of round `number`'s updates: the round that makes version `number` (round-0001 → v0001)."""
    return f"round-{number:04d}"


def version_number(name: str) -> int:
    match = VERSION_RE.match(name)
    if not match:
        raise BadInput(f"'{name}' is not a version name (expected e.g. v0003)")
    return int(match.group(1))


def roster_sha256(config: FederationConfig) -> str:
    """What the log records of a roster: the sha256 of its entries (names, ranks, keys, exchange keys)."""
    return sites_sha256([s.model_dump(mode="json") for s in config.sites])


def sites_sha256(sites: list) -> str:
    """The sha256 of roster entries as federation.yaml's `sites` holds them (dicts: name, lora_r, key, and
    exchange_key where a site has one).

    An entry without an exchange key hashes as {name, lora_r, key}, as every entry did before exchange keys
    existed: the roster hashes registries already logged stay valid."""
    entries = [{k: v for k, v in s.items() if not (k == "exchange_key" and v is None)} if isinstance(s, dict) else s
               for s in sites]
    return hashlib.sha256(canonical_json(entries)).hexdigest()


def coordinator_signer(config: FederationConfig, registry_root: Path, key_path: Path | None = None) -> SigningKey | None:
    """The coordinator's private key (beside the registry unless given), checked against federation.yaml's
    public key; None for a federation without a coordinator key."""
    if config.coordinator_key is None:
        return None
    path = Path(key_path) if key_path else Path(registry_root).parent / COORDINATOR_KEY
    key = SigningKey.load(path)
    if key.public != config.coordinator_key:
        raise BadInput(f"{path}: not the coordinator key named in federation.yaml (coordinator_key); "
                       "give the right one with --key")
    return key


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing if `target` exists — even an empty folder, which rename(2) replaces."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(target))
    if target.exists():
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    os.rename(source, target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """A folder of global versions. Writers hold `lock()`; readers need none."""

    def __init__(self, root: Path | str, key: SigningKey | None = None):
        self.root = Path(root)
        self.key = key

    @property
    def log_path(self) -> Path:
        return self.root / "log.jsonl"

    def exists(self) -> bool:
        return (self.root / "LATEST").is_file()

    def latest_name(self) -> str:
        path = self.root / "LATEST"
        if not path.is_file():
            raise BadInput(f"{self.root}: not a registry (no LATEST file); create one with `fedtune init`")
        name = path.read_text(errors="replace").strip()
        if not VERSION_RE.match(name):
            raise BadInput(f"{path}: does not name a version; run `fedtune verify --registry {self.root}`")
        if not (self.root / name / "manifest.json").is_file():
            raise BadInput(f"{path}: names {name}, which is missing from the registry")
        return name

    def latest(self) -> Path:
        return self.root / self.latest_name()

    def path_of(self, name: str) -> Path:
        version_number(name)
        return self.root / name

    # --- the lock ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the registry's exclusive lock; a second writer fails at once naming the holder. Finishes a
        commit an earlier writer left half-made before yielding."""
        if not self.root.is_dir():
            raise BadInput(f"{self.root}: not a registry (folder not found); create one with `fedtune init`")
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._take(fd)
            holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                self.recover()
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _take(self, fd: int) -> None:
        """flock `fd` or fail naming the holder. A holder writes its note just after taking the lock and clears
        it just before letting go, so an empty note means one of those instants: look again before failing."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = self._holder(fd)
                if holder is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                    continue
                raise BadInput(f"{self.root}: in use by {holder or 'another fedtune command'}; "
                               "wait for it to finish") from None

    @staticmethod
    def _holder(fd: int) -> str | None:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"`fedtune {info['command']}` (pid {info['pid']} on {info['host']}, since {info['since']})"
        except (ValueError, KeyError, TypeError):
            return None

    # --- commit and recovery ----------------------------------------------------------------------------

    def publish(self, built: Path, name: str) -> Path:
        """Move a finished hidden version folder to its final name; never replaces anything there."""
        target = self.path_of(name)
        try:
            _rename_noreplace(built, target)
        except FileExistsError:
            shutil.rmtree(built, ignore_errors=True)
            raise BadInput(f"{target}: appeared while this version was made; nothing was published") from None
        _fsync_dir(self.root)
        return target

    def append(self, entry: dict) -> dict:
        """Append a signed line chained to the last one (the commit point of every registry change)."""
        entry = {**entry, "prev": self._last_line_hash()}
        if self.key is not None:
            entry["sig"] = self.key.sign(canonical_json(entry))
        line = canonical_json(entry) + b"\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write", str(self.log_path))
            os.fsync(fd)
        except OSError:
            self._trim_torn_line()
            raise
        finally:
            os.close(fd)
        return entry

    def commit(self, folder: Path, extra: dict | None = None) -> dict:
        """Log the published version in `folder` and point LATEST at it.

        The line is made from the version's manifest alone (plus `extra`, only for v0000's roster), so a commit
        that recover() finishes writes the same line the interrupted command would have."""
        manifest_bytes = (folder / "manifest.json").read_bytes()
        manifest = json.loads(manifest_bytes)
        entry = {
            "event": "version", "version": folder.name, "round": manifest["round"], "parent": manifest.get("parent"),
            "adapter_sha256": manifest["adapter_sha256"],
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "created": now(),
            **({"rolled_back_to": manifest["rolled_back_to"]} if manifest.get("rolled_back_to") else {}),
            **({"equivocations": len(manifest["equivocations"])} if manifest.get("equivocations") else {}),
            **(extra or {}),
        }
        entry = self.append(entry)
        try:
            write_text_atomic(self.root / "LATEST", folder.name + "\n")
        except OSError as err:
            # Past the commit point: the version is committed, only LATEST lags (recover() moves it).
            raise BadInput(f"{self.root / 'LATEST'}: could not be moved to {folder.name} ({err.strerror}); "
                           f"{folder.name} is committed — the next fedtune command on this registry moves "
                           "LATEST") from None
        return entry

    def _last_line_hash(self) -> str:
        lines = self._lines()
        return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS

    def _lines(self) -> list[bytes]:
        if not self.log_path.is_file():
            return []
        return self.log_path.read_bytes().splitlines(keepends=True)

    def _trim_torn_line(self) -> bool:
        """Cut a last line without its newline (a write the disk or a kill interrupted)."""
        if not self.log_path.is_file():
            return False
        data = self.log_path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        with open(self.log_path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            os.fsync(handle.fileno())
        return True

    def entries(self) -> list[dict]:
        """The log's committed entries, parsed (`fedtune verify` checks their chain and signatures). A last line
        without its newline was never committed (recover() cuts it) and is left out."""
        out = []
        lines = self._lines()
        if lines and not lines[-1].endswith(b"\n"):
            lines = lines[:-1]
        for number, raw in enumerate(lines, start=1):
            try:
                entry = parse_json(raw, f"{self.log_path} line {number}")
            except WireError as err:
                raise BadInput(f"{err} (the log was edited; run `fedtune verify --registry {self.root}`)") from None
            if not isinstance(entry, dict):
                raise BadInput(f"{self.log_path}: line {number} is not a JSON object (the log was edited)")
            out.append(entry)
        return out

    def _roster_lines(self) -> list[tuple[int, dict]]:
        """The log lines that set the roster, in order: the first (v0000's) and every roster event."""
        return [(n, e) for n, e in enumerate(self.entries(), start=1) if n == 1 or e.get("event") == "roster"]

    def recorded_roster(self) -> tuple[int, str | None]:
        """The log line that last set the roster (the first line, or the latest roster event) and the roster's
        sha256 it records."""
        found = self._roster_lines()
        if not found:
            return 0, None
        number, entry = found[-1]
        return number, entry.get("roster_sha256")

    def pending_roster(self, config: FederationConfig) -> tuple[int, dict] | None:
        """The last roster event, when `config` is exactly one committed roster change behind the log: its roster
        is the one recorded before that event, and the event (signed, where the federation has a coordinator key)
        carries the whole new roster. A roster change appends its line first, then rewrites federation.yaml, so
        this is what a command killed in between leaves; None for any other state."""
        found = self._roster_lines()
        if len(found) < 2:
            return None
        (_, before), (number, last) = found[-2], found[-1]
        roster = last.get("roster")
        if before.get("roster_sha256") != roster_sha256(config) or not isinstance(roster, list):
            return None
        if sites_sha256(roster) != last.get("roster_sha256"):
            return None
        if config.coordinator_key is not None and not verify_line(last, config.coordinator_key):
            return None
        return number, last

    def check_roster(self, config: FederationConfig, config_path: Path | str = "federation.yaml") -> None:
        """Refuse a federation.yaml whose roster is not the one the log last recorded: keys decide who may
        send updates, so they change only through `fedtune roster` (a signed log line)."""
        number, recorded = self.recorded_roster()
        if recorded is None or recorded == roster_sha256(config):
            return
        pending = self.pending_roster(config)
        if pending is not None:
            line, entry = pending
            change = f"{printable(entry.get('action'), 10)} {printable(entry.get('site'), 64)}"
            raise BadInput(f"{config_path}: one roster change behind {self.log_path} (line {line}: {change}), "
                           f"committed but not yet written to it; `fedtune roster sync --config {config_path} "
                           f"--registry {self.root}` applies it")
        raise BadInput(f"{config_path}: its roster is not the one {self.log_path} records (line {number}): it "
                       "was edited by hand; restore it (`fedtune verify --registry` checks), then change it with "
                       "`fedtune roster`")

    def versions(self) -> list[dict]:
        return [e for e in self.entries() if e.get("event") == "version"]

    def recover(self) -> list[str]:
        """Finish or drop what an interrupted writer left; returns what was done (one phrase each)."""
        done = []
        for child in self.root.iterdir():
            if LEFTOVER.match(child.name):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                done.append(f"removed leftover {child.name}")
        if self._trim_torn_line():
            done.append("cut a torn last log line")
        versions = self.versions()
        if not versions:
            return done
        last = versions[-1]["version"]
        pending = self.root / version_name(version_number(last) + 1)
        # A version held on an alert waits for `fedtune promote` (which checks it) or `--reject`.
        if pending.exists() and held_manifest(pending) is None:
            why = self._unfinished_problem(pending, last)
            if why is None:
                self.commit(pending)
                done.append(f"finished the commit of {pending.name}")
                return done
            # Set aside, not deleted: it may hold something a person put there.
            aside = self.root / f"{pending.name}.dropped-{now().replace(':', '').replace('+0000', 'Z')}"
            os.rename(pending, aside)
            done.append(f"set aside an unfinished {pending.name} as {aside.name} ({why})")
        latest = self.root / "LATEST"
        if not latest.is_file() or latest.read_text(errors="replace").strip() != last:
            write_text_atomic(latest, last + "\n")
            done.append(f"moved LATEST to {last}")
        return done

    # --- versions held on an alert (aggregate --hold-on-alert) ----------------------------------------------

    def held(self) -> list[dict]:
        """The version held on an alert, if any, as [{"version", "parent", "alerts", "created"}].

        A held version is the one after the log's last: published (signed, its files written) but not committed, so
        LATEST stays at its parent until `promote`. The list reads the manifest without checking its signature
        (promote checks it)."""
        versions = self.versions()
        if not versions:
            return []
        folder = self.root / version_name(version_number(versions[-1]["version"]) + 1)
        manifest = held_manifest(folder)
        if manifest is None:
            return []
        return [{"version": folder.name, "parent": manifest.get("parent"), "created": manifest.get("created"),
                 "alerts": (manifest.get("monitor") or {}).get("alerts", [])}]

    def _unfinished_problem(self, folder: Path, parent: str) -> str | None:
        """Why a published but unlogged version cannot be committed as it is (None: it can)."""
        try:
            manifest = read_version_manifest(folder, self.key.public if self.key else None)
            check_version_files(folder, manifest)
        except BadInput as err:
            return str(err)
        if manifest.get("parent") != parent or manifest["version"] != folder.name:
            return f"its parent is {manifest.get('parent')}, the log's last version is {parent}"
        return None

    def accepted(self) -> tuple[set[str], set[str]]:
        """Nonces and update sha256s of every update merged into a version of this registry (replay checks)."""
        nonces, hashes = set(), set()
        for entry in self.versions():
            folder = self.root / entry["version"]
            if not (folder / "manifest.json").is_file():
                continue
            manifest = read_version_manifest(folder)
            for contributor in manifest.get("contributors", []):
                nonces.add(contributor["nonce"])
                hashes.add(contributor["update_sha256"])
        return nonces, hashes

    def resolve(self, ref: Path | str) -> Path:
        """A registry folder means its LATEST; a version folder means itself."""
        ref = Path(ref)
        if (ref / "LATEST").is_file():
            return Registry(ref).latest()
        if (ref / "manifest.json").is_file() and (ref / "adapter_model.safetensors").is_file():
            return ref
        raise BadInput(f"{ref}: neither a registry (with LATEST) nor a global version folder")


def held_manifest(folder: Path) -> dict | None:
    """The manifest of a version folder whose manifest says it is held on an alert (not signature-checked), else
    None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return None
    monitor = manifest.get("monitor") if isinstance(manifest, dict) else None
    return manifest if isinstance(monitor, dict) and monitor.get("held") is True else None


def verify_line(entry: dict, coordinator_key: str) -> bool:
    """True when a log entry carries the coordinator's signature of the rest of it."""
    body = {k: v for k, v in entry.items() if k != "sig"}
    return isinstance(entry.get("sig"), str) and verify(coordinator_key, canonical_json(body), entry["sig"])


def resolve_global(ref: Path | str) -> Path:
    return Registry(ref).resolve(ref)


def checked_version(ref: Path | str, config: FederationConfig) -> tuple[Path, dict]:
    """A global version of this federation: signed by its coordinator, its files matching its manifest.

    Args:
        ref: a registry (its LATEST is used) or a global version folder.
        config: the federation the version must belong to (coordinator key, base model and LoRA settings).

    Returns:
        The version folder and its manifest.
    """
    folder = resolve_global(ref)
    manifest = read_version_manifest(folder, config.coordinator_key)
    if manifest["base_model"]["sha256"] != config.base_model.sha256:
        raise BadInput(f"{folder}: built on another base model than the federation's; use this federation's registry")
    if manifest["lora"] != config.lora.shape():
        raise BadInput(f"{folder}: LoRA settings differ from federation.yaml's; use this federation's registry")
    check_version_files(folder, manifest)
    return folder, manifest
