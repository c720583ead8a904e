"""Which updates a round takes: the called sites and the deadline (synchronous rounds), or the buffer of
updates from any recent version (asynchronous rounds, FedBuff).

Synchronous: a round merges updates trained from the current version. With a deadline it waits (exit 3) while a
called site has not sent; once every called site has sent, or the deadline has passed, it closes with what
arrived. An update a site sends for a round after it closed is late: the next version records it as rejected.

Asynchronous (aggregation.async): an update trained from version M−1 lives in updates/round-M/ whenever it
arrives. Each version merges the K oldest updates not merged yet from any round folder, each scaled by
s(τ) = (1 + τ)^−a for its staleness τ = (this round) − M; the rest stay buffered for the next version.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

from fedtune.aggregate.validate import RoundChecks, Update, collect_round
from fedtune.config import AsyncSettings, FederationConfig
from fedtune.errors import BadInput, Waiting
from fedtune.registry import ROUND_DIR_RE as ROUND_RE, Registry, round_dir_name, version_name
from fedtune.rounds import Called, called_sites, closing_time
from fedtune.wire.secagg import RESPONSES_DIR
from fedtune.wire.version import read_version_manifest


@dataclass
class RoundClose:
    """Who a synchronous round called and how it closed: the version's `participation` record."""

    called: Called
    sent: list[str]
    closes_at: datetime.datetime | None
    closed: str  # all-sent | deadline | on-demand

    def record(self) -> dict:
        return {"called": self.called.sites, "sent": self.sent,
                "missing": [s for s in self.called.sites if s not in self.sent], "draw": self.called.draw,
                "seed": self.called.seed, "deadline": self.closes_at.isoformat() if self.closes_at else None,
                "closed": self.closed}


def sent_sites(round_dir: Path) -> list[str]:
    """The update folders a round folder holds (whatever their contents: validation judges those)."""
    return sorted(entry.name for entry in round_dir.iterdir()
                  if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".")
                  and entry.name != RESPONSES_DIR)


def close_round(config: FederationConfig, round_dir: Path, parent: dict, *, closed: bool = False,
                deadline: str | None = None, now: datetime.datetime | None = None) -> RoundClose:
    """Close a synchronous round, or raise Waiting while its deadline has not passed and a called site has not
    sent. `closed`: the caller's wait is over (a live round's deadline, or every reply is in)."""
    called = called_sites(config, round_dir, parent)
    closes_at = closing_time(config, round_dir, parent, called, deadline)
    sent = [site for site in sent_sites(round_dir) if site in called.sites]
    missing = [site for site in called.sites if site not in sent]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not missing:
        return RoundClose(called, sent, closes_at, "all-sent")
    if closes_at is not None and now >= closes_at:
        return RoundClose(called, sent, closes_at, "deadline")
    if closes_at is not None and not closed:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise Waiting(f"{round_dir}: {len(sent)} of {len(called.sites)} called site(s) have sent; waiting for "
                      f"{shown} until the round closes at {closes_at.isoformat()} (run aggregate again then, or "
                      "once they have sent)")
    return RoundClose(called, sent, closes_at, "on-demand")


def late_updates(round_dir: Path, checks: RoundChecks, registry: Registry) -> list[dict]:
    """The updates sent for the previous round after it closed (synchronous rounds do not merge them): one
    rejected record each, in the first version after it."""
    number = checks.number
    previous = round_dir.parent / round_dir_name(number - 1)
    if number < 2 or not previous.is_dir() or not ROUND_RE.match(round_dir.name):
        return []
    older = _checks_for(checks, registry, number - 1, checks.work / "late")
    valid, _rejected, _ = collect_round(previous, older)
    return [{"site": f"{previous.name}/{u.site}",
             "reason": f"late: sent for round {number - 1} after it closed; synchronous rounds merge only updates "
                       f"from the current version (aggregation.async merges late updates, scaled by staleness)"}
            for u in valid]


@dataclass
class Buffered:
    """An update waiting in the asynchronous buffer, and how stale it is."""

    update: Update
    round: int  # the round it was sent for (its parent is version round − 1)
    staleness: int


def collect_buffer(round_dir: Path, checks: RoundChecks, registry: Registry, settings: AsyncSettings,
                   warn) -> tuple[list[Buffered], list[dict], list[dict]]:
    """The K oldest updates not merged yet, from this round's folder and every earlier one; (buffer, rejected in
    this round's folder, equivocations). Problems in earlier folders are warned about, not recorded again."""
    number = checks.number
    pending: list[Buffered] = []
    rejected: list[dict] = []
    equivocations: list[dict] = []
    seen: set[str] = set()
    for folder, round_number in _round_folders(round_dir.parent, number):
        staleness = number - round_number
        if round_number == number:
            valid, problems, events = collect_round(folder, checks)
            rejected += problems
            equivocations += events
        else:
            older = _checks_for(checks, registry, round_number, checks.work / folder.name)
            valid, problems, _ = collect_round(folder, older)
            for item in problems:
                if not item["reason"].startswith("replayed: its nonce belongs"):  # merged in an earlier version
                    warn(f"warning: {folder / item['site']}: not buffered: {item['reason']}")
        for update in valid:
            if update.nonce in seen:
                continue
            seen.add(update.nonce)
            if settings.max_staleness is not None and staleness > settings.max_staleness:
                reason = (f"stale: trained from {version_name(round_number - 1)}, {staleness} versions behind, beyond "
                          f"aggregation.async.max_staleness {settings.max_staleness}")
                if round_number == number - settings.max_staleness - 1:  # recorded once, when it becomes too old
                    rejected.append({"site": f"{folder.name}/{update.site}", "reason": reason})
                continue
            pending.append(Buffered(update, round_number, staleness))
    pending.sort(key=lambda b: (b.round, b.update.site))
    buffer, rest = pending[: settings.buffer], pending[settings.buffer:]
    if len(buffer) < settings.buffer:
        raise Waiting(f"{round_dir}: the buffer holds {len(buffer)} of {settings.buffer} updates "
                      "(aggregation.async.buffer); run aggregate again when more have arrived")
    for item in rest:
        warn(f"{round_dir.parent / round_dir_name(item.round) / item.update.site}: stays buffered for a later version")
    return buffer, rejected, equivocations


def _round_folders(updates_root: Path, number: int) -> list[tuple[Path, int]]:
    """updates/round-M for every M ≤ number that exists, oldest first."""
    folders = []
    for entry in updates_root.iterdir():
        match = ROUND_RE.match(entry.name)
        if match and entry.is_dir() and int(match.group(1)) <= number:
            folders.append((entry, int(match.group(1))))
    return sorted(folders, key=lambda item: item[1])


def _checks_for(checks: RoundChecks, registry: Registry, round_number: int, work: Path) -> RoundChecks:
    """The checks of an earlier round: its updates start from version round − 1 (as signed in the registry)."""
    folder = registry.path_of(version_name(round_number - 1))
    if not (folder / "manifest.json").is_file():
        raise BadInput(f"{folder}: missing from the registry; it is the parent of the updates in "
                       f"{round_dir_name(round_number)}")
    parent = read_version_manifest(folder, checks.config.coordinator_key)
    work.mkdir(exist_ok=True)
    return dataclasses.replace(checks, parent=parent, work=work)
