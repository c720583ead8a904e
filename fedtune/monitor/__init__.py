"""Drift and contribution records per round.

The coordinator sees each site's update and its manifest only, never its data. From them it records, per round and
site, in the signed version manifest:

- contributions: the leave-one-out (LOO) change of the merged delta Δ, from the K×K Gram matrix of the deltas
  (for Δ = Σ c_j δ_j and Δ₋ₖ = Σ c'_j δ_j, every inner product is cᵀGc'): cos(Δ, Δ₋ₖ), ‖Δ − Δ₋ₖ‖ and that over ‖Δ‖;
- update drift: the update's norm as a z-score against the site's own earlier norms, its cosine to the round's
  merged delta and to the site's previous update (when that update's folder is still beside this round's), and
  its highest cosine to another site's update (two near-identical updates: a Sybil pair, or one site's data twice);
- data drift: the summary of its data card the site sent (`data_profile`) against the first one it sent, as
  population stability index (PSI) and Jensen–Shannon distance;
- quality drift: the parent version's eval loss on the site's eval split, when sites report it (`monitor.report_eval`).

Thresholds (federation.yaml `monitor:`) turn these into alerts; `aggregate --hold-on-alert` holds a version with
alerts out of LATEST until `fedtune promote`.
"""

from fedtune.monitor.contributions import (
    contribution_totals,
    cosines,
    loo_candidate_losses,
    loo_coefficients,
    loo_eval_records,
    loo_records,
    snapshot_registry,
)
from fedtune.monitor.drift import (
    data_profile,
    js_distance,
    norm_z,
    parent_eval,
    previous_cosine,
    profile_drift,
    psi,
    site_fields,
)
from fedtune.monitor.rounds import History, lineage_history, monitor_round

__all__ = ["History", "contribution_totals", "cosines", "data_profile", "js_distance", "lineage_history",
           "loo_candidate_losses", "loo_coefficients", "loo_eval_records", "loo_records", "monitor_round", "norm_z",
           "parent_eval", "previous_cosine", "profile_drift", "psi", "site_fields", "snapshot_registry"]
