"""Secure aggregation at a site: mask the update before it leaves (train-local), and answer the coordinator's
unmask request (`fedtune unmask`).

A site checks and bounds its own update before masking — once masked, nobody can: it must be finite, it is
clipped (or, under distributed DP, clipped and noised) and clamped to the encoding's range, and weighted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable

import numpy as np

from fedtune.artifacts import stamp
from fedtune.config import FederationConfig
from fedtune.errors import BadInput, StageFailed
from fedtune.privacy.secagg import (
    PROTOCOL,
    SEED_BYTES,
    RoundContext,
    add_masks,
    commitment,
    exchange_key,
    flatten,
    open_share,
    pair_seed,
    round_plan,
    seal_share,
    split_seed,
    unflatten,
)
from fedtune.wire.codec import WireError, printable
from fedtune.wire.keys import SigningKey
from fedtune.wire.secagg import (
    RESPONSE_FORMAT,
    SHARES_FILE,
    document_sha256,
    partitions,
    read_request,
    read_shares,
    response_path,
    shares_bytes,
    write_response,
)
from fedtune.wire.tensors import pad_rank
from fedtune.wire.update import UpdateFiles, encode_update, read_envelope

ANSWERS_SUFFIX = ".unmask-answers.json"


def require_exchange_key(config: FederationConfig, site: str, signer: SigningKey | None) -> SigningKey:
    if signer is None:
        raise BadInput(f"--key: secure aggregation needs site {site}'s private key (its X25519 part makes the masks)")
    listed = exchange_key(config, site)
    if signer.exchange_public is None or signer.exchange_public != listed:
        raise BadInput(f"{signer.source}: its X25519 key is not the exchange_key the roster holds for site {site}; "
                       "use the key pair whose .pub is on the roster (`fedtune keys new` makes both halves)")
    return signer


def site_weight(config: FederationConfig, num_examples: int, num_tokens: int) -> float:
    """ω ∈ (0, 1]: under distributed DP every site weighs 1 (fixed weights bound the sensitivity); otherwise its
    count (aggregation.weighting) over privacy.secagg_max_count, capped at 1."""
    weighting = config.aggregation.weighting
    if config.privacy.mode == "distributed" or weighting == "uniform":
        return 1.0
    count = num_tokens if weighting == "tokens" else num_examples
    return min(count, config.privacy.secagg_max_count) / config.privacy.secagg_max_count


def mask_update(config: FederationConfig, signer: SigningKey, parent: dict, site: str, delta: dict, fields: dict,
                adapter_config: dict) -> UpdateFiles:
    """The masked, signed update of `site`: its delta (already clipped and noised under distributed DP) bounded,
    weighted, encoded, masked; its self-mask seed's shares sealed to the other sites."""
    import torch

    plan = round_plan(config, parent)
    ctx, encoding = plan.ctx, plan.encoding
    require_exchange_key(config, site, signer)
    for key, tensor in delta.items():
        if not bool(torch.isfinite(tensor).all()):
            raise StageFailed(f"train-local: the update's tensor {key} is not finite; nothing was sent (lower --lr)")
    if config.privacy.mode != "distributed":
        # Clip before masking: after it, nobody can check a norm (distributed DP clipped already).
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
        scale = min(1.0, encoding.bound / max(norm, 1e-30))
        delta = {k: v * scale for k, v in delta.items()}
    weight = site_weight(config, fields["num_examples"], fields["num_tokens"])
    padded = {k: pad_rank(v.float(), k, config.lora.r) * weight for k, v in delta.items()}
    vector, order = flatten(padded, weight)
    words = encoding.encode(vector, in_place=True)

    own = secrets.token_bytes(SEED_BYTES)  # b_u: kept nowhere; the round rebuilds it from t shares
    pairs = {peer: pair_seed(signer, site, peer, exchange_key(config, peer), ctx)
             for peer in ctx.participants if peer != site}
    add_masks(words, site, own, pairs, encoding.modulus_bits)
    holders = ctx.participants  # itself included: its own answer then gives one share of its seed, never the seed
    sealed = {holder: seal_share(share, pair_seed(signer, site, holder, exchange_key(config, holder), ctx, "share"),
                                 ctx, site, holder)
              for holder, share in zip(holders, split_seed(own, plan.threshold, len(holders)))}
    shares = shares_bytes(site, ctx.round, sealed)
    fields = {**fields, "num_examples": None, "num_tokens": None,
              "train": {**fields["train"], "loss_first": None, "loss_last": None},
              "secagg": {**plan.record(), "shares_sha256": hashlib.sha256(shares).hexdigest(),
                         "self_mask_commitment": commitment(own)}}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in unflatten(words, order).items()}
    return encode_update(tensors, fields, adapter_config, signer, extra={SHARES_FILE: shares})


# --- answering the unmask request ---------------------------------------------------------------------------


def answer_unmask(config: FederationConfig, site: str, key: Path, round_dir: Path,
                  log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Write `site`'s signed answer to the round's unmask request: its shares of the survivors' self-mask seeds (its
    own included) and its pairwise seeds with the dropped sites — never both kinds for one site.

    A site answers one request per round (a record beside its key remembers which), so a coordinator that asked
    again with another list of survivors learns nothing more. Returns the answer's path."""
    config.require_site(site, "unmask")
    if not config.privacy.secure_aggregation:
        raise BadInput("unmask: this federation does not use secure aggregation (privacy.secure_aggregation)")
    signer = SigningKey.load(key)
    if config.site_key(site) is not None and signer.public != config.site_key(site):
        raise BadInput(f"{key}: not the key the roster holds for site {site}")
    require_exchange_key(config, site, signer)
    if not round_dir.is_dir():
        raise BadInput(f"{round_dir}: round folder not found")
    request = read_request(round_dir, config.coordinator_key)
    if request is None:
        raise BadInput(f"{round_dir}: holds no unmask request yet; the coordinator writes it with `fedtune aggregate`")
    if request["federation"] != config.name or request["participants"] != sorted(config.site_names()):
        raise BadInput(f"{round_dir}: the unmask request is for federation {printable(request['federation'])} with "
                       "another roster than this federation.yaml's; nothing answered")
    survivors = {s["site"]: s for s in request["survivors"]}
    dropped = request["dropped"]
    if not partitions(request):
        raise BadInput(f"{round_dir}: the unmask request does not split the sites into survivors and dropped; "
                       "nothing answered")
    if request["threshold"] != config.secagg_threshold():
        raise BadInput(f"{round_dir}: the unmask request's threshold {request['threshold']} is not the federation's "
                       f"{config.secagg_threshold()}; nothing answered")
    if site not in survivors:
        raise BadInput(f"{round_dir}: the unmask request declares site {site} dropped: its update is not in the sum, "
                       "so it has nothing to answer")
    ctx = RoundContext(config.name, request["round"], request["parent"]["version"], request["parent"]["sha256"],
                       tuple(request["participants"]))
    _own_update(config, site, round_dir, survivors[site])
    request_sha = document_sha256(request)
    path = response_path(round_dir, site)
    _remember(key, site, ctx, request_sha)  # before anything is revealed: a second, different request is refused

    shares = {}
    for other in sorted(survivors):
        share = _my_share(config, signer, site, other, round_dir, survivors[other], ctx)
        if share is None:
            log(f"warning: {round_dir / other}: no share for site {site} could be opened; answered without it")
        else:
            shares[other] = share.hex()
    fields = {
        "format": RESPONSE_FORMAT, "federation": config.name, "round": ctx.round, "site": site,
        "request_sha256": request_sha,
        "self_mask_shares": shares,
        "pairwise_seeds": {peer: pair_seed(signer, site, peer, exchange_key(config, peer), ctx).hex()
                           for peer in dropped},
        "created": stamp()["created"],
    }
    return write_response(round_dir, fields, signer)


def _own_update(config: FederationConfig, site: str, round_dir: Path, pinned: dict) -> str:
    """The nonce of the update this site sent, checked to be the one the request pins."""
    try:
        envelope = read_envelope(round_dir / site)
    except WireError as err:
        raise BadInput(f"{round_dir / site}: {err}") from None
    if envelope.manifest.site != site or not envelope.signed_by(config.site_key(site) or ""):
        raise BadInput(f"{round_dir / site}: not an update signed by site {site}'s key; nothing answered")
    if document_sha256(envelope.signed) != pinned["manifest_sha256"] or envelope.manifest.nonce != pinned["nonce"]:
        raise BadInput(f"{round_dir / site}: the unmask request pins another update than the one in this folder; "
                       "nothing answered")
    return envelope.manifest.nonce


def _my_share(config, signer, site: str, other: str, round_dir: Path, pinned: dict, ctx) -> bytes | None:
    """This site's share of `other`'s self-mask seed, from `other`'s signed update as the request pins it."""
    try:
        envelope = read_envelope(round_dir / other)
        if not envelope.signed_by(config.site_key(other) or ""):
            return None
        if document_sha256(envelope.signed) != pinned["manifest_sha256"]:
            return None
        record = envelope.manifest.secagg
        if record is None or record.protocol != PROTOCOL:
            return None
        document = read_shares(round_dir / other, record.shares_sha256)
    except WireError:
        return None
    sealed = document.shares.get(site)
    if sealed is None or document.site != other:
        return None
    key = pair_seed(signer, site, other, exchange_key(config, other), ctx, "share")
    return open_share(sealed, key, ctx, other, site)


def _remember(key: Path, site: str, ctx: RoundContext, request_sha: str) -> None:
    """Record the request this site answers for the round; refuse a different one for the same round."""
    import fcntl

    path = Path(key).with_name(Path(key).stem + ANSWERS_SUFFIX)
    round_id = document_sha256({"federation": ctx.federation, "round": ctx.round, "parent": ctx.parent_sha256})
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        text = handle.read()
        try:
            answers = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            raise BadInput(f"{path}: damaged; it records which unmask requests site {site} answered — restore it "
                           "from a backup (answering again could expose an update)") from None
        earlier = answers.get(round_id)
        if earlier is not None and earlier != request_sha:
            raise BadInput(f"round {ctx.round}: site {site} already answered another unmask request for this round "
                           f"({earlier[:12]}…); answering a second one, with another list of survivors, could expose a "
                           "site's update — refused")
        answers[round_id] = request_sha
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(answers, indent=1, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
