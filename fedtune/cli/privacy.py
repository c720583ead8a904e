"""`fedtune privacy epsilon|noise`: the accountant from the command line, to plan a federation's budget."""

from __future__ import annotations

from typing import Annotated

import typer

from fedtune.cli import COORDINATOR_PANEL, JsonOpt, app, out, print_json

privacy_app = typer.Typer(help="Differential privacy budgets: the ε a setting spends, or the noise a budget needs.",
                          no_args_is_help=True)
app.add_typer(privacy_app, name="privacy", rich_help_panel=COORDINATOR_PANEL)

SampleRateOpt = Annotated[float, typer.Option("--sample-rate", help="Poisson probability that a site (or record) "
                                              "takes part in a step: 1 = every one, every step")]
StepsOpt = Annotated[int, typer.Option("--steps", help="steps composed: rounds (site-level DP) or optimizer steps "
                                       "(DP-SGD)")]
DeltaOpt = Annotated[float, typer.Option("--delta", help="δ of the (ε, δ) guarantee, e.g. 1e-5")]
AccountantOpt = Annotated[str, typer.Option("--accountant", help="rdp (Rényi DP) or pld (privacy loss "
                                            "distributions, tighter)")]


@privacy_app.command("epsilon")
def epsilon_cmd(
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", help="z: noise std / clipping norm")],
    sample_rate: SampleRateOpt,
    steps: StepsOpt,
    delta: DeltaOpt,
    accountant: AccountantOpt = "rdp",
    json_out: JsonOpt = False,
) -> None:
    """The ε that STEPS Poisson-sampled Gaussian steps of noise multiplier z spend at δ (dp-accounting)."""
    from fedtune.privacy.accountant import epsilon

    value = epsilon(noise_multiplier, sample_rate, steps, delta, accountant)
    if json_out:
        print_json({"epsilon": value, "accountant": accountant, "noise_multiplier": noise_multiplier,
                    "sample_rate": sample_rate, "steps": steps, "delta": delta})
        return
    out.print(f"ε = {value:.4f} at δ = {delta:g} ({accountant}; z {noise_multiplier:g}, q {sample_rate:g}, "
              f"{steps} steps)")


@privacy_app.command("noise")
def noise_cmd(
    target_epsilon: Annotated[float, typer.Option("--target-epsilon", help="the ε the steps may spend in all")],
    sample_rate: SampleRateOpt,
    steps: StepsOpt,
    delta: DeltaOpt,
    accountant: AccountantOpt = "rdp",
    json_out: JsonOpt = False,
) -> None:
    """The smallest noise multiplier z whose STEPS steps spend at most the target ε at δ."""
    from fedtune.privacy.accountant import epsilon, noise_multiplier

    value = noise_multiplier(target_epsilon, sample_rate, steps, delta, accountant)
    spent = epsilon(value, sample_rate, steps, delta, accountant)
    if json_out:
        print_json({"noise_multiplier": value, "epsilon": spent, "target_epsilon": target_epsilon,
                    "accountant": accountant, "sample_rate": sample_rate, "steps": steps, "delta": delta})
        return
    out.print(f"z = {value:.4f} (spends ε = {spent:.4f} ≤ {target_epsilon:g} at δ = {delta:g}; {accountant}, "
              f"q {sample_rate:g}, {steps} steps)")
