"""Start, watch and stop the Flower processes of a live federation — the SuperLink and `flwr run` that `fedtune
serve` runs, the SuperNode that `fedtune join` runs — and write what they read: the Flower App folder and the
SuperLink connection in FLWR_HOME. Flower is never imported here; it runs in the child processes only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from fedtune import __version__
from fedtune.errors import BadInput, StageFailed

# Flower asks a server for news and reports usage unless told not to; a federation's machines may be offline.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
APP_NAME = "fedtune-live"
CONNECTION = "fedtune"  # the SuperLink connection `flwr run` uses, in the work folder's FLWR_HOME
SERVER_APP = "fedtune.live.server:app"
CLIENT_APP = "fedtune.live.client:app"


def binary(name: str) -> str:
    """A Flower executable: the one beside this Python first (the same environment as fedtune), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise BadInput(f'{name}: not found; the live transport needs Flower: pip install "fedtune[flower]"')
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower child: its own FLWR_HOME, and the folder of Flower's executables first on PATH
    (a SuperLink and a SuperNode start further ones, flower-superexec and flwr-serverapp/-clientapp, by name)."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(Path(binary("flwr")).parent), env.get("PATH", "")])
    return env


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str) -> Address:
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadInput(f"{option} {text}: give HOST:PORT, e.g. 127.0.0.1:9093")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def local(self) -> Address:
        """Where processes on this machine reach a server bound here: a bind-all host means loopback (Flower's
        own processes connect there too, so a TLS certificate must name it)."""
        return Address({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host), self.port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def listening(address: Address) -> bool:
    try:
        with socket.create_connection((address.host, address.port), timeout=1):
            return True
    except OSError:
        return False


def toml_string(value: str, option: str) -> str:
    """`value` as a TOML string Flower's `--node-config` parser takes: it reads a quoted value up to the next quote
    of the same kind, so a literal string ('…', no escapes) unless the value holds a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise BadInput(f"{option} {value}: a path holding both quote characters (or a quote and a backslash) cannot be "
                   "passed to Flower; move or rename it")


def node_config(values: dict[str, str], options: dict[str, str]) -> str:
    """Flower's `--node-config` argument: space-separated key='value' pairs (`options` names each key's option)."""
    return " ".join(f"{key}={toml_string(value, options.get(key, key))}" for key, value in values.items())


def superlink_command(address: Address, tls: dict[str, Path] | None) -> list[str]:
    command = [binary("flower-superlink"), "--host", address.host, "--port", str(address.port),
               "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(tls["ca.crt"]), "--ssl-certfile", str(tls["server.crt"]),
            "--ssl-keyfile", str(tls["server.key"])]


def supernode_command(superlink: Address, port: int, values: dict[str, str], options: dict[str, str],
                      root_certificates: Path | None) -> list[str]:
    trust = ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return [binary("flower-supernode"), *trust, "--superlink", str(superlink), "--port", str(port),
            "--node-config", node_config(values, options)]


def write_app(folder: Path, run_config: dict[str, str | int | float]) -> Path:
    """The Flower App `flwr run` bundles: only a pyproject.toml whose components are fedtune's ServerApp and
    ClientApp (Flower imports them from the installed fedtune) and whose run config is this serve's settings."""
    lines = ['[build-system]', 'requires = ["setuptools>=77"]', 'build-backend = "setuptools.build_meta"', '',
             '[project]', f'name = "{APP_NAME}"', f'version = "{__version__}"',
             'description = "A fedtune federation over Flower (written by `fedtune serve`)"',
             'license = "Apache-2.0"', 'dependencies = ["fedtune"]', '',
             '[tool.flwr.app]', 'publisher = "fedtune"', '',
             '[tool.flwr.app.components]', f'serverapp = "{SERVER_APP}"', f'clientapp = "{CLIENT_APP}"', '',
             '[tool.flwr.app.config]']
    for key, value in run_config.items():
        lines.append(f"{key} = {_toml_value(value)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_connection(flwr_home: Path, superlink: Address, root_certificates: Path | None) -> None:
    """$FLWR_HOME/config.toml naming the one SuperLink `flwr run` talks to."""
    trust = ("insecure = true" if root_certificates is None
             else f"root-certificates = {_toml_value(str(root_certificates))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{superlink}"\n{trust}\n',
        encoding="utf-8")


def _toml_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"run config value {value!r}")
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        if any(ord(ch) < 32 for ch in escaped):
            raise BadInput(f"{value!r}: a path with control characters cannot be passed to Flower")
        return f'"{escaped}"'
    return repr(value)


class Child:
    """A Flower process this command started. Flower's processes start their own in new sessions (flower-superexec,
    flwr-serverapp, flwr-clientapp), so `stop` ends the whole tree by process id, not by process group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path | None = None,
                 capture: bool = False):
        self.name = name
        self.log = log
        handle = open(log, "ab") if log is not None else None
        try:
            self.process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else handle, stderr=subprocess.STDOUT if (capture or handle) else None,
                start_new_session=True, text=capture, bufsize=1 if capture else -1)
        finally:
            if handle is not None:
                handle.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, count: int = 15) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        with open(self.log, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=count))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process and everything it started, SIGKILL to whatever is left after `grace` seconds."""
        tree = {pid: _started(pid) for pid in descendants(self.pid)}
        if self.running():
            self.process.terminate()
        for pid, started in tree.items():
            _signal(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.running() or any(
                started is not None and _started(pid) == started for pid, started in tree.items())):
            time.sleep(0.1)
        tree.update({pid: _started(pid) for pid in descendants(self.pid)})
        if self.running():
            self.process.kill()
        for pid, started in tree.items():
            _signal(pid, started, signal.SIGKILL)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def start_superlink(address: Address, tls: dict[str, Path] | None, env: dict[str, str], log: Path,
                    timeout: float = 60.0) -> Child:
    """A SuperLink serving `address`, once it accepts connections; StageFailed (with its log's end) if it cannot."""
    if listening(address.local()):
        raise BadInput(f"--address {address}: something already listens there (a SuperLink still running?); give "
                       "another port, or --superlink to use the running one")
    child = Child("SuperLink", superlink_command(address, tls), env, log)
    deadline = time.monotonic() + timeout
    while not listening(address.local()):
        if not child.running() or time.monotonic() > deadline:
            child.stop()
            last = child.tail(1).strip() or "empty"
            raise StageFailed(f"the SuperLink did not start on {address} (its last line: {last}); see {log}")
        time.sleep(0.2)
    return child


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (empty where there is none: Flower's processes then end themselves
    when their parent does)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name sits in parentheses and may hold spaces; the parent id is the 2nd field after it.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _started(pid: int) -> str | None:
    """When process `pid` started (from /proc), so a signal never reaches a later process given the same id; None
    when it has ended (or is a zombie), or where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _signal(pid: int, started: str | None, sig: int) -> None:
    if started is None or _started(pid) != started:
        return
    try:
        os.kill(pid, sig)
    except OSError:
        pass
