"""Asynchronous live rounds (aggregation.async, FedBuff): every called site is kept busy, and a version is made
each time K updates wait in the buffer, whatever version each started from.

A site that is idle gets a train message with the current version, unless it already trained from that one (it
would only send the same round twice). Each reply goes into its parent's round folder, updates/round-(M)/ for
an update trained from version M−1, as the file transport lays it out; `aggregate_round` then merges the K
oldest updates not merged yet, each scaled by its staleness, and the sites that are idle get the new version.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedtune.errors import BadInput, Waiting

if TYPE_CHECKING:
    from fedtune.live.server import Coordinator


def run_buffered(coord: Coordinator) -> list[str]:
    """Make coord.settings.rounds versions; returns their names."""
    from fedtune.aggregate import aggregate_round
    from fedtune.live import records
    from fedtune.live.server import POLL_SECONDS
    from fedtune.registry import Registry, round_dir_name
    from fedtune.rounds import open_round
    from fedtune.wire.version import read_version_manifest

    config, settings = coord.config, coord.settings
    buffer = config.aggregation.asynchronous.buffer
    registry = Registry(settings.registry)
    made: list[str] = []
    busy: dict[str, tuple[str, int, int]] = {}  # message id → (site, node, round it trains for)
    trained_from: dict[str, str] = {}  # site → the version it was last sent
    resent: set[tuple[str, int]] = set()
    waiting = 0  # updates written and not merged yet
    traffic: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    called: list[str] | None = None
    while len(made) < settings.rounds:
        version = registry.latest()
        manifest = read_version_manifest(version, config.coordinator_key)
        number = manifest["round"] + 1
        if called is None or called[0] != manifest["version"]:
            call = open_round(config, settings.registry, settings.updates, settings.key)
            coord.emit("round-open", round=call.number, version=manifest["version"], sites=call.sites,
                       deadline=None, buffer=buffer)
            nodes = coord.wait_for(call.sites) if called is None else None
            called = [manifest["version"], *call.sites]
        if nodes is None:
            coord.refresh_nodes()
        in_flight = {site for site, _node, _round in busy.values()}
        for site in called[1:]:
            node = coord.node_of.get(site)
            if node is None or site in in_flight or trained_from.get(site) == manifest["version"]:
                continue
            if (settings.updates / round_dir_name(number) / site).exists():
                trained_from[site] = manifest["version"]  # a rerun: this site's update for the round is in
                continue
            message_id = coord.order(site, node, number, version, manifest, None, traffic)
            if message_id:
                busy[message_id] = (site, node, number)
                trained_from[site] = manifest["version"]
        nodes = None
        for reply in coord.grid.pull_messages(list(busy)) if busy else []:
            site, node, sent_for = busy.pop(reply.metadata.reply_to_message_id, (None, None, 0))
            if site is None:
                continue
            outcome = coord.receive(site, node, reply, sent_for, traffic)
            if isinstance(outcome, records.Refusal):
                if outcome.kind == records.NEEDS_VERSION and (site, sent_for) not in resent:
                    resent.add((site, sent_for))
                    parent = registry.path_of(f"v{sent_for - 1:04d}")
                    message_id = coord.order(site, node, sent_for, parent,
                                             read_version_manifest(parent, config.coordinator_key), None, traffic,
                                             force_files=True)
                    if message_id:
                        busy[message_id] = (site, node, sent_for)
                else:
                    coord.log(f"{site}: refused round {sent_for}: {outcome.message}")
            elif outcome is not None:
                waiting += 1
                coord.log(f"{site}: update trained from v{sent_for - 1:04d} written to {outcome} ({waiting} of "
                          f"{buffer} buffered)")
        if waiting >= buffer:
            round_dir = settings.updates / round_dir_name(number)
            try:
                result = aggregate_round(config, settings.registry, round_dir, warn=coord.log, key=settings.key,
                                         config_path=settings.config, closed=True)
            except Waiting as wait:  # some of the buffered updates were rejected; wait for more
                coord.log(str(wait))
                waiting = buffer - 1
            else:
                waiting -= len(result.contributors)
                made.append(result.version)
                merged = read_version_manifest(result.folder)
                coord.emit("round", round=number, version=result.version, adapter_sha256=merged["adapter_sha256"],
                           merged=[c["site"] for c in result.contributors],
                           staleness={c["site"]: c.get("staleness") for c in result.contributors},
                           rejected=[{"site": r["site"], "reason": r["reason"]} for r in result.rejected],
                           missing=[], seconds=round(time.monotonic() - started, 2), bytes=traffic)
                traffic, started = {}, time.monotonic()
                continue
        if not busy and all(trained_from.get(site) == manifest["version"] or site not in coord.node_of
                            for site in called[1:]) and waiting < buffer:
            raise BadInput(f"aggregation.async.buffer {buffer}: the {len(called) - 1} called site(s) have each sent "
                           f"their update from {manifest['version']} and {waiting} wait in the buffer; a version "
                           "needs more than they can send (lower the buffer, or call more sites)")
        time.sleep(POLL_SECONDS)
    return made
