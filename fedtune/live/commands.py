"""The work behind `fedtune serve` and `fedtune join`: check every input first (so a mistake is one line before any
Flower process starts), then run the Flower processes until the rounds are done or the site is stopped, and stop
them all whatever way the command ends.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from fedtune.errors import BadInput, StageFailed
from fedtune.live import parse_event, require_flower
from fedtune.live.processes import (
    CONNECTION,
    Address,
    Child,
    binary,
    flower_env,
    listening,
    start_superlink,
    supernode_command,
    write_app,
    write_connection,
)

DEFAULT_JOIN_TIMEOUT = 600.0


def _trust(tls: Path | None, insecure: bool, option: str) -> None:
    if tls is not None and insecure:
        raise BadInput(f"{option} and --insecure: give one of them")
    if tls is None and not insecure:
        raise BadInput(f"{option} or --insecure: give one (a SuperLink without TLS sends updates in the clear; "
                       "`fedtune tls new DIR --host HOST` makes certificates)")


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """A SIGTERM (a scheduler stopping the command) ends it as Ctrl-C does, so the Flower processes are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    config_path: Path,
    registry: Path,
    updates: Path,
    rounds: int,
    *,
    tls: Path | None = None,
    insecure: bool = False,
    address: Address = Address("127.0.0.1", 9093),
    superlink: Address | None = None,
    key: Path | None = None,
    join_timeout: float = DEFAULT_JOIN_TIMEOUT,
    work: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
    on_round: Callable[[dict], None] = lambda _event: None,
) -> dict:
    """Run `rounds` live rounds: start a SuperLink on `address` (or use the running one at `superlink`), run
    fedtune's Flower App on it, and stop it at the end.

    Args:
        config_path, registry, updates: the federation, its registry and the updates root.
        rounds: global versions to make.
        tls: a folder from `fedtune tls new` (ca.crt, server.crt, server.key); else `insecure` must be True.
        address: where the SuperLink this command starts listens.
        superlink: a running SuperLink to use instead (the coordinator's machine must be the SuperLink's: the
            ServerApp writes the registry there).
        key: the coordinator's private key (default: coordinator.key beside the registry).
        join_timeout: seconds a round waits for its called sites' nodes to join before it goes on without them.
        work: folder for Flower's files and logs (default: a temporary folder, removed unless the run failed).
        log: receives progress lines; on_round: receives each round's result event.

    Returns:
        {"rounds": [round events], "versions": [...]}.
    """
    from fedtune.config import load_federation
    from fedtune.live.tls import CA_CERT, tls_files
    from fedtune.registry import Registry, coordinator_signer

    require_flower()
    _trust(tls, insecure, "--tls")
    if rounds < 1:
        raise BadInput(f"--rounds {rounds}: give at least 1")
    if join_timeout < 0:
        raise BadInput(f"--join-timeout {join_timeout:g}: give seconds, 0 or more")
    config = load_federation(config_path)
    if config.privacy.secure_aggregation:
        raise BadInput(f"{config_path}: privacy.secure_aggregation is not run over the live transport yet; run its "
                       "rounds over files (train-local, unmask, aggregate)")
    registry = Registry(registry)
    registry.latest_name()
    coordinator_signer(config, registry.root, key)
    registry.check_roster(config, config_path)
    target = superlink or address.local()
    certificates = None
    if tls is not None and superlink is None:
        certificates = tls_files(tls, hosts=(target.host,))
    elif tls is not None:  # a running SuperLink serves its own certificate: only the CA that checks it is needed
        certificates = {CA_CERT: (tls / CA_CERT).resolve()}
        if not certificates[CA_CERT].is_file():
            raise BadInput(f"--tls {tls}: {CA_CERT} missing (the CA that signed the running SuperLink's certificate)")
    updates.mkdir(parents=True, exist_ok=True)

    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="fedtune-serve-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    env = flower_env(work / "flwr-home")
    run_config = {"config": str(config_path.resolve()), "registry": str(registry.root.resolve()),
                  "updates": str(updates.resolve()), "rounds": rounds,
                  "key": str(key.resolve()) if key is not None else "", "join-timeout": float(join_timeout)}
    app = write_app(work / "app", run_config)
    outcome: dict = {"rounds": [], "versions": []}
    link = flwr = None
    failed = True
    try:
        with stopped_by_sigterm():
            if superlink is None:
                log(f"starting a SuperLink on {address} ({'TLS' if certificates else 'insecure'})")
                link = start_superlink(address, certificates, env, work / "superlink.log")
            write_connection(work / "flwr-home", target, certificates[CA_CERT] if certificates else None)
            flwr = Child("flwr run", [binary("flwr"), "run", str(app), CONNECTION, "--stream"], env, capture=True)
            _follow(flwr, work / "flwr-run.log", outcome, log, on_round)
            flwr.process.wait()
        if "error" in outcome:
            error = outcome["error"]
            raise (BadInput if error.get("exit_code") == 2 else StageFailed)(str(error.get("message")))
        if "done" not in outcome:
            raise StageFailed(f"the Flower run ended before its rounds were done (its last line: "
                              f"{_last_line(work / 'flwr-run.log')}); see {work / 'flwr-run.log'}"
                              + (f" and {work / 'superlink.log'}" if link else ""))
        failed = False
        outcome["versions"] = outcome.pop("done")
        return outcome
    finally:
        if flwr is not None:
            if flwr.running() and superlink is not None and outcome.get("run_id"):
                # The run lives on in a SuperLink this command did not start: stop it there.
                stopper = Child("flwr stop", [binary("flwr"), "stop", outcome["run_id"], CONNECTION], env,
                                work / "flwr-stop.log")
                try:
                    stopper.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stopper.stop()
            flwr.stop()
        if link is not None:
            link.stop()
        if own_work and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif own_work:
            log(f"Flower's logs are kept in {work}")


def _follow(flwr: Child, log_path: Path, outcome: dict, log, on_round) -> None:
    """Read `flwr run --stream`: the ServerApp's event lines drive progress and results; every line goes to the
    run's log."""
    with open(log_path, "a", encoding="utf-8") as record:
        for line in flwr.process.stdout:
            record.write(line)
            record.flush()
            if "run_id" not in outcome and "Successfully started run" in line:
                outcome["run_id"] = line.rsplit(" ", 1)[-1].strip()
            event = parse_event(line)
            if event is None:
                continue
            kind = event["event"]
            if kind == "log":
                log(str(event.get("message")))
            elif kind == "round-open":
                log(f"round {event['round']}: calls {', '.join(event['sites'])} from {event['version']}"
                    + (f" (open {event['deadline']:.0f} s)" if event.get("deadline") is not None else ""))
            elif kind == "round":
                outcome["rounds"].append(event)
                on_round(event)
            elif kind in ("error", "done"):
                outcome[kind] = event.get("versions") if kind == "done" else event


def _last_line(path: Path) -> str:
    """What a log says last: the text of Flower's last framed error box, else its last line."""
    from fedtune.wire.codec import printable

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("╭─ Error")]
    if starts:
        box = []
        for line in lines[starts[-1] + 1:]:
            if line.startswith("╰"):
                break
            box.append(line.strip(" │"))
        return printable(" ".join(part for part in box if part), 300)
    said = [line.strip() for line in lines if line.strip()]
    return printable(said[-1], 300) if said else "none"


def join(
    config_path: Path,
    site: str,
    data: Path,
    key: Path | None,
    superlink: Address,
    *,
    root_certificates: Path | None = None,
    insecure: bool = False,
    model: Path | None = None,
    port: int = 9094,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> int:
    """Check this site's inputs, then run a SuperNode that serves the site until it is stopped.

    Args:
        config_path: the federation.yaml; site: this site's roster name; data: its prepared folder; key: its
            private key (required once the roster holds keys).
        superlink: the coordinator's SuperLink (HOST:PORT).
        root_certificates: the federation's ca.crt (from `fedtune tls new`); else `insecure` must be True.
        model: this site's copy of the base model (else FEDTUNE_MODEL_DIR or the federation's model id).
        port: the SuperNode's own port on this machine (each site on one machine needs its own).
        cache: where received global versions are kept (default: versions/ beside the data folder).

    Returns:
        The SuperNode's exit status.
    """
    from fedtune import models
    from fedtune.config import load_federation
    from fedtune.data.prepared import read_prepared
    from fedtune.train import site_signer

    require_flower()
    _trust(root_certificates, insecure, "--root-certificates")
    if root_certificates is not None and not root_certificates.is_file():
        raise BadInput(f"--root-certificates {root_certificates}: file not found; it is the ca.crt the coordinator "
                       "made with `fedtune tls new`")
    config = load_federation(config_path)
    config.require_site(site, "join")
    site_signer(config, site, key)
    if not (data / "data_card.json").is_file():
        raise BadInput(f"--data {data}: not a prepared folder (no data_card.json); run `fedtune prepare` first")
    card, _ids, _labels = read_prepared(data, config, "train")
    if card.get("site") != site:
        raise BadInput(f"{data / 'data_card.json'}: prepared for site '{card.get('site')}', not '{site}'")
    models.locate_base(config.base_model.id, config.base_model.sha256, model, "join")
    if not 0 < port < 65536:
        raise BadInput(f"--port {port}: give a port number")
    if listening(Address("127.0.0.1", port)):
        raise BadInput(f"--port {port}: in use on this machine; give another (each site's SuperNode needs its own)")
    values = {"site": site, "data": str(data.resolve()), "config": str(config_path.resolve()),
              "key": str(key.resolve()) if key is not None else "",
              "cache": str((cache or data.resolve().parent / "versions").resolve())}
    if model is not None:
        values["model"] = str(model.resolve())
    options = {"data": "--data", "config": "--config", "key": "--key", "cache": "--cache", "model": "--model"}
    command = supernode_command(superlink, port, values, options, root_certificates.resolve() if root_certificates
                                else None)
    home = Path(tempfile.mkdtemp(prefix="fedtune-join-"))
    node = None
    try:
        with stopped_by_sigterm():
            log(f"{site}: joining the federation at {superlink} ({'TLS' if root_certificates else 'insecure'}); "
                "stop with Ctrl-C")
            node = Child("SuperNode", command, flower_env(home))
            return node.process.wait()
    except KeyboardInterrupt:
        log(f"{site}: leaving the federation")
        return 0
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(home, ignore_errors=True)
