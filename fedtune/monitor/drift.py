"""Data drift: what a site sends about its data (a profile of its data card: counts only) and how far a profile
moved from the site's first one (population stability index, Jensen–Shannon distance); and what train-local adds to
an update manifest for monitoring (the profile, and with monitor.report_eval the parent version's eval loss)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Probabilities below this are raised to it before PSI's logarithm: an empty bin on one side only would be infinite.
PSI_FLOOR = 1e-4


# --- distances between distributions ---------------------------------------------------------------------------


def _aligned(expected: dict[str, float], actual: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Two count maps as probability vectors over the union of their bins (a missing bin counts 0)."""
    bins = sorted(set(expected) | set(actual))
    p = np.array([float(expected.get(b, 0)) for b in bins])
    q = np.array([float(actual.get(b, 0)) for b in bins])
    return p, q


def psi(expected: dict[str, float], actual: dict[str, float], floor: float = PSI_FLOOR) -> float:
    """Population stability index Σ (a_i − e_i)·ln(a_i / e_i) of two histograms (counts, any scale).

    Bins are matched by name; proportions are floored at `floor` so a bin empty on one side stays finite. The usual
    reading: below 0.1 no shift, 0.1–0.25 a moderate one, above 0.25 a significant one. 0 when either side is empty.
    """
    p, q = _aligned(expected, actual)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p = np.maximum(p / p.sum(), floor)
    q = np.maximum(q / q.sum(), floor)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(expected: dict[str, float], actual: dict[str, float]) -> float:
    """Jensen–Shannon distance (the square root of the divergence, base 2: in [0, 1]) of two count maps.

    Equals scipy.spatial.distance.jensenshannon(p, q, base=2) on the aligned vectors. 0 when either side is empty.
    """
    p, q = _aligned(expected, actual)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        inside = a > 0
        return float(np.sum(a[inside] * np.log2(a[inside] / m[inside])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


# --- what a site sends about its data --------------------------------------------------------------------------


def data_profile(card: dict) -> dict:
    """The summary of a data card a site sends in its update manifest: counts only, never text.

    {"records": kept records, "token_lengths": histogram, "languages": kept records by language,
     "pii": replacements by entity type, "dropped": records dropped by reason}
    """
    languages = card.get("languages") or {}
    lengths = (card.get("token_lengths") or {}).get("histogram") or {}
    return {
        "records": int((card.get("records") or {}).get("kept", 0)),
        "token_lengths": {str(k): int(v) for k, v in lengths.items()},
        "languages": {str(k): int(v) for k, v in (languages.get("kept") or {}).items()},
        "pii": {str(k): int(v) for k, v in (card.get("pii_replaced") or {}).items()},
        "dropped": {str(k): int(v) for k, v in (card.get("dropped") or {}).items()},
    }


def _rate(counts: dict[str, int], records: int) -> float:
    return sum(counts.values()) / records if records > 0 else 0.0


def profile_drift(first: dict, current: dict) -> dict[str, float]:
    """How a site's data moved from its first profile: PSI and JS distance of the token-length histogram, JS
    distance of the languages, and the change in PII replacements and in dropped records per kept record."""
    records_first, records_now = first.get("records", 0), current.get("records", 0)
    return {
        "length_psi": psi(first.get("token_lengths", {}), current.get("token_lengths", {})),
        "length_js": js_distance(first.get("token_lengths", {}), current.get("token_lengths", {})),
        "language_js": js_distance(first.get("languages", {}), current.get("languages", {})),
        "pii_rate_change": _rate(current.get("pii", {}), records_now) - _rate(first.get("pii", {}), records_first),
        "drop_rate_change": (_rate(current.get("dropped", {}), records_now)
                             - _rate(first.get("dropped", {}), records_first)),
    }


# --- update drift -------------------------------------------------------------------------------------------


def norm_z(norm: float, history: list[float], spread: float) -> float | None:
    """(norm − mean) / max(std, spread × mean) over the site's earlier norms; the floor keeps a steady history (std
    near 0) from turning ordinary noise into a large score."""
    if not history:
        return None
    values = np.asarray(history, dtype=np.float64)
    mean = float(values.mean())
    scale = max(float(values.std()), spread * abs(mean), 1e-12)
    return (norm - mean) / scale


def previous_cosine(current: Path, previous: Path, rank: int) -> float | None:
    """Cosine between two updates of one site (its delta this round and its last merged one), streamed key by key,
    each tensor read once. Keys one side lacks count as zeros; smaller ranks are zero-padded to `rank`. None when
    either is zero, or the earlier file is no longer a readable update."""
    from fedtune.aggregate.updates import PrivateTensors
    from fedtune.wire.codec import WireError
    from fedtune.wire.tensors import pad_rank

    dot = norm_a = norm_b = 0.0
    try:
        with PrivateTensors(current) as a, PrivateTensors(previous) as b:
            keys_a, keys_b = set(a.keys()), set(b.keys())
            for key in sorted(keys_a | keys_b):
                # per-key sums in float32 (BLAS), added up in float64: plenty for a monitoring cosine
                x = pad_rank(a.tensor(key), key, rank).reshape(-1) if key in keys_a else None
                y = pad_rank(b.tensor(key), key, rank).reshape(-1) if key in keys_b else None
                if x is not None:
                    norm_a += float(np.dot(x, x))
                if y is not None:
                    norm_b += float(np.dot(y, y))
                if x is not None and y is not None and x.shape == y.shape:
                    dot += float(np.dot(x, y))
    except (OSError, WireError):
        return None
    if norm_a <= 0 or norm_b <= 0 or not math.isfinite(norm_a * norm_b):
        return None
    return dot / math.sqrt(norm_a * norm_b)


# --- what train-local adds to an update manifest ---------------------------------------------------------------


def site_fields(config, card: dict, data: Path, model=None, parent_tensors: dict | None = None) -> dict:
    """The monitoring fields of a site's update manifest: its data profile (unless monitor.data_profile is off) and,
    with monitor.report_eval, the parent version's loss on its eval split (`model` is restored to `parent_tensors`
    for it: call this after the delta is taken)."""
    fields: dict = {}
    if config.monitor.profiles(config.privacy):
        fields["data_profile"] = data_profile(card)
    if config.monitor.report_eval and model is not None and parent_tensors is not None:
        report = parent_eval(model, parent_tensors, config, data)
        if report["tokens"]:
            fields["eval"] = report
    return fields


def parent_eval(model, parent_tensors: dict, config, data: Path, batch_size: int = 8) -> dict:
    """{"parent_loss", "tokens"}: token-weighted cross-entropy of the parent version on the site's eval split."""
    import torch
    from peft import set_peft_model_state_dict

    from fedtune import models
    from fedtune.data.prepared import read_prepared

    _card, ids, labels = read_prepared(data, config, "eval")
    set_peft_model_state_dict(model, parent_tensors)
    model.eval()
    device = next(model.parameters()).device
    ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            logits, target = models.labelled_logits(model, ids[start:start + batch_size].to(device),
                                                    labels[start:start + batch_size].to(device))
            total += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
            count += target.numel()
    return {"parent_loss": round(total / max(count, 1), 6), "tokens": int(count)}
