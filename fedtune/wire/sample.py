"""A round's sample as it travels: the coordinator signs which sites a round calls into
updates/round-NNNN/sample.json, so a site can check it was called and nobody can redraw a round after seeing who
was picked. Under privacy.sample_rate < 1 the draw is Poisson from the OS's random source (each site with
probability q); under rounds.sample_rate/sites_per_round it is a seeded draw of k sites anyone can redo."""

from __future__ import annotations

from pathlib import Path

from typing import Annotated, Literal

from pydantic import Field

from fedtune.errors import BadInput
from fedtune.wire.codec import WireError
from fedtune.wire.keys import SigningKey
from fedtune.wire.manifests import SITE_NAME, ParentRef, Real, Sha256, Text, Wire
from fedtune.wire.signed import NotSigned, read_signed, write_signed

SAMPLE_FORMAT = "fedtune.sample/1"
SAMPLE_FILE = "sample.json"
MAX_SAMPLE_BYTES = 1 << 20


class RoundSample(Wire):
    """Who the coordinator called for a round."""

    format: str = Field(pattern=r"^fedtune\.sample/1$")
    federation: Text
    round: int = Field(ge=1, le=10**9)
    parent: ParentRef
    sample_rate: Real = Field(gt=0, le=1)
    roster: int = Field(ge=1, le=10**6, description="how many sites the draw was over")
    sites: list[Annotated[str, Field(pattern=SITE_NAME)]] = Field(max_length=10**6)
    created: Text
    # poisson: privacy.sample_rate's unpredictable draw; seeded: rounds.sample_rate/sites_per_round's draw, which
    # anyone can redo from `seed`; all: every site (the sample only fixes when a round with a deadline opened)
    draw: Literal["poisson", "seeded", "all"] = "poisson"
    seed: Sha256 | None = None
    deadline: Text | None = Field(None, description="when the round closes (rounds.deadline after `created`)")


def write_sample(round_dir: Path, fields: dict, signer: SigningKey | None) -> Path:
    """Write sample.json (its signature inside: `signature` over the canonical JSON of the rest) into a new round
    folder; a round's sample is never replaced."""
    try:
        return write_signed(round_dir / SAMPLE_FILE, fields, RoundSample, signer, "sample")
    except FileExistsError:
        raise BadInput(f"{round_dir / SAMPLE_FILE}: round {fields['round']}'s sample is already drawn; a round is "
                       "drawn once") from None


def read_sample(round_dir: Path, coordinator_key: str | None) -> dict | None:
    """The round's signed sample, or None when the folder holds none. BadInput (one line) when it is malformed or
    its signature is not the coordinator's."""
    path = round_dir / SAMPLE_FILE
    if not path.exists():
        return None
    try:
        fields = read_signed(path, RoundSample, "sample", "a round sample", coordinator_key, MAX_SAMPLE_BYTES)
    except NotSigned:
        raise BadInput(f"{path}: its signature is not the coordinator's (coordinator_key in federation.yaml); a "
                       "sample only the coordinator draws decides who takes part") from None
    except WireError as err:
        raise BadInput(f"{path}: {err}") from None
    return RoundSample.model_validate(fields).model_dump(mode="json")
