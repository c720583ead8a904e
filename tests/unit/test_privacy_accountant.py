"""The accountant: ε and calibrated noise of Poisson-sampled Gaussian steps, as Google's dp-accounting gives them,
and `fedtune privacy epsilon|noise` on the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dp_accounting import dp_event, pld, rdp

from conftest import run_cli
from fedtune.errors import BadInput
from fedtune.privacy.accountant import epsilon, noise_multiplier

# ../shared/ALGORITHMS.md's reference values (δ = 1e-5): z, q, T → RDP ε, PLD ε.
REFERENCE = [((1.0, 0.01, 1000), 2.1014, 1.8282), ((1.1, 0.01, 10000), 5.6320, 5.1926), ((1.0, 1.0, 50), 57.3017, 54.3766)]


@pytest.mark.parametrize("setting,rdp_eps,pld_eps", REFERENCE)
def test_reference_values(setting, rdp_eps, pld_eps):
    z, q, steps = setting
    assert epsilon(z, q, steps, 1e-5, "rdp") == pytest.approx(rdp_eps, abs=5e-5)
    assert epsilon(z, q, steps, 1e-5, "pld") == pytest.approx(pld_eps, abs=5e-5)


@pytest.mark.parametrize("z,q,steps,delta", [(0.8, 0.05, 200, 1e-5), (2.0, 1.0, 10, 1e-6), (1.3, 0.5, 30, 1e-5),
                                             (5.0, 0.001, 100000, 1e-7)])
def test_equals_dp_accounting_composed_by_hand(z, q, steps, delta):
    """Against the library driven directly, always through PoissonSampledDpEvent (q = 1 included)."""
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    by_rdp = rdp.RdpAccountant()
    by_rdp.compose(event)
    by_pld = pld.PLDAccountant(value_discretization_interval=1e-4)
    by_pld.compose(event)
    assert epsilon(z, q, steps, delta, "rdp") == pytest.approx(by_rdp.get_epsilon(delta), rel=1e-9)
    assert epsilon(z, q, steps, delta, "pld") == pytest.approx(by_pld.get_epsilon(delta), rel=1e-3)


@pytest.mark.parametrize("target,q,steps,accountant", [(8.0, 1.0, 10, "rdp"), (1.0, 1.0, 10, "rdp"),
                                                       (8.0, 0.5, 20, "pld"), (2.0, 0.01, 1000, "rdp")])
def test_calibration_round_trips(target, q, steps, accountant):
    z = noise_multiplier(target, q, steps, 1e-5, accountant)
    spent = epsilon(z, q, steps, 1e-5, accountant)
    assert spent <= target and spent >= 0.99 * target
    assert epsilon(z * 0.98, q, steps, 1e-5, accountant) > target  # less noise would overspend: z is the smallest


def test_more_steps_or_less_noise_spend_more():
    assert epsilon(1.0, 0.1, 200, 1e-5) > epsilon(1.0, 0.1, 100, 1e-5) > epsilon(2.0, 0.1, 100, 1e-5)
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("kwargs,problem", [
    ({"noise_multiplier": 0.0}, "--noise-multiplier 0.0: must be above 0"),
    ({"sample_rate": 0.0}, "--sample-rate 0.0: must be in (0, 1]"),
    ({"sample_rate": 1.5}, "--sample-rate 1.5"),
    ({"delta": 1.0}, "--delta 1.0: must be in (0, 1)"),
    ({"steps": -1}, "--steps -1"),
    ({"accountant": "moments"}, "--accountant moments: choose rdp or pld"),
])
def test_bad_settings_are_one_line(kwargs, problem):
    settings = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5, "accountant": "rdp", **kwargs}
    with pytest.raises(BadInput) as info:
        epsilon(**settings)
    assert str(info.value).startswith(problem)


def test_cli_epsilon_and_noise(capsys):
    code, out, _ = run_cli(["privacy", "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01", "--steps",
                            "10000", "--delta", "1e-5", "--accountant", "pld", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["accountant"] == "pld" and result["epsilon"] == pytest.approx(5.1926, abs=5e-5)
    code, out, _ = run_cli(["privacy", "noise", "--target-epsilon", "8", "--sample-rate", "1", "--steps", "10",
                            "--delta", "1e-5", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["epsilon"] <= 8 and epsilon(result["noise_multiplier"], 1.0, 10, 1e-5) == pytest.approx(result["epsilon"])
    code, out, _ = run_cli(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "1", "--steps", "50",
                            "--delta", "1e-5"], capsys)
    assert code == 0 and out.startswith("ε = 57.3017 at δ = 1e-05 (rdp")
    code, _, err = run_cli(["privacy", "noise", "--target-epsilon", "-1", "--sample-rate", "1", "--steps", "10",
                            "--delta", "1e-5"], capsys)
    assert code == 2 and err.strip() == "error: --target-epsilon -1.0: must be above 0"


def test_privacy_help_imports_neither_torch_nor_the_accountant():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedtune.cli", "privacy", "epsilon", "--help"],
                            capture_output=True, text=True, check=True)
    imported = result.stderr
    assert "--noise-multiplier" in result.stdout
    assert " torch" not in imported and "dp_accounting" not in imported
