"""Site-level DP-FedAvg (McMahan et al. 2018): each site's whole delta is clipped to C, the deltas are averaged
with fixed weights 1/n (n: the expected number of sites, q × the roster's size when each round samples sites with
probability q — self-reported sizes would break the sensitivity bound), and the average carries N(0, (zC/n)²)
on every coordinate.

central: the coordinator clips and adds the noise. distributed: each site clips its own delta and adds
N(0, (zC)²/m), m being the quorum, so the sum of any m or more updates carries at least N(0, (zC)²) — with
secure aggregation nobody ever sees a less noisy value; the coordinator only averages.

The noise is drawn from a generator seeded from the operating system's random source; the seed is never
written anywhere, so nobody can subtract the noise again. Every version records what its round spent.
"""

from __future__ import annotations

import secrets

from fedtune.config import FederationConfig, PrivacySettings
from fedtune.errors import BadInput, BudgetSpent
from fedtune.privacy.accountant import epsilon, noise_multiplier


def calibrated(settings: PrivacySettings) -> PrivacySettings:
    """The settings with z filled in from target_epsilon for the planned rounds (init), or checked against it."""
    if settings.mode in ("none", "local"):  # local: each site calibrates its own DP-SGD (privacy.local)
        return settings
    if settings.noise_multiplier is None:
        z = noise_multiplier(settings.target_epsilon, settings.sample_rate, settings.rounds, settings.delta,
                             settings.accountant)
        return settings.model_copy(update={"noise_multiplier": round(z, 6) + 1e-6})
    if settings.target_epsilon is not None:
        spent = epsilon(settings.noise_multiplier, settings.sample_rate, settings.rounds, settings.delta,
                        settings.accountant)
        if spent > settings.target_epsilon:
            raise BadInput(f"privacy: noise_multiplier {settings.noise_multiplier} spends ε {spent:.4f} over "
                           f"{settings.rounds} rounds, past target_epsilon {settings.target_epsilon}; raise it, or "
                           "leave it out for init to calibrate")
    return settings


def version_record(config: FederationConfig, rounds_accounted: int) -> dict:
    """What a global version's manifest says about the privacy spent up to it."""
    settings = config.privacy
    if settings.mode == "none":
        return {"mode": "none"}
    if settings.mode == "local":
        # Each site accounts its own records; the coordinator adds the ε the round's updates report.
        local = settings.local
        return {"mode": "local", "clip_norm": local.example_clip_norm, "noise_multiplier": local.noise_multiplier,
                "delta": local.delta, "accountant": settings.accountant, "rounds_accounted": rounds_accounted,
                "target_epsilon": local.target_epsilon, "site_epsilon": {}, "epsilon": 0.0}
    return {
        "mode": settings.mode, "clip_norm": settings.clip_norm, "noise_multiplier": settings.noise_multiplier,
        "sample_rate": settings.sample_rate, "delta": settings.delta, "accountant": settings.accountant,
        "rounds_accounted": rounds_accounted,
        "epsilon": epsilon(settings.noise_multiplier, settings.sample_rate, rounds_accounted, settings.delta,
                           settings.accountant) if rounds_accounted else 0.0,
        "target_epsilon": settings.target_epsilon,
    }


def next_round(config: FederationConfig, parent: dict, source: str) -> dict:
    """The privacy record of the version the next round makes; BadInput when it would exceed the budget."""
    if config.privacy.mode in ("none", "local"):  # local: each site's ledger holds its budget (privacy.local)
        before = (parent.get("privacy") or {}).get("rounds_accounted") or 0
        return version_record(config, before + 1 if config.privacy.mode == "local" else 0)
    before = (parent.get("privacy") or {}).get("rounds_accounted") or 0
    record = version_record(config, before + 1)
    target = config.privacy.target_epsilon
    if target is not None and record["epsilon"] > target:
        raise BudgetSpent(f"{source}: the privacy budget is spent — round {parent['round'] + 1} would take ε to "
                       f"{record['epsilon']:.4f}, past privacy.target_epsilon {target} (δ {config.privacy.delta}); "
                       f"{parent['version']} stays the federation's last version")
    return record


class GaussianNoise:
    """N(0, std²) noise from a generator seeded by the operating system, its seed never kept."""

    def __init__(self, std: float):
        import torch

        self.std = std
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def add_(self, tensor):
        import torch

        tensor.add_(torch.randn(tensor.shape, generator=self.generator, dtype=torch.float32), alpha=self.std)
        return tensor


def site_noise_std(config: FederationConfig) -> float:
    """The std of the noise each site adds in distributed mode: zC/√m, m the quorum."""
    settings = config.privacy
    return settings.noise_multiplier * settings.clip_norm / config.aggregation.quorum ** 0.5


def privatize_update(config: FederationConfig, delta: dict) -> dict:
    """Distributed DP at the site: clip the whole delta to C, then add this site's share of the noise (in place).
    Returns the update manifest's privacy record."""
    import torch

    settings = config.privacy
    if settings.mode != "distributed":
        return {"mechanism": None}
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())))
    scale = min(1.0, settings.clip_norm / max(norm, 1e-30))
    std = site_noise_std(config)
    noise = GaussianNoise(std)
    for key in sorted(delta):
        delta[key].mul_(scale)
        noise.add_(delta[key])
    return {"mechanism": "distributed", "clip_norm": settings.clip_norm, "noise_std": std}
