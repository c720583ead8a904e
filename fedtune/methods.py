"""The aggregation methods by name: where each is implemented, what it does in one line, and which need only
a fixed-weight sum. Plain data below the federation schema, so that federation.yaml is checked against it
without importing the aggregation stage (or torch)."""

from __future__ import annotations

# name → (module, class, one line for --help); the modules are imported when a method is used.
METHODS: dict[str, tuple[str, str, str]] = {
    "fedavg": ("mean", "FedAvg",
               "weighted mean of A and of B separately (what most tools do; inexact, the error is recorded)"),
    "ffa": ("mean", "FFA",
               "A frozen at the seeded init, sites train B only; B ← Σp_k B_k (exact, half the traffic)"),
    "svd": ("lora", "Svd",
               "exact weighted mean of the products B·A, re-factored to the federation's rank (best rank-r fit)"),
    "stack": ("lora", "Stack",
               "FLoRA stacking: exact mean of the products, the version's rank grows to the sum of the sites' ranks"),
    "trimmed-mean": ("robust", "TrimmedMean",
               "coordinate-wise mean after dropping the ⌊trim·K⌋ largest and smallest values (unweighted)"),
    "weighted-trimmed-mean": ("robust", "WeightedTrimmedMean",
               "coordinate-wise weighted mean after removing trim of the weight mass from each tail"),
    "median": ("robust", "Median",
               "coordinate-wise median (mean of the two middle values when K is even; unweighted)"),
    "krum": ("distance", "Krum",
               "the one update with the smallest sum of squared distances to its n−f−2 nearest others (f = byzantine)"),
    "multi-krum": ("distance", "MultiKrum",
               "weighted mean of the keep (default n−f) updates with the best Krum scores"),
    "geomedian": ("distance", "GeoMedian",
               "weighted geometric median of the whole updates (smoothed Weiszfeld, RFA)"),
    "centered-clip": ("distance", "CenteredClip",
               "centered clipping from the parent: v ← v + mean_i clip_τ(δ_i − v), τ = radius or the median update norm"),
    "ties": ("merging", "Ties",
               "TIES merging: keep the top density of each delta by magnitude, elect signs, average the agreeing entries"),
    "dare": ("merging", "Dare",
               "DARE: random drop (keep density, rescale 1/density) then weighted sum; seeded per key"),
    "dare-ties": ("merging", "DareTies",
               "DARE random drop and rescale, then TIES sign election and disjoint merge; seeded per key"),
}

# The methods whose result needs only Σ w_k δ_k with weights fixed in advance (their classes declare
# `sum_only`; tests/unit/test_config.py checks the two agree): the only ones differential privacy and secure
# aggregation can run.
SUM_ONLY = ("fedavg", "ffa")

# The methods that write new factors from the products B·A (their classes declare `refactors`): a version's
# factors share no basis with its parent's, so neither a server optimizer nor a stale update applies to them.
REFACTORING = ("svd", "stack")
