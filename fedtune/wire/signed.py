"""A small document one party signs and another checks, written once: a JSON object holding the fields under
one key and, beside them, `signature` over their canonical JSON (a round's sample, an unmask request, a site's
answer). The signature sits inside the file, so one file is the whole statement."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from fedtune.wire.codec import WireError, canonical_json, parse_json, pretty_json, printable, read_capped
from fedtune.wire.keys import SigningKey, verify
from fedtune.wire.manifests import Wire


class NotSigned(WireError):
    """The document's signature is not the expected party's."""


def write_signed(path: Path, fields: dict, model: type[Wire], signer: SigningKey | None, field: str) -> Path:
    """Write `{field: fields, "signature": …}` to `path` atomically; FileExistsError when it exists (a statement
    is made once: a second, different one for the same round is refused, not overwritten)."""
    model.model_validate(fields)
    document = {field: fields, "signature": signer.sign(canonical_json(fields)) if signer else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pretty_json(document))
    try:
        os.link(tmp, path)  # fails when `path` exists, whoever won the race
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_signed(path: Path, model: type[Wire], field: str, what: str, public_key: str | None,
                max_bytes: int) -> dict:
    """The document's fields, checked against `model` and, when `public_key` is given, signed by it.
    Raises WireError (NotSigned for a wrong signature), its message without the path."""
    document = parse_json(read_capped(path, max_bytes), path.name)
    if not isinstance(document, dict) or set(document) != {field, "signature"}:
        raise WireError(f"not {what} (expected the keys {field} and signature)")
    try:
        model.model_validate(document[field])
    except ValidationError as err:
        first = err.errors()[0]
        raise WireError(f"{field}.{'.'.join(map(str, first['loc']))}: {printable(first['msg'], 160)}") from None
    if public_key is not None and not verify(public_key, canonical_json(document[field]), document["signature"]):
        raise NotSigned("signature mismatch")
    return document[field]
