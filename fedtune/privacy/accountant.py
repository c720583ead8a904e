"""How much privacy a sampled Gaussian mechanism spends, and how much noise a budget needs.

The mechanism is the one every DP mode of fedtune runs: each step (a round of site-level DP, or a step of
DP-SGD) takes part with Poisson probability q and adds Gaussian noise of z times the clipping norm. Steps
compose; ε at a given δ comes from Google's dp-accounting, either by Rényi DP (RDP, the classic bound) or by
privacy loss distributions (PLD, tighter). fedtune never computes a bound itself.
"""

from __future__ import annotations

from typing import Literal

from fedtune.errors import BadInput

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS = ("rdp", "pld")
# PLD discretization: finer is tighter and slower; 1e-4 keeps a 10,000-step account under a second here.
PLD_INTERVAL = 1e-4


def _check(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not 0 < sample_rate <= 1:
        raise BadInput(f"--sample-rate {sample_rate}: must be in (0, 1] (1 = every site or record every step)")
    if steps < 0:
        raise BadInput(f"--steps {steps}: must be 0 or more")
    if not 0 < delta < 1:
        raise BadInput(f"--delta {delta}: must be in (0, 1), e.g. 1e-5")
    if accountant not in ACCOUNTANTS:
        raise BadInput(f"--accountant {accountant}: choose rdp or pld")


def _event(noise_multiplier: float, sample_rate: float, steps: int):
    from dp_accounting import dp_event

    step = dp_event.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        step = dp_event.PoissonSampledDpEvent(sample_rate, step)
    return dp_event.SelfComposedDpEvent(step, steps)


def _fresh(accountant: str):
    import logging

    # The RDP accountant logs each fractional order it cannot evaluate and leaves out (its bound stays valid).
    logging.getLogger("absl").setLevel(logging.ERROR)
    if accountant == "rdp":
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant()
    from dp_accounting.pld import PLDAccountant

    return PLDAccountant(value_discretization_interval=PLD_INTERVAL)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: Accountant = "rdp") -> float:
    """ε spent by `steps` Poisson-sampled Gaussian steps of noise multiplier z = `noise_multiplier` at `delta`."""
    _check(sample_rate, steps, delta, accountant)
    if noise_multiplier <= 0:
        raise BadInput(f"--noise-multiplier {noise_multiplier}: must be above 0 (without noise ε is infinite)")
    if steps == 0:
        return 0.0
    account = _fresh(accountant)
    account.compose(_event(noise_multiplier, sample_rate, steps))
    return float(account.get_epsilon(delta))


def noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                     accountant: Accountant = "rdp") -> float:
    """The smallest z whose `steps` steps spend at most `target_epsilon` at `delta` (to dp-accounting's tolerance)."""
    _check(sample_rate, steps, delta, accountant)
    if target_epsilon <= 0:
        raise BadInput(f"--target-epsilon {target_epsilon}: must be above 0")
    if steps == 0:
        raise BadInput("--steps 0: nothing is released, so no noise is needed")
    from dp_accounting import mechanism_calibration

    low, high = 1e-3, 1e3
    if accountant == "pld":
        # PLD is tighter than RDP, so it needs no more noise; and a PLD of a tiny z does not fit in memory.
        high = noise_multiplier(target_epsilon, sample_rate, steps, delta, "rdp")
        low = high / 4
    try:
        return float(mechanism_calibration.calibrate_dp_mechanism(
            lambda: _fresh(accountant), lambda z: _event(z, sample_rate, steps), target_epsilon, delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(low, high), discrete=False, tol=1e-4,
        ))
    except (ValueError, MemoryError) as err:  # no z in the bracket meets the target
        raise BadInput(f"--target-epsilon {target_epsilon}: no noise multiplier between {low:.3g} and {high:.3g} "
                       f"meets it with {accountant} ({err}); try the other accountant or another target") from None


def epsilon_of(entries: list[tuple[float, float, int]], delta: float, accountant: Accountant = "rdp") -> float:
    """ε of running every (noise_multiplier, sample_rate, steps) entry one after the other, at `delta`: the entries
    may differ (a site's rounds with another z, or another q after its data changed), so each is composed into one
    accountant rather than multiplied out."""
    runs: dict[tuple[float, float], int] = {}
    for z, q, steps in entries:
        _check(q, steps, delta, accountant)
        if z <= 0:
            raise BadInput(f"--noise-multiplier {z}: must be above 0 (without noise ε is infinite)")
        # Runs with the same z and q are one longer run: composing them at once is exact and much faster (PLD).
        runs[(z, q)] = runs.get((z, q), 0) + steps
    runs = {key: steps for key, steps in runs.items() if steps}
    if not runs:
        return 0.0
    account = _fresh(accountant)
    for (z, q), steps in sorted(runs.items()):
        account.compose(_event(z, q, steps))
    return float(account.get_epsilon(delta))
