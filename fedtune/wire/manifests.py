"""The documents that cross a boundary, as strict models: an update's manifest (site → coordinator), a global
version's manifest (coordinator → sites) and a roster entry (federation.yaml).

Unknown keys are refused, numbers are bounded and finite, strings have a length cap and names a pattern,
so a crafted manifest is rejected with the field it got wrong, never copied onward or allowed to crash the
reader. `format` carries the version of each document's layout.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from fedtune.wire.codec import WireError, parse_json, printable
from fedtune.wire.keys import EXCHANGE_KEY_RE, PUBLIC_KEY_RE

UPDATE_FORMAT = "fedtune.update/2"
VERSION_FORMAT = "fedtune.global/2"

SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
VERSION_NAME = r"^v\d{4,9}$"
SHA256 = r"^[0-9a-f]{64}$"
NONCE = r"^[0-9a-f]{32}$"

Sha256 = Annotated[str, Field(pattern=SHA256)]
Text = Annotated[str, Field(max_length=256)]
Count = Annotated[int, Field(ge=0, le=10**15)]
Real = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]


class Wire(BaseModel):
    # strict: "5" is not 5 and true is not 1; a manifest says exactly what it means.
    model_config = ConfigDict(extra="forbid", strict=True)


class RosterEntry(Wire):
    """One member of the federation."""

    model_config = ConfigDict(extra="forbid")  # written by people in YAML: 4 for lora_r is fine

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="the site's name: letters, digits, . _ -")
    lora_r: int | None = Field(None, ge=1, description="this site trains a smaller rank (a site with a small GPU)")
    key: str | None = Field(None, pattern=PUBLIC_KEY_RE, description="the site's Ed25519 public key "
                            "(`fedtune keys new` writes it to NAME.pub); updates must be signed with its private key")
    exchange_key: str | None = Field(None, pattern=EXCHANGE_KEY_RE, description="the site's X25519 public key for "
                                     "secure aggregation's pairwise masks (`fedtune keys new` writes it as the second "
                                     "line of NAME.pub)")

    @model_serializer(mode="wrap")
    def _without_absent_exchange_key(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A roster without exchange keys dumps as it did before they existed: the roster hashes the log recorded
        # stay valid, and federation.yaml stays readable by sites on an earlier fedtune.
        data = handler(self)
        if self.exchange_key is None:
            data.pop("exchange_key", None)
        return data


class ParentRef(Wire):
    version: str = Field(pattern=VERSION_NAME)
    sha256: Sha256


class BaseModelRecord(Wire):
    id: Text
    sha256: Sha256


class UpdateLora(Wire):
    r: int = Field(ge=1, le=1024)
    alpha: Real
    target_modules: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=256)] | Literal["all-linear"]


class TrainRecord(Wire):
    steps: Count
    lr: Real
    batch_size: Count
    grad_accum: Count
    # None under local DP: training losses are computed from the site's records without noise, so they stay home.
    loss_first: Real | None
    loss_last: Real | None
    seconds: Real
    tokens_per_second: Real
    # data-parallel training processes (train-local --num-processes); absent: one
    processes: int | None = Field(None, ge=1, le=4096)


class PrivacyRecord(Wire):
    """What a site did for privacy before sending. distributed: its delta clipped to clip_norm, then noise of
    noise_std. local: trained with DP-SGD (records clipped to example_clip_norm, noise_multiplier, Poisson
    sample_rate, steps this round) and the record-level ε its ledger has spent over `rounds` rounds, at delta."""

    mechanism: Literal["distributed", "local"] | None = None
    clip_norm: Real | None = None
    noise_std: Real | None = None
    example_clip_norm: Real | None = None
    noise_multiplier: Real | None = None
    sample_rate: Real | None = Field(None, gt=0, le=1)
    steps: int | None = Field(None, ge=0, le=10**9)
    rounds: int | None = Field(None, ge=0, le=10**9)
    delta: Real | None = Field(None, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] | None = None
    epsilon: Real | None = Field(None, ge=0)


class SecaggRecord(Wire):
    """How a masked update was made (secure aggregation, privacy.secure_aggregation): the tensors are integers
    modulo 2^modulus_bits, each value scaled by 2^scale_bits and clamped to ±bound; the self-mask seed's shares
    are in secagg_shares.json (its sha256 here, so the signature covers them)."""

    protocol: Literal["fedtune.secagg/1"]
    participants: list[Annotated[str, Field(pattern=SITE_NAME)]] = Field(min_length=3, max_length=10**4)
    threshold: int = Field(ge=2, le=10**4)
    modulus_bits: Literal[32, 64]
    scale_bits: int = Field(ge=0, le=62)
    bound: Real = Field(gt=0)
    shares_sha256: Sha256
    self_mask_commitment: Sha256


# A bin, language, entity type or drop reason of a data profile: a short label, never free text.
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:<>+-]{1,64}$")]
Counts = Annotated[dict[Label, Count], Field(max_length=256)]


class DataProfile(Wire):
    """The summary of a site's data card it sends with each update (counts only, no text), for data drift:
    kept records, the token-length histogram, kept records by language, PII replacements by type, drops by reason."""

    records: Count
    token_lengths: Counts
    languages: Counts
    pii: Counts
    dropped: Counts


class SiteEval(Wire):
    """The parent version's loss on the site's eval split (monitor.report_eval): sent exactly, so outside any DP
    guarantee; refused under privacy modes."""

    parent_loss: Real
    tokens: Count


class UpdateManifest(Wire):
    """What a site signs: its update's tensors (by sha256), where they start from and how they were made."""

    format: Literal["fedtune.update/2"]
    site: str = Field(pattern=SITE_NAME)
    round: int = Field(ge=1, le=10**9)
    parent: ParentRef
    base_model: BaseModelRecord
    lora: UpdateLora
    trained: Literal["AB", "B"]
    # None under secure aggregation: the weight travels masked, so the coordinator learns only the round's total.
    num_examples: int | None = Field(ge=1, le=10**12)
    num_tokens: Count | None
    train: TrainRecord
    privacy: PrivacyRecord
    secagg: SecaggRecord | None = None
    # absent from updates made by an earlier fedtune, or when monitoring does not ask for them
    data_profile: DataProfile | None = None
    eval: SiteEval | None = None
    sha256: Sha256 = Field(description="sha256 of adapter_model.safetensors")
    nonce: str = Field(pattern=NONCE, description="128 random bits: two honest updates never share one")
    fedtune_version: Annotated[str, Field(max_length=32)]
    created: Annotated[str, Field(max_length=40)]


class Contribution(Wire):
    """Leave-one-out change of the merged delta Δ without this site (Δ₋ₖ: the same merge, weights renormalised;
    for rules that are not a fixed linear combination of the deltas, of their weighted mean: see the version's
    monitor.contribution_basis)."""

    loo_cosine: Real = Field(description="cos(Δ, Δ₋ₖ)")
    loo_distance: Real = Field(description="‖Δ − Δ₋ₖ‖")
    loo_relative: Real = Field(description="‖Δ − Δ₋ₖ‖ / ‖Δ‖")


class Contributor(Wire):
    site: str = Field(pattern=SITE_NAME)
    update_sha256: Sha256
    nonce: str = Field(pattern=NONCE)
    # None under secure aggregation: the coordinator never sees one site's weight, size or norm.
    weight: Real | None
    num_examples: int | None = Field(ge=1)
    num_tokens: Count | None
    rank: int = Field(ge=1)
    norm: Real | None
    clip_scale: Real | None = None
    coefficient: Real | None = None
    # asynchronous rounds (aggregation.async): the round the update was sent for, how many versions behind the
    # current one its parent was, and the factor s(τ) it was merged with
    round: int | None = Field(None, ge=1)
    staleness: int | None = Field(None, ge=0)
    staleness_scale: Real | None = None
    contribution: Contribution | None = None


class RejectedRecord(Wire):
    site: Annotated[str, Field(max_length=200)]
    reason: Annotated[str, Field(max_length=1000)]


class Equivocation(Wire):
    site: str = Field(pattern=SITE_NAME)
    updates: list[Sha256]
    folders: list[Annotated[str, Field(max_length=200)]]


class LoraShape(Wire):
    r: int = Field(ge=1)
    alpha: float
    dropout: float
    target_modules: list[str] | Literal["all-linear"]


class VersionPrivacy(Wire):
    """The differential privacy spent up to a version (mode none: nothing is claimed)."""

    mode: Literal["none", "central", "distributed", "local"] = "none"
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    delta: float | None = None
    accountant: Literal["rdp", "pld"] | None = None
    rounds_accounted: int | None = Field(None, ge=0)
    epsilon: float | None = Field(None, ge=0)
    target_epsilon: float | None = None
    # local mode: each contributing site's record-level ε as its update reported it (epsilon is their maximum)
    site_epsilon: dict[str, float] | None = None


class VersionSecagg(Wire):
    """What the coordinator learnt making a version under secure aggregation: who took part, the protocol's
    parameters and the sum of the survivors' weights — nothing about one site's update."""

    protocol: Literal["fedtune.secagg/1"]
    participants: list[str]
    survivors: list[str]
    dropped: list[str] = Field(description="sites whose update was not in the sum (dropped before sending, or "
                               "arrived after the unmask request)")
    responders: list[str]
    unanswered: list[str] = Field(description="survivors that did not answer; their self-masks came from shares")
    threshold: int
    modulus_bits: int
    scale_bits: int
    bound: float
    weight_total: float
    request_sha256: Sha256


class VersionParticipation(Wire):
    """Who a round called and who answered in time: the seeded draw (rounds.sample_rate / sites_per_round) or the
    whole roster, the deadline, and how the round closed."""

    called: list[str]
    sent: list[str] = Field(description="called sites whose update was in the round folder when it closed")
    missing: list[str] = Field(description="called sites that had sent nothing when the round closed")
    draw: Literal["all", "seeded", "poisson"]
    seed: Sha256 | None = Field(None, description="seeded draw: sha256 of the federation, seed, round and parent; "
                                "random.Random(int(seed, 16)).sample(sorted roster, k) redoes it")
    deadline: Text | None = None
    closed: Literal["all-sent", "deadline", "on-demand"] = Field(description="all-sent: every called site had "
                                                                 "sent; deadline: the deadline passed; on-demand: "
                                                                 "aggregate ran (no deadline, or told to close)")


class MonitorAlert(Wire):
    kind: Literal["data", "update", "quality"]
    site: str = Field(pattern=SITE_NAME)
    metric: Text
    value: Real
    threshold: Real
    message: Annotated[str, Field(max_length=500)]


class ProfileReference(Wire):
    version: str = Field(pattern=VERSION_NAME, description="the version whose round brought the site's first profile")
    profile: DataProfile


class VersionMonitor(Wire):
    """What the coordinator observed of each site this round (fedtune.monitor) and the alerts it raised."""

    model_config = ConfigDict(extra="forbid", strict=False)

    sites: dict[Annotated[str, Field(pattern=SITE_NAME)], dict[Annotated[str, Field(max_length=64)], Real]] = {}
    alerts: list[MonitorAlert] = []
    references: dict[Annotated[str, Field(pattern=SITE_NAME)], ProfileReference] | None = Field(
        None, description="each site's first data profile, carried forward: what data drift is measured against")
    contribution_basis: Literal["rule", "linear"] | None = Field(
        None, description="rule: Δ₋ₖ is the method itself re-run without site k; linear: the weighted mean without "
        "k (the method is not a fixed linear combination of the deltas)")
    held: bool | None = Field(None, description="written by aggregate --hold-on-alert with alerts: published, not "
                              "committed, until `fedtune promote`")


class VersionManifest(Wire):
    """What the coordinator signs for each global version."""

    model_config = ConfigDict(extra="forbid", strict=False)  # made by fedtune itself; floats may be written as ints

    format: Literal["fedtune.global/2"]
    federation: Text
    version: str = Field(pattern=VERSION_NAME)
    round: int = Field(ge=0)
    parent: str | None = Field(None, pattern=VERSION_NAME)
    parent_sha256: Sha256 | None = None
    method: Text
    params: dict[str, Any] = {}
    quorum: int | None = None
    rank: int | None = None
    contributors: list[Contributor] = []
    rejected: list[RejectedRecord] = []
    equivocations: list[Equivocation] = []
    reconstruction_error: dict[str, Any] | None = None
    server_state_sha256: Sha256 | None = None
    rolled_back_to: str | None = Field(None, pattern=VERSION_NAME)
    reason: Annotated[str, Field(max_length=2000)] | None = None
    base_model: BaseModelRecord
    lora: LoraShape
    privacy: VersionPrivacy = VersionPrivacy()
    secure_aggregation: VersionSecagg | None = None
    participation: VersionParticipation | None = None
    monitor: VersionMonitor | None = None
    adapter_sha256: Sha256
    fedtune_version: Text
    created: Text


def _problem(err: ValidationError) -> str:
    item = err.errors()[0]
    where = ".".join(str(p) for p in item["loc"]) or "(top level)"
    what = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{printable(where, 60)}: {printable(what, 160)}{more}"


def parse_manifest(data: bytes, model: type[Wire], source: str) -> tuple[dict, Wire]:
    """The manifest's JSON object (what its signature covers) and the checked model."""
    value = parse_json(data, source)
    if not isinstance(value, dict):
        raise WireError(f"{source}: not a JSON object")
    expected = model.model_fields["format"].annotation.__args__[0]
    if value.get("format") != expected:
        got = printable(value.get("format"), 40)
        raise WireError(f"{source}: format is {got}, expected {expected}"
                        + (" (made by an older fedtune; redo it with this one)" if isinstance(value.get("format"), str)
                           and value["format"].rsplit("/", 1)[0] == expected.rsplit("/", 1)[0] else ""))
    try:
        return value, model.model_validate(value)
    except ValidationError as err:
        raise WireError(f"{source}: {_problem(err)}") from None
