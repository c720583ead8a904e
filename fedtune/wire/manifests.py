"""The documents that cross a boundary, as strict models: an update's manifest (site → coordinator), a global
version's manifest (coordinator → sites) and a roster entry (federation.yaml).

Unknown keys are refused, numbers are bounded and finite, strings have a length cap and names a pattern,
so a crafted manifest is rejected with the field it got wrong, never copied onward or allowed to crash the
reader. `format` carries the version of each document's layout.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.wire.codec import WireError, parse_json, printable
from fedtune.wire.keys import PUBLIC_KEY_RE

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


class UpdateManifest(Wire):
    """What a site signs: its update's tensors (by sha256), where they start from and how they were made."""

    format: Literal["fedtune.update/2"]
    site: str = Field(pattern=SITE_NAME)
    round: int = Field(ge=1, le=10**9)
    parent: ParentRef
    base_model: BaseModelRecord
    lora: UpdateLora
    trained: Literal["AB", "B"]
    num_examples: int = Field(ge=1, le=10**12)
    num_tokens: Count
    train: TrainRecord
    privacy: PrivacyRecord
    sha256: Sha256 = Field(description="sha256 of adapter_model.safetensors")
    nonce: str = Field(pattern=NONCE, description="128 random bits: two honest updates never share one")
    fedtune_version: Annotated[str, Field(max_length=32)]
    created: Annotated[str, Field(max_length=40)]


class Contributor(Wire):
    site: str = Field(pattern=SITE_NAME)
    update_sha256: Sha256
    nonce: str = Field(pattern=NONCE)
    weight: Real
    num_examples: int = Field(ge=1)
    num_tokens: Count
    rank: int = Field(ge=1)
    norm: Real
    clip_scale: Real | None = None
    coefficient: Real | None = None


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
