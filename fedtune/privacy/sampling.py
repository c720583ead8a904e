"""Poisson sampling of sites under central DP (privacy.sample_rate q < 1): every round each site is called with
probability q, independently, drawn from the operating system's random source by the coordinator and signed
into the round's folder before anyone trains. The accountant's amplification by sampling holds only for a
draw nobody can predict or redo, so a round is drawn once, and the released average divides by the expected
number of sites q·n, whoever answered — even none."""

from __future__ import annotations

import secrets
from pathlib import Path

from fedtune.artifacts import read_json
from fedtune.config import FederationConfig
from fedtune.errors import BadInput
from fedtune.registry import Registry, coordinator_signer, round_dir_name
from fedtune.wire.sample import write_sample


def sampling(config: FederationConfig) -> bool:
    """Whether this federation's rounds take a random sample of sites."""
    return config.privacy.mode == "central" and config.privacy.sample_rate < 1


def expected_sites(config: FederationConfig) -> float:
    """The fixed denominator of a DP round: q·n, the expected number of sites a round calls."""
    return config.privacy.sample_rate * len(config.sites) if config.privacy.mode == "central" else len(config.sites)


def draw_sample(config: FederationConfig, registry_root: Path, updates: Path, key_path: Path | None = None) -> dict:
    """Draw the next round's sites and write the signed sample into updates/round-NNNN/; returns the sample."""
    import datetime

    if not sampling(config):
        raise BadInput("sample: privacy.sample_rate is 1 (or the mode is not central): every site takes part in "
                       "every round, so there is nothing to draw")
    registry = Registry(registry_root)
    parent = read_json(registry.latest() / "manifest.json")
    number = parent["round"] + 1
    signer = coordinator_signer(config, registry.root, key_path)
    draw = secrets.SystemRandom()
    sites = [site.name for site in config.sites if draw.random() < config.privacy.sample_rate]
    from fedtune.rounds import sample_fields

    fields = sample_fields(config, parent, sites, config.privacy.sample_rate,
                           datetime.datetime.now(datetime.timezone.utc))
    write_sample(updates / round_dir_name(number), fields, signer)
    return fields


def round_sample(config: FederationConfig, round_dir: Path, parent: dict) -> set[str] | None:
    """The sites called for the round after `parent` (None when the federation calls every site). BadInput when
    the round's folder holds no sample the draw needs, or one for another round or parent (rounds.called_sites)."""
    if not (sampling(config) or config.rounds.samples()):
        return None
    from fedtune.rounds import called_sites

    return set(called_sites(config, round_dir, parent).sites)
