"""Live federations over Flower: the same stages and bytes as the file transport, carried by Flower messages.

A ServerApp (`fedtune.live.server`) runs the coordinator's rounds: it sends each called site the global version,
writes each site's reply into the same `updates/round-NNNN/<site>/` folder the file transport uses, and calls the
same aggregation stage. A ClientApp (`fedtune.live.client`) runs a site's compute step on a train message and replies
with the bytes of its update folder. `records` defines what crosses the wire, once; `processes` starts and stops the
Flower processes the `serve` and `join` commands run; `tls` makes a local CA for the SuperLink.

Nothing here imports flwr at module level except the Flower App modules (server, client, records), so the CLI can
check a federation's inputs before any Flower process starts.
"""

from __future__ import annotations

import importlib.util
import json

from fedtune.errors import BadInput

# The ServerApp writes one line per event to its output, which `flwr run --stream` relays to `fedtune serve`.
EVENT_PREFIX = "fedtune-live-event "


def require_flower() -> None:
    """Refuse at once, in one line, when Flower is not installed."""
    if importlib.util.find_spec("flwr") is None:
        raise BadInput('the live transport needs Flower, which is not installed; pip install "fedtune[flower]"')


def event_line(event: str, **fields) -> str:
    return EVENT_PREFIX + json.dumps({"event": event, **fields})


def parse_event(line: str) -> dict | None:
    """The event a ServerApp output line carries, or None for any other line (Flower's own log)."""
    start = line.find(EVENT_PREFIX)
    if start < 0:
        return None
    try:
        value = json.loads(line[start + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("event"), str) else None
