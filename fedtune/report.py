"""Run reports: report.json, a PNG of eval loss per site by round, and a printable table."""

from __future__ import annotations

import io
from pathlib import Path

from fedtune.artifacts import write_bytes_atomic, write_json_atomic


def write_report(folder: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.png into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path, png_path = folder / "report.json", folder / "report.png"
    write_json_atomic(json_path, report)
    sites = list(report["base"])
    rounds = list(range(len(report["rounds"]) + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for site in sites:
        losses = [report["base"][site]] + [r["eval"][site] for r in report["rounds"]]
        ax.plot(rounds, losses, marker="o", label=site)
    ax.set_xticks(rounds, ["base"] + [r["version"] for r in report["rounds"]])
    ax.set_xlabel("global version (round)")
    ax.set_ylabel("eval loss (token-weighted)")
    ax.set_title(report.get("name", "federation"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    spent = [r.get("epsilon") for r in report["rounds"]]
    if spent and all(e is not None for e in spent):
        # Under differential privacy, the ε spent up to each version beside the loss it bought.
        budget = ax.twinx()
        budget.plot(rounds, [0.0] + spent, color="black", linestyle="--", marker="s", label="ε spent")
        budget.set_ylabel("ε spent (δ as in federation.yaml)")
        budget.legend(loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(png_path, buffer.getvalue())
    return json_path, png_path


def report_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per version, the base first, then any baselines) of eval loss per site.

    A baseline row leaves a site blank ("-") where it has no value, e.g. `local` for an attacker.
    """
    sites = list(report["base"])
    rows = [["base"] + [f"{report['base'][s]:.4f}" for s in sites]]
    private = bool(report["rounds"]) and all("epsilon" in r for r in report["rounds"])
    rows += [[r["version"]] + [f"{r['eval'][s]:.4f}" for s in sites] + ([f"{r['epsilon']:.3f}"] if private else [])
             for r in report["rounds"]]
    if private:
        rows[0].append("0")
    for kind, losses in report.get("baselines", {}).items():
        rows.append([kind] + [f"{losses[s]:.4f}" if s in losses else "-" for s in sites] + (["-"] if private else []))
    return ["version", *sites] + (["ε"] if private else []), rows
