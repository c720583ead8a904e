"""Secure aggregation's documents as they travel (privacy.secagg has the protocol):

- `secagg_shares.json` in a site's update folder: its self-mask seed's shares, each sealed to its holder; the
  update's signed manifest names the file's sha256.
- `unmask_request.json` in the round folder, signed by the coordinator: which sites' updates are in the sum
  (survivors, each pinned by its manifest's hash) and which are not (dropped).
- `_answers/SITE.json`, signed by the site: its answer — its shares of the survivors' self-mask seeds (its own
  included) and its pairwise seeds with the dropped sites.

A request and a response hold their signature inside (`signature` over the canonical JSON of the rest).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from fedtune.errors import BadInput
from fedtune.wire.codec import WireError, canonical_json, parse_json, pretty_json, printable, read_capped
from fedtune.wire.keys import SigningKey
from fedtune.wire.manifests import NONCE, SITE_NAME, ParentRef, Sha256, Text, Wire
from fedtune.wire.signed import NotSigned, read_signed, write_signed

SHARES_FILE = "secagg_shares.json"
REQUEST_FILE = "unmask_request.json"
RESPONSES_DIR = "_answers"  # never a site name (those start with a letter or digit)
SHARES_FORMAT = "fedtune.secagg-shares/1"
REQUEST_FORMAT = "fedtune.unmask-request/1"
RESPONSE_FORMAT = "fedtune.unmask-response/1"
MAX_DOCUMENT_BYTES = 8 << 20  # 10k sites' sealed shares are ~1 MB

SiteName = Annotated[str, Field(pattern=SITE_NAME)]
Sealed = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9+/=]+$")]
Seed = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Share = Annotated[str, Field(pattern=r"^[0-9a-f]{68}$")]


class SharesDocument(Wire):
    format: Literal["fedtune.secagg-shares/1"]
    site: SiteName
    round: int = Field(ge=1, le=10**9)
    shares: dict[SiteName, Sealed] = Field(max_length=10**4)


class Survivor(Wire):
    site: SiteName
    manifest_sha256: Sha256 = Field(description="sha256 of the canonical JSON of the update's signed manifest")
    nonce: str = Field(pattern=NONCE)


class UnmaskRequest(Wire):
    format: Literal["fedtune.unmask-request/1"]
    federation: Text
    round: int = Field(ge=1, le=10**9)
    parent: ParentRef
    participants: list[SiteName] = Field(max_length=10**4)
    survivors: list[Survivor] = Field(max_length=10**4)
    dropped: list[SiteName] = Field(max_length=10**4)
    threshold: int = Field(ge=2)
    created: Text


class UnmaskResponse(Wire):
    format: Literal["fedtune.unmask-response/1"]
    federation: Text
    round: int = Field(ge=1, le=10**9)
    site: SiteName
    request_sha256: Sha256
    self_mask_shares: dict[SiteName, Share] = Field(max_length=10**4)
    pairwise_seeds: dict[SiteName, Seed] = Field(max_length=10**4)
    created: Text


def document_sha256(fields: dict) -> str:
    """What a request or a manifest is pinned by: the sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(fields)).hexdigest()


def shares_bytes(site: str, round: int, sealed: dict[str, str]) -> bytes:
    document = {"format": SHARES_FORMAT, "site": site, "round": round, "shares": sealed}
    SharesDocument.model_validate(document)
    return pretty_json(document)


def read_shares(folder: Path, expected_sha256: str) -> SharesDocument:
    """An update's sealed shares, checked against the sha256 its signed manifest names. Raises WireError."""
    data = read_capped(folder / SHARES_FILE, MAX_DOCUMENT_BYTES)
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise WireError(f"{SHARES_FILE}: does not match the sha256 in its manifest (altered or damaged)")
    try:
        return SharesDocument.model_validate(parse_json(data, SHARES_FILE))
    except ValidationError as err:
        raise WireError(f"{SHARES_FILE}: {printable(err.errors()[0]['msg'], 160)}") from None


def _write_once(path: Path, fields: dict, model: type[Wire], signer: SigningKey | None) -> Path:
    try:
        return write_signed(path, fields, model, signer, "document")
    except FileExistsError:
        raise BadInput(f"{path}: already exists; it is written once per round") from None


def _read(path: Path, model: type[Wire], what: str, public_key: str | None, signer_name: str) -> dict:
    """The document's fields, checked and signed by `public_key`. Raises WireError naming the file."""
    try:
        return read_signed(path, model, "document", what, public_key, MAX_DOCUMENT_BYTES)
    except NotSigned:
        raise WireError(f"{path.name}: its signature is not {signer_name}'s (altered after signing, or signed by "
                        "another key)") from None
    except WireError as err:
        raise WireError(f"{path.name}: {err}") from None


def partitions(request: dict) -> bool:
    """The request splits its participants into survivors and dropped: no site both, none left out, none twice —
    what keeps any site's pairwise seeds and self-mask shares from both being asked for."""
    survivors = [s["site"] for s in request["survivors"]]
    return (len(set(survivors)) == len(survivors) and not set(survivors) & set(request["dropped"])
            and set(survivors) | set(request["dropped"]) == set(request["participants"]))


def write_request(round_dir: Path, fields: dict, signer: SigningKey | None) -> Path:
    return _write_once(round_dir / REQUEST_FILE, fields, UnmaskRequest, signer)


def read_request(round_dir: Path, coordinator_key: str | None) -> dict | None:
    """The round's unmask request, or None when the coordinator has not made one. BadInput when it is malformed
    or not signed by the coordinator."""
    path = round_dir / REQUEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        return _read(path, UnmaskRequest, "an unmask request", coordinator_key, "the coordinator")
    except WireError as err:
        raise BadInput(f"{round_dir}/{err}") from None


def response_path(round_dir: Path, site: str) -> Path:
    return round_dir / RESPONSES_DIR / f"{site}.json"


def write_response(round_dir: Path, fields: dict, signer: SigningKey | None) -> Path:
    return _write_once(response_path(round_dir, fields["site"]), fields, UnmaskResponse, signer)


def read_response(path: Path, site_key: str | None, site: str) -> dict:
    """One site's answer, signed by its roster key. Raises WireError."""
    return _read(path, UnmaskResponse, "an unmask answer", site_key, f"site {site}")
