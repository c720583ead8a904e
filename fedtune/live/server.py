"""The coordinator in a live federation: the Flower ServerApp `fedtune serve` runs on the SuperLink.

It learns which node serves which site (a query message), then runs rounds: `fedtune.rounds.open_round` says who
a round calls and how long it stays open; each called site gets a train message with the current global version
(only its name and hash when the site already holds it); each reply is written with `write_update` into
updates/round-NNNN/<site>/, the folder the file transport uses; and `aggregate_round` makes the next version, so
`fedtune log`, `verify` and `evaluate` read the registry as they always do. A site that refuses, fails or does not
answer in time is left out, and the aggregation stage decides whether the round still meets its quorum.
Asynchronous rounds (aggregation.async, FedBuff) keep every called site busy instead (`fedtune.live.buffered`).

Progress goes out as event lines (fedtune.live.event_line) that `flwr run --stream` relays to `fedtune serve`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.errors import BadInput, FedtuneError
from fedtune.live import event_line, records
from fedtune.wire.codec import WireError, printable

app = ServerApp()

POLL_SECONDS = 0.5  # between pulls of replies: small against a round, which takes seconds at the least
QUERY_TTL = 120.0
QUERY_RETRY_SECONDS = 10.0


@dataclass
class ServeSettings:
    """The run config `fedtune serve` writes into the Flower App."""

    config: Path
    registry: Path
    updates: Path
    rounds: int
    key: Path | None
    join_timeout: float

    @classmethod
    def from_run_config(cls, run_config: dict) -> ServeSettings:
        try:
            return cls(Path(run_config["config"]), Path(run_config["registry"]), Path(run_config["updates"]),
                       int(run_config["rounds"]), Path(run_config["key"]) if run_config.get("key") else None,
                       float(run_config["join-timeout"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BadInput(f"run config: {err} missing or malformed; start the federation with `fedtune serve`") from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    def emit(event: str, **fields) -> None:
        print(event_line(event, **fields), flush=True)

    try:
        settings = ServeSettings.from_run_config(dict(context.run_config))
        Coordinator(grid, settings, emit).run()
    except FedtuneError as err:
        emit("error", message=str(err), exit_code=err.exit_code)


class Coordinator:
    """The ServerApp's state across rounds: which node serves which site, and which versions each node holds."""

    def __init__(self, grid: Grid, settings: ServeSettings, emit: Callable[..., None]):
        from fedtune.config import load_federation

        self.grid = grid
        self.settings = settings
        self.emit = emit
        self.config = load_federation(settings.config)
        self.node_of: dict[str, int] = {}  # site → node id
        self.site_of: dict[int, str] = {}
        self.held: dict[int, dict[str, str]] = {}  # node id → {version: adapter sha256}
        self.turned_away: set[int] = set()  # nodes whose identity was refused (logged once)
        self.queries: dict[str, int] = {}  # query message id → node id
        self.late: dict[str, tuple[str, int]] = {}  # message id of a closed round's order → (site, round)
        self._files: tuple[Path, dict[str, bytes]] | None = None
        self.ask_again: dict[int, float] = {}  # node → when to ask again, after its query failed in Flower

    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def run(self) -> None:
        if self.config.aggregation.asynchronous is not None:
            from fedtune.live.buffered import run_buffered

            versions = run_buffered(self)
        else:
            versions = [self.sync_round() for _ in range(self.settings.rounds)]
        self.emit("done", versions=versions)

    # --- nodes ---------------------------------------------------------------------------------------------

    def refresh_nodes(self) -> None:
        """Forget nodes that went offline, ask new ones who they are, read the answers that came in."""
        online = set(self.grid.get_node_ids())
        for node in [n for n in self.site_of if n not in online]:
            site = self.site_of.pop(node)
            self.node_of.pop(site, None)
            self.log(f"{site}: its node left the federation")
        asked = set(self.queries.values())
        now = time.monotonic()
        new = [n for n in online if n not in self.site_of and n not in self.turned_away and n not in asked
               and self.ask_again.get(n, 0) <= now]
        if new:
            messages = [Message(RecordDict({}), node, records.QUERY, ttl=QUERY_TTL) for node in new]
            for node, message_id in zip(new, self.grid.push_messages(messages)):
                if message_id:
                    self.queries[message_id] = node
        if not self.queries:
            return
        for reply in self.grid.pull_messages(list(self.queries)):
            node = self.queries.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                self.identify(node, reply)

    def identify(self, node: int, reply: Message) -> None:
        if reply.has_error():  # Flower's error (the query expired, the ClientApp crashed): ask again later
            self.ask_again[node] = time.monotonic() + QUERY_RETRY_SECONDS
            self.log(f"node {node}: did not say which site it serves ({printable(reply.error.reason, 300)}); "
                     f"asking again in {QUERY_RETRY_SECONDS:g} s")
            return
        refusal = records.read_refusal(reply.content)
        try:
            if refusal is not None:
                raise WireError(refusal.message)
            identity = records.read_identity(reply.content)
        except WireError as err:
            self.turned_away.add(node)
            self.log(f"node {node}: turned away: {err}")
            return
        site = identity.site
        problem = None
        if site not in self.config.site_names():
            problem = f"site {site} is not on the roster of {self.settings.config}"
        elif self.config.site_key(site) is not None and identity.public_key != self.config.site_key(site):
            problem = f"its key is not the one the roster holds for site {site}"
        elif site in self.node_of:
            problem = f"site {site} is served by node {self.node_of[site]} already"
        if problem is not None:
            self.turned_away.add(node)
            self.log(f"node {node}: turned away: {problem}")
            return
        self.node_of[site], self.site_of[node] = node, site
        self.held[node] = dict(identity.versions)
        self.log(f"{site}: joined (node {node}" + (f", holds {', '.join(sorted(identity.versions))})"
                                                     if identity.versions else ")"))

    def wait_for(self, sites: list[str]) -> dict[str, int]:
        """The nodes of `sites`, waiting up to join-timeout seconds for those that have not joined yet."""
        limit = time.monotonic() + self.settings.join_timeout
        shown = None
        while True:
            self.refresh_nodes()
            missing = [s for s in sites if s not in self.node_of]
            if not missing or time.monotonic() >= limit:
                break
            if missing != shown:
                self.log(f"waiting for {', '.join(missing)} to join ({len(sites) - len(missing)} of {len(sites)} "
                         "called sites joined)")
                shown = missing
            time.sleep(POLL_SECONDS)
        if missing:
            self.log(f"{', '.join(missing)}: not joined after {self.settings.join_timeout:g} s; left out")
        return {s: self.node_of[s] for s in sites if s in self.node_of}

    # --- orders and replies --------------------------------------------------------------------------------

    def order(self, site: str, node: int, number: int, version: Path, manifest: dict, ttl: float | None,
              traffic: dict, force_files: bool = False) -> str | None:
        """Send `site` a train message for round `number` from `version`; returns its message id."""
        files = None
        if force_files or self.held.get(node, {}).get(manifest["version"]) != manifest["adapter_sha256"]:
            files = self.version_files(version, manifest)
        content = records.order_content(number, manifest["version"], manifest["adapter_sha256"], files)
        message = Message(content, node, records.TRAIN, ttl=ttl, group_id=str(number))
        message_id = next(iter(self.grid.push_messages([message])), None)
        if not message_id:
            self.log(f"{site}: the SuperLink did not take its round-{number} message; left out")
            return None
        traffic.setdefault(site, {"sent": 0, "received": 0})["sent"] += records.payload_bytes(content)
        self.log(f"{site}: sent round {number} from {manifest['version']}"
                 + (f" ({records.payload_bytes(content)} bytes)" if files else " (it holds the version)"))
        return message_id

    def version_files(self, version: Path, manifest: dict) -> dict[str, bytes]:
        """The files of a version folder as a train message carries them (read once per version)."""
        if self._files is None or self._files[0] != version:
            self._files = (version, {name: (version / name).read_bytes()
                                     for name in records.VERSION_FILES if (version / name).is_file()})
        return self._files[1]

    def receive(self, site: str, node: int | None, reply: Message, number: int,
                traffic: dict) -> records.Refusal | Path | None:
        """Write a site's reply into updates/round-NNNN/<site>/; returns the folder, the site's refusal, or None."""
        from fedtune.registry import Registry, round_dir_name
        from fedtune.wire.tensors import ADAPTER_FILE
        from fedtune.wire.update import write_update

        if reply.has_error():
            self.log(f"{site}: no update for round {number} ({printable(reply.error.reason, 300)})")
            return None
        traffic.setdefault(site, {"sent": 0, "received": 0})["received"] += records.payload_bytes(reply.content)
        try:
            refusal = records.read_refusal(reply.content)
            if refusal is not None:
                return refusal
            sender, sent_round, update = records.read_update(reply.content)
        except WireError as err:
            self.log(f"{site}: its reply for round {number} is not usable: {err}")
            return None
        if sender != site or sent_round != number:
            self.log(f"{site}: replied with site {sender}'s update for round {sent_round}, not its own for round "
                     f"{number}; left out")
            return None
        # What aggregation would refuse anyway is not written: a tensor file over twice the version's (as the
        # engine's checks), or files only secure aggregation sends, which live rounds do not run.
        limit = 2 * (Registry(self.settings.registry).latest() / ADAPTER_FILE).stat().st_size + (1 << 20)
        if len(update.tensors) > limit or update.extra:
            why = (f"its tensors are {len(update.tensors)} bytes, over {limit}" if len(update.tensors) > limit
                   else f"it holds files no update of a live round has ({', '.join(sorted(update.extra))})")
            self.log(f"{site}: its update for round {number} is left out: {why}")
            return None
        target = self.settings.updates / round_dir_name(number) / site
        if target.exists():
            self.log(f"{target}: already there; the new update from {site} is left out")
            return None
        parent = update.manifest.get("parent") if isinstance(update.manifest.get("parent"), dict) else {}
        if node is not None and parent.get("version") and parent.get("sha256"):
            self.held.setdefault(node, {})[parent["version"]] = parent["sha256"]
        return write_update(target, update)

    def collect(self, pending: dict[str, tuple[str, int]], number: int, version: Path, manifest: dict,
                closes: float | None, ttl: float | None, traffic: dict,
                on_update: Callable[[str, Path], None] = lambda _s, _f: None) -> None:
        """Pull replies to `pending` (message id → (site, node)) until all are in or `closes` (monotonic) passes.
        A site that asks for the version's files gets them once more; a closed round's late replies are logged."""
        resent: set[str] = set()
        while pending and (closes is None or time.monotonic() < closes):
            self.pull_late()
            for reply in self.grid.pull_messages(list(pending)):
                site, node = pending.pop(reply.metadata.reply_to_message_id, (None, None))
                if site is None:
                    continue
                outcome = self.receive(site, node, reply, number, traffic)
                if isinstance(outcome, records.Refusal):
                    if outcome.kind == records.NEEDS_VERSION and site not in resent:
                        resent.add(site)
                        self.log(f"{site}: {outcome.message}; sending the version's files")
                        message_id = self.order(site, node, number, version, manifest, ttl, traffic, force_files=True)
                        if message_id:
                            pending[message_id] = (site, node)
                    else:
                        self.log(f"{site}: refused round {number}: {outcome.message}")
                elif outcome is not None:
                    self.log(f"{site}: update for round {number} written to {outcome}")
                    on_update(site, outcome)
            if pending:
                time.sleep(POLL_SECONDS)

    def pull_late(self) -> None:
        """Replies to the orders of rounds that closed before they came: written to their own round's folder (the
        next version records them as late) and never merged."""
        if not self.late:
            return
        for reply in self.grid.pull_messages(list(self.late)):
            site, number = self.late.pop(reply.metadata.reply_to_message_id, (None, 0))
            if site is None:
                continue
            outcome = self.receive(site, self.node_of.get(site), reply, number, {})
            if isinstance(outcome, Path):
                self.log(f"{site}: late update for round {number} written to {outcome}; not merged (rounds are "
                         "synchronous)")

    # --- a synchronous round -------------------------------------------------------------------------------

    def sync_round(self) -> str:
        from fedtune.aggregate import aggregate_round
        from fedtune.registry import Registry, round_dir_name
        from fedtune.rounds import open_round
        from fedtune.wire.version import read_version_manifest

        started = time.monotonic()
        call = open_round(self.config, self.settings.registry, self.settings.updates, self.settings.key)
        closes = started + call.deadline if call.deadline is not None else None
        version = Registry(self.settings.registry).latest()
        manifest = read_version_manifest(version, self.config.coordinator_key)
        round_dir = self.settings.updates / round_dir_name(call.number)
        self.emit("round-open", round=call.number, version=manifest["version"], sites=call.sites,
                  deadline=call.deadline)
        nodes = self.wait_for(call.sites)
        # A Flower message outlives its round by a minute, so a reply just past the deadline is still logged.
        ttl = call.deadline + 60.0 if call.deadline is not None else None
        traffic: dict[str, dict[str, int]] = {}
        pending = {}
        for site, node in nodes.items():
            if (round_dir / site).exists():  # a rerun of a round that failed after this site's update came in
                self.log(f"{site}: its update for round {call.number} is in {round_dir / site} already")
                continue
            message_id = self.order(site, node, call.number, version, manifest, ttl, traffic)
            if message_id:
                pending[message_id] = (site, node)
        self.collect(pending, call.number, version, manifest, closes, ttl, traffic)
        for message_id, (site, _node) in pending.items():
            self.log(f"{site}: no update before round {call.number} closed")
            self.late[message_id] = (site, call.number)
        round_dir.mkdir(parents=True, exist_ok=True)
        result = aggregate_round(self.config, self.settings.registry, round_dir, warn=self.log,
                                 key=self.settings.key, config_path=self.settings.config, closed=True)
        made = read_version_manifest(result.folder)
        self.emit("round", round=call.number, version=result.version, adapter_sha256=made["adapter_sha256"],
                  merged=[c["site"] for c in result.contributors],
                  rejected=[{"site": r["site"], "reason": r["reason"]} for r in result.rejected],
                  missing=[s for s in call.sites if not (round_dir / s).is_dir()],
                  seconds=round(time.monotonic() - started, 2), bytes=traffic)
        return result.version
