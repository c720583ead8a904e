"""Who a round calls and when it closes: the same rules for every transport.

A round calls every site on the roster, or a seeded sample of them (rounds.sample_rate / sites_per_round): k sites
drawn with a seed made from the federation's name and seed, the round and its parent version, so anyone can redo
the draw and a live round calls the same sites as a file round. Under privacy.sample_rate the draw is instead the
coordinator's unpredictable Poisson draw (privacy.sampling). Either way the draw can be signed into the round's
folder (sample.json), and the version records it.

A round with rounds.deadline stays open for that many seconds from its opening (its sample's `created`, else its
parent version's): before then `aggregate` waits while a called site has not sent; after it the round closes with
what arrived, if that meets the quorum.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from fedtune.artifacts import read_json
from fedtune.config import FederationConfig
from fedtune.errors import BadInput
from fedtune.registry import Registry, coordinator_signer, round_dir_name
from fedtune.wire.codec import canonical_json
from fedtune.wire.sample import SAMPLE_FILE, SAMPLE_FORMAT, read_sample, write_sample


@dataclass
class RoundCall:
    """A round as it is opened: the sites it calls and how long it stays open."""

    number: int
    sites: list[str]
    deadline: float | None  # seconds from now until the round closes; None: no deadline
    draw: str  # "all", "seeded" or "poisson"
    seed: str | None = None
    closes_at: str | None = None  # ISO time, when there is a deadline


def seeded_draw(config: FederationConfig, parent: dict) -> tuple[list[str], str]:
    """The sites rounds.sample_rate / sites_per_round calls for the round after `parent`, and the draw's seed."""
    number = parent["round"] + 1
    seed = hashlib.sha256(canonical_json({
        "draw": "fedtune.rounds/1", "federation": config.name, "seed": config.seed, "round": number,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
    })).hexdigest()
    roster = sorted(config.site_names())
    count = config.rounds.called_count(len(roster), config.aggregation.quorum)
    return sorted(random.Random(int(seed, 16)).sample(roster, count)), seed


def _privacy_sampling(config: FederationConfig) -> bool:
    return config.privacy.mode == "central" and config.privacy.sample_rate < 1


@dataclass
class Called:
    """Who a round called, as the coordinator and every site can establish it."""

    sites: list[str]
    draw: str
    seed: str | None
    opened: datetime.datetime | None  # the sample's signing time, when the round has a sample


def called_sites(config: FederationConfig, round_dir: Path, parent: dict) -> Called:
    """The sites the round after `parent` calls. BadInput when a sample the federation needs is missing, or the
    round folder's sample is for another round, or disagrees with the seeded draw."""
    sample = read_sample(round_dir, config.coordinator_key)
    if sample is not None:
        _check_sample_round(sample, round_dir, parent)
    if _privacy_sampling(config):
        if sample is None:
            raise BadInput(f"{round_dir / SAMPLE_FILE}: not found; under privacy.sample_rate "
                           f"{config.privacy.sample_rate} the coordinator draws each round's sites first "
                           "(`fedtune sample`)")
        return Called(sorted(sample["sites"]), "poisson", None, _parse_time(sample["created"], round_dir / SAMPLE_FILE))
    if config.rounds.samples():
        sites, seed = seeded_draw(config, parent)
        if sample is not None and (sample["draw"] != "seeded" or sample["seed"] != seed or sample["sites"] != sites):
            raise BadInput(f"{round_dir / SAMPLE_FILE}: does not hold the seeded draw of rounds.sample_rate / "
                           f"sites_per_round ({', '.join(sites)}); it was written under other settings — remove it "
                           "and open the round again with `fedtune sample`")
        draw = ("seeded", seed)
    else:
        sites = sorted(config.site_names())
        if sample is not None and sorted(sample["sites"]) != sites:
            raise BadInput(f"{round_dir / SAMPLE_FILE}: calls {', '.join(sample['sites']) or 'no site'}, but this "
                           "federation calls every site each round; remove it and open the round again")
        draw = ("all", None)
    opened = _parse_time(sample["created"], round_dir / SAMPLE_FILE) if sample is not None else None
    return Called(sites, *draw, opened)


def open_round(config: FederationConfig, registry_root: Path, updates_root: Path,
               key_path: Path | None = None, *, reopen: bool = True) -> RoundCall:
    """Open the next round: draw who it calls and, when the federation samples or has a deadline, sign that into
    updates/round-NNNN/sample.json. A round already opened keeps its sample (with `reopen` False: BadInput).
    Returns the round's call."""
    from fedtune.privacy.sampling import draw_sample

    registry = Registry(registry_root)
    parent = read_json(registry.latest() / "manifest.json")
    number = parent["round"] + 1
    round_dir = updates_root / round_dir_name(number)
    if not reopen and (round_dir / SAMPLE_FILE).exists():
        raise BadInput(f"{round_dir / SAMPLE_FILE}: round {number}'s sample is already drawn; a round is drawn once")
    if _privacy_sampling(config) and read_sample(round_dir, config.coordinator_key) is None:
        draw_sample(config, registry.root, updates_root, key_path)
    elif (config.rounds.samples() or config.rounds.deadline is not None) \
            and read_sample(round_dir, config.coordinator_key) is None:
        sites, seed = seeded_draw(config, parent) if config.rounds.samples() else (sorted(config.site_names()), None)
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        deadline = (now + datetime.timedelta(seconds=config.rounds.deadline)).isoformat() \
            if config.rounds.deadline is not None else None
        # draw all: every site is called, and the file fixes the round's opening time for its deadline
        fields = sample_fields(config, parent, sites, len(sites) / len(config.sites), now,
                               draw="seeded" if seed else "all", seed=seed, deadline=deadline)
        write_sample(round_dir, fields, coordinator_signer(config, registry.root, key_path))
    called = called_sites(config, round_dir, parent)
    closes = closing_time(config, round_dir, parent, called)
    left = None
    if closes is not None:
        left = max(0.0, (closes - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
    return RoundCall(number, called.sites, left, called.draw, called.seed,
                     closes.isoformat() if closes is not None else None)


def sample_fields(config: FederationConfig, parent: dict, sites: list[str], sample_rate: float,
                  created: datetime.datetime, **draw) -> dict:
    """The fields of the round-after-`parent`'s sample.json (`draw`: draw, seed, deadline for a seeded draw)."""
    return {
        "format": SAMPLE_FORMAT, "federation": config.name, "round": parent["round"] + 1,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
        "sample_rate": sample_rate, "roster": len(config.sites), "sites": sites,
        "created": created.isoformat(timespec="seconds"), **draw,
    }


DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_deadline(text: str, opened: datetime.datetime) -> datetime.datetime:
    """`aggregate --deadline`: a duration from the round's opening (600, 90s, 30m, 2h, 1d), an ISO time
    (2026-12-01T12:00:00+00:00), or `now`."""
    text = text.strip()
    if text == "now":
        return datetime.datetime.now(datetime.timezone.utc)
    match = DURATION_RE.match(text)
    if match:
        return opened + datetime.timedelta(seconds=float(match.group(1)) * UNITS[match.group(2) or "s"])
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--deadline {text}: give a duration from the round's opening (600, 30m, 2h), an ISO time "
                       "with its zone (2026-12-01T12:00:00+00:00), or now") from None
    if when.tzinfo is None:
        raise BadInput(f"--deadline {text}: give the time zone (e.g. +00:00), so every party reads the same instant")
    return when


def opening_time(round_dir: Path, parent: dict, called: Called) -> datetime.datetime:
    """When the round opened: its sample's signing time, else its parent version's creation."""
    if called.opened is not None:
        return called.opened
    return _parse_time(parent["created"], Path(parent["version"]) / "manifest.json")


def closing_time(config: FederationConfig, round_dir: Path, parent: dict, called: Called,
                 override: str | None = None) -> datetime.datetime | None:
    """When the round closes: `override` (aggregate --deadline), else rounds.deadline after its opening; None
    when it has no deadline."""
    opened = opening_time(round_dir, parent, called)
    if override is not None:
        return parse_deadline(override, opened)
    if config.rounds.deadline is None:
        return None
    return opened + datetime.timedelta(seconds=config.rounds.deadline)


def _check_sample_round(sample: dict, round_dir: Path, parent: dict) -> None:
    number = parent["round"] + 1
    if sample["round"] != number or sample["parent"]["version"] != parent["version"] \
            or sample["parent"]["sha256"] != parent["adapter_sha256"]:
        raise BadInput(f"{round_dir / SAMPLE_FILE}: drawn for round {sample['round']} after "
                       f"{sample['parent']['version']}, not round {number} after {parent['version']}")


def _parse_time(text: str, source: Path) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"{source}: its time {text!r} is not an ISO time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)
