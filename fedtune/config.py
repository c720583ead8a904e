"""Typed schema of federation.yaml and recipes. YAML only sets values; every error of a file is
reported at once, each with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.errors import BadInput
from fedtune.methods import METHODS, SUM_ONLY
from fedtune.wire.keys import PUBLIC_KEY_RE
from fedtune.wire.manifests import RosterEntry

DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
FEDERATION_FORMAT = "fedtune.federation/1"


SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelRef(Strict):
    """The base model every site trains on."""

    id: str = Field(DEFAULT_MODEL, description="the model's identity: a hub id (ORG/NAME) or embedded:NAME; each "
                    "site finds its own copy (--model DIR, FEDTUNE_MODEL_DIR, or the Hugging Face cache)")
    sha256: str | None = Field(None, description="fingerprint of the weights; init fills it in")


class LoraSettings(Strict):
    """LoRA shape shared by the whole federation."""

    r: int = Field(8, ge=1, le=1024, description="LoRA rank of the global adapter")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input during local training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="names of the linear layers that get LoRA factors, or all-linear")
    # Left out of federation.yaml while "none", so files written before it existed, and sites on an earlier
    # fedtune, read the same.
    quantization: Literal["none", "4bit"] = Field(
        "none", exclude_if=lambda value: value == "none",
        description="4bit: each site loads the base model in 4-bit NF4 with bf16 compute via bitsandbytes (QLoRA) on "
                    "its GPU (pip install \"fedtune[qlora]\"); updates stay ordinary LoRA deltas, so aggregation is "
                    "unchanged")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def shape(self) -> dict:
        """The adapter's shape as global versions record and compare it. Quantization is left out: it is how a
        site holds the frozen base while training, not part of the adapter, so a site may change it alone."""
        return self.model_dump(mode="json", exclude={"quantization"})


class TrainingSettings(Strict):
    """Defaults for `train-local`; a site may override steps, lr and batch size on the command line."""

    steps: int = Field(20, ge=1, description="optimizer steps per round on each site")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, description="sequences of seq_len tokens per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    prox_mu: float = Field(0.0, ge=0, description="FedProx: weight of (mu/2)·||w - w_global||² in the local loss")


PII_ENTITY_TYPES = ("EMAIL", "PHONE", "CARD", "IBAN", "IP", "NATIONAL_ID")
# Countries whose national IDs prepare recognizes (and checks); also the default data.pii.countries, measured
# with benchmarks/pii_recall.py (README, "Preparing a site's data").
PII_ID_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "AT", "BE", "CA", "CH", "PL", "SE")
DEFAULT_PII_COUNTRIES = PII_ID_COUNTRIES
PLACEHOLDER_NAME = r"^[A-Z][A-Z0-9_]*$"


class PiiSettings(Strict):
    """What `prepare` replaces with typed placeholders before any token is written (the PII policy)."""

    entities: list[Literal["EMAIL", "PHONE", "CARD", "IBAN", "IP", "NATIONAL_ID"]] = Field(
        list(PII_ENTITY_TYPES), description="PII types replaced by placeholders (NATIONAL_ID: the IDs of `countries`)")
    countries: list[str] = Field(list(DEFAULT_PII_COUNTRIES), description="ISO 3166 codes: their national IDs, and "
                                 "phone numbers valid in their numbering plans however written (phone numbers of any "
                                 "country are found by layout: +CC, a trunk 0, an area code in brackets, an extension)")
    patterns: dict[str, str] = Field({}, description="extra regexes, placeholder name → pattern (e.g. MRN: 'MRN-\\d{6}')")
    deny_list: list[str] = Field([], description="terms every site replaces (project code names); a site's own "
                                 "names go in a local file given to `prepare --deny-list`")

    @field_validator("countries")
    @classmethod
    def _countries(cls, value: list[str]) -> list[str]:
        upper = [c.upper() for c in value]
        if set(upper) <= set(PII_ID_COUNTRIES):
            # Regions phonenumbers supports (tests/unit/test_imports.py checks): every command that reads
            # federation.yaml then skips loading its tables.
            return list(dict.fromkeys(upper))
        import phonenumbers

        unknown = [c for c in upper if c not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown country code {', '.join(unknown)} (use ISO 3166 alpha-2, e.g. US, GB, DE)")
        return list(dict.fromkeys(upper))

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name, regex in value.items():
            if not re.match(PLACEHOLDER_NAME, name):
                raise ValueError(f"pattern name '{name}' must be upper case letters, digits and _ (it becomes <{name}>)")
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"pattern {name}: not a valid regular expression ({err})") from None
        return value


class DedupSettings(Strict):
    """Duplicate removal: exact (normalized text) and near (MinHash-LSH)."""

    exact: bool = Field(True, description="drop records whose normalized text repeats an earlier one")
    near: bool = Field(True, description="drop near-duplicates (MinHash-LSH, confirmed at threshold)")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word n-grams at which records are near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(3, ge=1, le=16, description="words per shingle")


COLUMN_PARTS = ("text", "prompt", "input", "response", "messages", "system")


class ColumnMap(Strict):
    """Which column of a site's files holds each part of a record, for files whose column names `prepare` does
    not recognise. Name `text`, or `messages` (+ `system`), or `prompt` and `response` (+ `input`, `system`);
    only the named columns are read."""

    text: str | None = Field(None, description="plain text, trained on entirely")
    prompt: str | None = Field(None, description="the user's turn")
    input: str | None = Field(None, description="added to the prompt after a blank line (Alpaca's `input`)")
    response: str | None = Field(None, description="the answer: the assistant's turn, the only part trained on")
    messages: str | None = Field(None, description="a conversation: [{role, content}] or ShareGPT [{from, value}], "
                                 "as a list or JSON text")
    system: str | None = Field(None, description="a system prompt put before the conversation")

    @model_validator(mode="before")
    @classmethod
    def _known_parts(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = [str(k) for k in value if k not in COLUMN_PARTS]
            if unknown:
                raise ValueError(f"unknown record part {', '.join(unknown)} (use {', '.join(COLUMN_PARTS)})")
        return value

    @model_validator(mode="after")
    def _one_shape(self) -> ColumnMap:
        named = {part for part in COLUMN_PARTS if getattr(self, part) is not None}
        pair = {"prompt", "response"} & named
        if "text" in named and len(named) > 1:
            raise ValueError("text is read on its own; drop the other parts or drop text")
        if "messages" in named and named & {"prompt", "input", "response"}:
            raise ValueError("give messages or prompt/response, not both")
        if pair and pair != {"prompt", "response"}:
            raise ValueError("prompt and response go together")
        if not named & {"text", "messages", "prompt"}:
            raise ValueError("name the column of text, messages, or prompt and response")
        return self

    def mapping(self) -> dict[str, str]:
        """Record part → column name, for the parts named."""
        return self.model_dump(exclude_none=True)


def parse_columns(text: str) -> ColumnMap:
    """Read `prepare --columns`: PART=COLUMN pairs separated by commas, e.g. `prompt=question,response=answer`."""
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        part, sep, column = (s.strip() for s in item.partition("="))
        if not (sep and part and column) or part in pairs:
            raise BadInput(f"--columns {text}: write each part once as PART=COLUMN, separated by commas, "
                           "e.g. prompt=question,response=answer")
        pairs[part] = column
    try:
        return ColumnMap.model_validate(pairs)
    except ValidationError as err:
        problems = "; ".join(item["msg"].removeprefix("Value error, ") for item in err.errors())
        raise BadInput(f"--columns {text}: {problems}") from None


class DataSettings(Strict):
    """What `prepare` keeps and how it splits."""

    min_chars: int = Field(8, ge=0, description="records with fewer characters are dropped (too_short)")
    max_chars: int = Field(20000, ge=1, description="records with more characters are dropped (too_long)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of records held out for evaluation, chosen "
                                 "by content hash")
    languages: list[str] = Field(["en"], description="allowed languages (ISO 639-1); empty keeps every language")
    language_min_score: float = Field(0.5, ge=0, le=1, description="a record is dropped only when another language wins with at least this score")
    language_min_letters: int = Field(20, ge=0, description="records with fewer letters are not judged")
    quality: list[Literal["gopher-quality", "gopher-repetition", "c4", "fineweb"]] = Field(
        [], description="datatrove web-document filters (opt-in: they drop most short instruction data)")
    dedup: DedupSettings = DedupSettings()
    pii: PiiSettings = PiiSettings()
    columns: ColumnMap | None = Field(None, description="the site's own column names, e.g. {prompt: question, "
                                      "response: answer}; `prepare --columns` overrides it; unset: formats are "
                                      "recognised by their field names")

    @model_validator(mode="after")
    def _bounds(self) -> DataSettings:
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be below max_chars")
        return self


class DataContract(Strict):
    """What every site's prepared data must satisfy, beside seq_len and data.pii (the PII policy).
    `prepare` checks it and records the result in the data card; `train-local` refuses a card that does not match."""

    tokenizer: str | None = Field(None, description="tokenizer fingerprint; init fills it in")
    chat_template: str | None = Field(None, description="sha256 of the chat template ('none' without one); init fills it in")
    min_tokens: int = Field(0, ge=0, description="fewest trained tokens a site's train split may hold")


class AggregationSettings(Strict):
    """How the coordinator merges a round (ALGORITHMS.md has every rule's definition)."""

    method: str = Field("fedavg", description="aggregation method (`fedtune aggregate --help` lists them)")
    weighting: Literal["examples", "tokens", "uniform"] = Field(
        "examples", description="what a site's weight is proportional to (self-reported counts; see max_weight)")
    trim: float = Field(0.2, ge=0, lt=0.5, description="trimmed means: fraction cut from each tail")
    byzantine: int = Field(1, ge=0, description="krum, multi-krum: number of attackers tolerated (f)")
    keep: int | None = Field(None, ge=1, description="multi-krum: updates averaged (default n - f)")
    density: float = Field(0.5, gt=0, le=1, description="ties, dare: fraction of each delta kept")
    clip_radius: float | None = Field(None, gt=0, description="centered-clip: radius tau (default: median update norm)")
    clip_iterations: int = Field(3, ge=1, description="centered-clip: iterations")
    clip_norm: float | None = Field(None, gt=0, description="clip every site's whole delta to this L2 norm first")
    max_weight: float | None = Field(0.5, gt=0, le=1, description="cap on any site's weight fraction, so a "
                                     "self-reported num_examples cannot take the round (raised to 1/K when K sites "
                                     "cannot share it; null: no cap)")
    norm_bound: float | None = Field(10.0, gt=1, description="clip an update whose norm exceeds this multiple of "
                                     "the median norm of the round's other updates (null: off)")
    report_error: bool | None = Field(
        None, description="fedavg/ffa: record the reconstruction error per layer; it costs ~2(Kr)²(d+k) flops per "
        "layer, so by default only when that totals under 10 GFLOP (svd and stack get it for free)")
    server_opt: Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = Field(
        "none", description="server optimizer applied to the merged delta (FedOpt)")
    server_lr: float | None = Field(None, gt=0, description="server learning rate (default 1 for none/fedavgm, 0.01 adaptive)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="beta1 of the server optimizer")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="beta2 of fedadam / fedyogi")
    server_tau: float = Field(1e-3, gt=0, description="adaptivity tau of fedadagrad / fedadam / fedyogi")
    quorum: int = Field(2, ge=1, description="fewest valid updates that make a round; below it nothing is written")
    asynchronous: AsyncSettings | None = Field(
        None, alias="async", description="buffered asynchronous rounds (FedBuff): {buffer: K, staleness: polynomial, "
        "exponent: 0.5}; late updates trained from an earlier version are merged, scaled by their staleness; null: "
        "synchronous rounds, where an update must start from the current version")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; choose one of {', '.join(METHODS)}")
        return value

    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if self.server_opt in ("none", "fedavgm") else 0.01


class AsyncSettings(Strict):
    """FedBuff (Nguyen et al. 2022): the coordinator merges every `buffer` updates whatever version each started
    from; an update τ versions stale is scaled by s(τ) = (1 + τ)^−exponent (polynomial) or 1 (constant)."""

    buffer: int = Field(ge=1, description="K: the updates merged into each version (the round waits for K)")
    staleness: Literal["polynomial", "constant"] = Field("polynomial", description="how a stale update is scaled: "
                                                         "polynomial (1 + τ)^−exponent, or constant (not at all)")
    exponent: float = Field(0.5, ge=0, description="a of s(τ) = (1 + τ)^−a")
    max_staleness: int | None = Field(None, ge=0, description="an update more versions behind is rejected "
                                      "(null: none too old)")

    def scale(self, staleness: int) -> float:
        """s(τ): the factor an update `staleness` versions behind is merged with."""
        return 1.0 if self.staleness == "constant" else float((1 + staleness) ** -self.exponent)


class SecuritySettings(Strict):
    """Who may send updates, and the bounds on what an update may hold."""

    require_signatures: bool | None = Field(None, description="refuse unsigned updates; default: true as soon as "
                                            "any site on the roster has a key")
    max_update_norm: float = Field(1e4, gt=0, description="an update whose whole delta has a larger L2 norm is "
                                   "rejected (honest LoRA deltas are far below it)")


def _unique_names(sites: list) -> list:
    names = [s.name for s in sites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"site listed twice: {', '.join(dupes)}")
    # A shared signing key would let one site send as another; a shared exchange key would let two sites'
    # pairwise masks be computed by either, so secure aggregation could no longer hide one site's update.
    for field, what in (("key", "public key"), ("exchange_key", "exchange key")):
        holders: dict[str, list[str]] = {}
        for site in sites:
            value = getattr(site, field, None)  # a recipe's sites carry no keys
            if value is not None:
                holders.setdefault(value, []).append(site.name)
        shared = [group for group in holders.values() if len(group) > 1]
        if shared:
            raise ValueError(f"sites {' and '.join(shared[0])} share one {what} ({field}); every site has its own "
                             "key pair (`fedtune keys new`)")
    return sites


class LocalPrivacy(Strict):
    """Record-level DP-SGD inside train-local (privacy.mode local): each site's own guarantee for its records."""

    example_clip_norm: float = Field(1.0, gt=0, description="each record's gradient (all LoRA weights together) is "
                                     "clipped to this L2 norm")
    noise_multiplier: float | None = Field(None, gt=0, description="z: the noise std added to each step's summed "
                                           "gradient, in units of example_clip_norm; null: the site calibrates it from "
                                           "target_epsilon for privacy.rounds rounds on its first round")
    target_epsilon: float | None = Field(None, gt=0, description="each site's record-level budget: a site refuses to "
                                         "train a round that would take its ε past this")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of each site's (ε, δ) guarantee")


class PrivacySettings(Strict):
    """Differential privacy of the released versions (DP-FedAvg and DP-SGD; ALGORITHMS.md)."""

    mode: Literal["none", "central", "distributed", "local"] = Field(
        "none", description="none; central: the coordinator clips each site's whole delta to clip_norm, sums with "
        "fixed weights, adds N(0, (z·clip_norm)²) to every coordinate and divides by the expected number of sites (it "
        "sees each update: trust it); distributed: each site clips its own delta and adds N(0, (z·clip_norm)²/quorum), "
        "so any quorum of updates carries the full noise, and the coordinator only averages; local: each site trains "
        "with DP-SGD (privacy.local) and its records are protected whatever the coordinator does")
    clip_norm: float = Field(0.5, gt=0, description="C: each site's whole delta (all tensors) is clipped to this "
                             "L2 norm")
    noise_multiplier: float | None = Field(None, gt=0, description="z: noise std in units of clip_norm; null: init "
                                           "calibrates it from target_epsilon for `rounds`")
    target_epsilon: float | None = Field(None, gt=0, description="the budget: no round is merged (or trained for) "
                                         "once it would take ε past this")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    rounds: int = Field(10, ge=1, description="planned rounds: what init calibrates the noise for")
    sample_rate: float = Field(1.0, gt=0, le=1, description="q: each site takes part in a round with probability q "
                               "(Poisson, drawn by the coordinator); 1: every site every round")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="rdp (Rényi DP) or pld (tighter) from dp-accounting")
    local: LocalPrivacy = LocalPrivacy()
    secure_aggregation: bool = Field(False, description="mask every update (Bonawitz et al. 2017) so the coordinator "
                                     "learns only the round's sum; each round takes one extra exchange: aggregate "
                                     "writes an unmask request, each surviving site answers with `fedtune unmask`, "
                                     "aggregate completes the round. fedavg/ffa only; every site needs an "
                                     "exchange_key on the roster")
    secagg_threshold: int | None = Field(None, ge=2, description="secure aggregation: t, the answers needed to "
                                         "unmask a round (Shamir t-of-n); default ⌊n/2⌋+1, and it must stay above n/2")
    secagg_max_count: int = Field(1_000_000, ge=1, description="secure aggregation: a site's weight is "
                                  "min(count, this)/this, its count being what aggregation.weighting names; the "
                                  "weight travels masked, so the coordinator learns only the round's total")

    @model_validator(mode="after")
    def _noise_or_budget(self) -> PrivacySettings:
        if self.mode in ("central", "distributed") and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give noise_multiplier, or target_epsilon for init to calibrate it")
        if self.sample_rate < 1 and self.mode != "central":
            # distributed: each site's share of the noise assumes a quorum reports, and holding a round until one
            # does would condition the draw the accountant counts on; local: each site accounts its own records.
            raise ValueError(f"sample_rate {self.sample_rate}: site sampling is accounted for in mode central only")
        if self.mode == "local" and self.local.noise_multiplier is None and self.local.target_epsilon is None:
            raise ValueError("local: give noise_multiplier, or target_epsilon for each site to calibrate it")
        return self


class RoundSettings(Strict):
    """Who a round calls and how long it stays open."""

    sample_rate: float = Field(1.0, gt=0, le=1, description="fraction q of the roster each round calls: ⌈q·n⌉ sites "
                               "(at least the quorum), drawn with a seed made from the federation's seed, the round "
                               "and its parent version (anyone can redo the draw), recorded in the version; 1: every "
                               "site. Not a privacy amplification: that is privacy.sample_rate")
    sites_per_round: int | None = Field(None, ge=1, description="call exactly this many sites each round (a seeded "
                                        "draw as for sample_rate, which it replaces)")
    deadline: float | None = Field(None, gt=0, description="seconds a round stays open, from its opening (its "
                                   "sample, else its parent version's creation); then it closes with the updates "
                                   "that arrived, if they meet the quorum. Before it, aggregate waits (exit 3) "
                                   "while a called site has not sent. Late updates are rejected, or merged into a "
                                   "later version with aggregation.async. null: a round closes when aggregate runs")

    def samples(self) -> bool:
        return self.sites_per_round is not None or self.sample_rate < 1

    def called_count(self, roster: int, quorum: int) -> int:
        """How many sites a round calls."""
        import math

        if self.sites_per_round is not None:
            return min(self.sites_per_round, roster)
        return min(roster, max(min(quorum, roster), math.ceil(self.sample_rate * roster - 1e-9)))


class MonitorSettings(Strict):
    """Drift and contribution records per round (fedtune.monitor) and the thresholds that raise alerts. The
    defaults stay quiet on an ordinary run; `fedtune aggregate --hold-on-alert` holds a version with alerts."""

    contributions: bool = Field(True, description="record each site's leave-one-out change of the merged delta and "
                                "its cosines to the merge and to the other updates, from the deltas' Gram matrix "
                                "(fedavg/ffa take it in the merge's own read; not under central/distributed DP "
                                "or secure aggregation: it describes one site)")
    previous_cosine: bool = Field(True, description="record each update's cosine to the site's last merged update "
                                  "when that update's folder is still beside the round's (reads it once more)")
    data_profile: bool | None = Field(None, description="sites send their data card's histogram and counts (no text) "
                                      "for data drift; default: on unless privacy.mode or secure aggregation is set "
                                      "(the counts are exact, outside any DP guarantee)")
    report_eval: bool = Field(False, description="sites send the parent version's loss on their eval split, for "
                              "quality drift; exact, so refused under privacy.mode")
    history: int = Field(10, ge=1, description="versions back a site's norm history spans")
    min_history: int = Field(2, ge=1, description="earlier norms a site needs before its norm z-score can alert")
    update_norm_z: float = Field(4.0, gt=0, description="alert when an update's norm is this many spreads from the "
                                 "site's mean (spread: the std, at least norm_spread × the mean)")
    norm_spread: float = Field(0.25, gt=0, description="floor of the spread, as a fraction of the mean norm")
    sybil_cosine: float = Field(0.99, gt=0, le=1, description="alert when two sites' updates have a higher cosine")
    data_psi: float = Field(0.25, gt=0, description="alert when the token-length histogram's PSI against the "
                            "site's first profile is higher (0.25: the usual 'significant shift')")
    data_js: float = Field(0.3, gt=0, le=1, description="alert when a Jensen–Shannon distance (base 2) of the token "
                           "lengths or languages against the first profile is higher")
    pii_rate: float = Field(0.05, gt=0, description="alert when PII replacements per kept record moved by more")
    drop_rate: float = Field(0.2, gt=0, description="alert when records dropped per kept record moved by more")
    quality_rise: float = Field(0.25, gt=0, description="alert when a site's reported eval loss of the parent is "
                                "this much (nats) above the lowest it reported")
    loo_eval: bool = Field(False, description="simulate: also merge each round without each site and evaluate "
                           "those candidates, recording the leave-one-out change in mean eval loss (K extra "
                           "evaluations per round)")

    def profiles(self, privacy: PrivacySettings) -> bool:
        """Whether sites send a data profile."""
        if self.data_profile is not None:
            return self.data_profile
        return privacy.mode == "none" and not privacy.secure_aggregation


class EvaluationSettings(Strict):
    """Task metrics (`fedtune evaluate`, `simulate`): greedy answers to each site's held-out prompts, scored against
    the site's own answers (exact match, token F1, ROUGE-L)."""

    task_examples: int = Field(32, ge=0, description="held-out prompts answered per site (0: eval loss only)")
    max_new_tokens: int = Field(32, ge=1, description="the longest answer generated, in tokens")
    every_version: bool = Field(False, description="simulate: score every version, not only the base model, the "
                                "last version and the baselines (one more generation pass per round)")


class TrainingPlan(Strict):
    """What a federation file and a recipe both set: the adapter's shape and how sites train and merge."""

    lora: LoraSettings = LoraSettings()
    seq_len: int = Field(128, ge=8, le=131072, description="tokens per packed training sequence")
    seed: int = Field(0, description="seeds the initial adapter and every site's batches (reruns are identical)")
    training: TrainingSettings = TrainingSettings()
    data: DataSettings = DataSettings()
    aggregation: AggregationSettings = AggregationSettings()
    privacy: PrivacySettings = PrivacySettings()
    monitor: MonitorSettings = MonitorSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    @model_validator(mode="after")
    def _private_methods(self) -> TrainingPlan:
        if self.privacy.mode != "none" and (self.monitor.report_eval or self.monitor.data_profile):
            # Exact numbers computed from a site's records would be released beside the DP-protected update.
            raise ValueError(f"monitor.report_eval/data_profile: sites would send exact eval losses or data counts, "
                             f"outside the ε of privacy.mode {self.privacy.mode}; turn them off")
        # Local DP protects records inside each site; whatever the coordinator does with the updates after is
        # post-processing, so only the site-level modes constrain the merge.
        if self.privacy.mode in ("central", "distributed"):
            if self.aggregation.method not in SUM_ONLY:
                raise ValueError(f"privacy.mode {self.privacy.mode}: aggregation.method {self.aggregation.method} "
                                 "would break the sensitivity bound DP is computed from; use fedavg or ffa")
        if self.privacy.secure_aggregation:
            # The coordinator sees only the sum: rules that look at each update cannot run on it.
            if self.aggregation.method not in SUM_ONLY:
                raise ValueError(f"privacy.secure_aggregation: aggregation.method {self.aggregation.method} needs "
                                 "each site's update, which secure aggregation hides; use fedavg or ffa")
            if self.privacy.mode == "central":
                raise ValueError("privacy.secure_aggregation: mode central has the coordinator clip and noise each "
                                 "update, which it cannot see; use mode distributed (each site clips and noises)")
        if self.aggregation.asynchronous is not None:
            from fedtune.methods import REFACTORING

            if self.aggregation.method in REFACTORING:
                raise ValueError(f"aggregation.async: {self.aggregation.method} re-factors the adapter each version, "
                                 "so an update from an earlier version shares no basis with it; use a method that "
                                 "merges factors (fedavg, ffa, the robust rules)")
            if self.privacy.mode in ("central", "distributed") or self.privacy.secure_aggregation:
                raise ValueError("aggregation.async: a stale update is scaled down, which would scale its share of "
                                 "the DP noise or break the masks' cancellation; use synchronous rounds with "
                                 "privacy.mode central/distributed and secure aggregation")
        return self


class FederationConfig(TrainingPlan):
    """The contents of federation.yaml."""

    format: Literal["fedtune.federation/1"] = Field(FEDERATION_FORMAT, description="version of this file's format")
    name: str = Field("federation", description="the federation's name (init: the folder's name)")
    base_model: BaseModelRef = BaseModelRef()
    contract: DataContract = DataContract()
    coordinator_key: str | None = Field(None, pattern=PUBLIC_KEY_RE, description="the coordinator's Ed25519 "
                                        "public key; init fills it in; sites check every version's signature with it")
    security: SecuritySettings = SecuritySettings()
    rounds: RoundSettings = RoundSettings()
    sites: list[RosterEntry] = Field(min_length=1)

    _unique_sites = field_validator("sites")(_unique_names)

    @model_validator(mode="after")
    def _site_ranks(self) -> FederationConfig:
        for site in self.sites:
            if site.lora_r is not None and site.lora_r > self.lora.r:
                raise ValueError(f"site {site.name}: lora_r {site.lora_r} is above the federation's lora.r {self.lora.r}")
        if self.privacy.secure_aggregation:
            count, threshold = len(self.sites), self.secagg_threshold()
            if count < 3:
                raise ValueError(f"privacy.secure_aggregation needs at least 3 sites (the roster has {count}): with "
                                 "two, the sum and one's own update give away the other's")
            if not count / 2 < threshold <= count - 1:
                raise ValueError(f"privacy.secagg_threshold {threshold}: with {count} sites it must be above "
                                 f"{count / 2:g} (so no two groups can each unmask) and at most {count - 1}")
        _check_rounds(self.rounds, self, len(self.sites))
        return self

    def secagg_threshold(self) -> int:
        """t of secure aggregation's t-of-n sharing: as set, else ⌊n/2⌋+1."""
        return self.privacy.secagg_threshold or len(self.sites) // 2 + 1

    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site_key(self, site: str) -> str | None:
        return next(s.key for s in self.sites if s.name == site)

    def signatures_required(self) -> bool:
        """Updates must be signed: as set, else as soon as any site on the roster has a key."""
        if self.security.require_signatures is not None:
            return self.security.require_signatures
        return any(s.key for s in self.sites)

    def site_rank(self, site: str) -> int:
        """The LoRA rank `site` trains at: its own lora_r, else the federation's."""
        entry = next(s for s in self.sites if s.name == site)
        return entry.lora_r or self.lora.r

    def require_site(self, site: str, source: str) -> None:
        if site not in self.site_names():
            raise BadInput(
                f"{source}: site '{site}' is not on the roster ({', '.join(self.site_names())}); "
                "add it under `sites:` in federation.yaml"
            )


def _check_rounds(rounds: RoundSettings, plan: TrainingPlan, roster: int) -> None:
    """A round's sample and deadline must be able to make a round under the federation's other settings."""
    if plan.aggregation.asynchronous is not None and (rounds.deadline is not None or rounds.samples()):
        raise ValueError("rounds.deadline/sample_rate/sites_per_round: asynchronous rounds (aggregation.async) close "
                         "when their buffer is full and take whichever sites send; drop one of them")
    if not rounds.samples():
        return
    if plan.privacy.sample_rate < 1:
        raise ValueError("rounds.sample_rate/sites_per_round and privacy.sample_rate both sample sites; keep one "
                         "(privacy.sample_rate: an unpredictable draw the DP accountant counts on)")
    called = rounds.called_count(roster, plan.aggregation.quorum)
    if plan.aggregation.asynchronous is None and called < min(plan.aggregation.quorum, roster):
        raise ValueError(f"rounds.sites_per_round {called} is below aggregation.quorum {plan.aggregation.quorum}: "
                         "no round could be merged")
    if plan.privacy.secure_aggregation:
        threshold = plan.privacy.secagg_threshold or roster // 2 + 1
        if called < threshold:
            raise ValueError(f"rounds: {called} sites called per round cannot unmask a round whose threshold is "
                             f"{threshold} (privacy.secagg_threshold); call more sites")


class Attack(Strict):
    """A simulated attacker: what it sends instead of its honest update."""

    kind: Literal["sign-flip", "scale", "noise", "nan"]
    factor: float = Field(10.0, description="scale: multiplier; sign-flip: the honest delta times -factor; noise: std in units of the honest delta's std")


class Dropout(Strict):
    """A simulated site that goes silent: before sending its update, or (secure aggregation) after sending it but
    before answering the unmask request."""

    stage: Literal["before-sending", "before-unmasking", "late"] = Field(description="before-sending: sends "
                                                                          "nothing; before-unmasking: sends, then "
                                                                          "does not answer the unmask request; late: "
                                                                          "sends after the round has closed")
    rounds: list[int] | None = Field(None, description="the rounds it drops in (default: every round)")

    def drops(self, stage: str, number: int) -> bool:
        return self.stage == stage and (self.rounds is None or number in self.rounds)


class RecipeSite(Strict):
    """A simulated site and its raw files (paths relative to the recipe file)."""

    name: str = Field(pattern=SITE_NAME)
    inputs: list[str] = Field(min_length=1)
    lora_r: int | None = Field(None, ge=1)
    attack: Attack | None = None
    drop: Dropout | None = None


class RecipeCanaries(Strict):
    """Secret records every simulated site plants in its training split (`prepare --canaries`), for the audit."""

    count: int = Field(0, ge=0, le=10_000, description="canaries per site")
    repeats: int = Field(1, ge=1, le=1_000, description="times each canary is planted")


class RecipeRounds(RoundSettings):
    """A recipe's rounds: how many to run, and the federation's `rounds` settings."""

    count: int = Field(3, ge=1, description="rounds the simulation runs")


class Recipe(TrainingPlan):
    """A whole federation to run on one machine with `fedtune simulate`."""

    name: str = "simulation"
    model: str = DEFAULT_MODEL
    rounds: RecipeRounds = Field(RecipeRounds(), description="a number of rounds, or {count, sample_rate, "
                                 "sites_per_round, deadline}")
    canaries: RecipeCanaries = RecipeCanaries()
    sites: list[RecipeSite] = Field(min_length=2)

    _unique_sites = field_validator("sites")(_unique_names)

    @field_validator("rounds", mode="before")
    @classmethod
    def _round_count(cls, value: Any) -> Any:
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _secure_sites(self) -> Recipe:
        if self.privacy.secure_aggregation and any(s.attack for s in self.sites):
            raise ValueError("privacy.secure_aggregation hides each update, so no check or robust rule could stop a "
                             "simulated attacker; drop secure_aggregation or the attack")
        if not self.privacy.secure_aggregation and any(s.drop and s.drop.stage == "before-unmasking" for s in self.sites):
            raise ValueError("drop.stage before-unmasking needs privacy.secure_aggregation (only it has an unmask step)")
        if self.privacy.secure_aggregation and any(s.drop and s.drop.stage == "late" for s in self.sites):
            raise ValueError("drop.stage late: under secure aggregation a late update is a dropped one; use "
                             "before-sending")
        _check_rounds(self.rounds, self, len(self.sites))
        return self

    def plan(self) -> dict:
        """The recipe's settings as federation-file values."""
        rounds = self.rounds.model_dump(exclude={"count"}, exclude_defaults=True)
        return {"name": self.name, **self.model_dump(include=set(TrainingPlan.model_fields), by_alias=True),
                **({"rounds": rounds} if rounds else {})}

    def roster(self) -> list[dict]:
        return [{"name": s.name, **({"lora_r": s.lora_r} if s.lora_r else {})} for s in self.sites]


T = TypeVar("T", bound=BaseModel)


def _format_errors(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = "unknown key (check its spelling)" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_model(cls: type[T], data: Any, source: str) -> T:
    """Validate `data` against `cls`, raising one BadInput that lists every problem with its key path."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise BadInput(f"{source}: {_format_errors(err)}") from None


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise BadInput(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of keys at the top level")
    return data


def load_federation(path: Path | str) -> FederationConfig:
    path = Path(path)
    config = parse_model(FederationConfig, read_yaml(path), str(path))
    if not config.base_model.sha256:
        raise BadInput(f"{path}: base_model.sha256 is missing; create the file with `fedtune init`")
    return config


def load_recipe(path: Path | str) -> tuple[Recipe, Path]:
    """Load a recipe from its YAML file or a folder holding recipe.yaml; returns it and its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.yaml"
    return parse_model(Recipe, read_yaml(path), str(path)), path.parent


def federation_to_yaml(config: FederationConfig) -> str:
    header = (
        "# fedtune federation file: the contract every site and the coordinator share.\n"
        "# Sites: fedtune prepare / train-local --config federation.yaml; "
        "coordinator: fedtune aggregate --config federation.yaml\n"
    )
    body = yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)
    return header + body
