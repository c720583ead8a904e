"""What the coordinator checks before an update is used. A failed check rejects that update with a reason
naming the file; it never crashes the round.

Envelope checks read the manifest and signature only — who sent it, for which round, from which version,
in which shape — and so also work on masked updates (secure aggregation). Content checks read the tensors
(finite values, norms) and need plaintext. The tensors are read once, into a private copy hashed and measured
while it is made; that copy is what is merged.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from threadpoolctl import threadpool_limits

from fedtune.aggregate.updates import PrivateCopy, read_private_copy
from fedtune.config import FederationConfig
from fedtune.wire.codec import WireError, canonical_json, printable
from fedtune.wire.manifests import Equivocation
from fedtune.wire.secagg import RESPONSES_DIR
from fedtune.wire.tensors import ADAPTER_FILE, Layout, expected_layout
from fedtune.wire.update import Envelope, read_envelope


class Rejected(Exception):
    """An update that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class Update:
    site: str
    folder: Path
    manifest: dict
    sha256: str
    nonce: str
    num_examples: int | None  # None under secure aggregation (the weight travels masked)
    num_tokens: int | None
    rank: int
    trained: str  # "AB", or "B" when A stayed frozen (ffa)
    keys: set[str]
    tensors: Path  # the private copy that is checked and merged
    norm: float = 0.0  # L2 norm of the whole delta
    spans: dict | None = None  # key → (shape, dtype, where its bytes start) in the private copy, as read


@dataclass
class RoundChecks:
    """What every update of one round is checked against."""

    config: FederationConfig
    parent: dict  # the current version's manifest
    layout: Layout  # the current version's tensors
    max_bytes: int
    trains: str  # what the method lets sites train: "AB" or "B"
    work: Path  # private folder for the tensor copies
    accepted_nonces: set[str] = field(default_factory=set)
    accepted_hashes: set[str] = field(default_factory=set)
    # secure aggregation: the secagg record every update must carry (less its own seeds' hashes) and the
    # masked tensors' layout
    secagg: dict | None = None
    masked: Layout | None = None

    @property
    def number(self) -> int:
        return self.parent["round"] + 1


def collect_round(round_dir: Path, checks: RoundChecks) -> tuple[list[Update], list[dict], list[dict]]:
    """(valid updates, rejected [{site, reason}], equivocations) of the round folder."""
    rejected: list[dict] = []
    envelopes: list[Envelope] = []
    for entry in sorted(round_dir.iterdir()):
        if entry.name.startswith(".") or entry.name == RESPONSES_DIR:
            continue  # hidden work files; secure aggregation's answers
        label = _label(entry)
        if entry.is_file() and not entry.is_symlink():
            continue  # notes beside the updates are not updates
        if entry.is_symlink() or not entry.is_dir():
            rejected.append({"site": label, "reason": "not a folder (a link, FIFO or device); each update is a folder"})
            continue
        try:
            envelope = read_envelope(entry)
            check_signature(envelope, checks.config)
            envelopes.append(envelope)
        except (WireError, Rejected) as why:
            rejected.append({"site": label, "reason": str(why)})
    envelopes, equivocations = _equivocations(envelopes, checks.config, rejected)
    candidates = []
    for envelope in envelopes:
        try:
            check_lineage(envelope, checks)
            candidates.append(envelope)
        except Rejected as why:
            rejected.append({"site": _label(envelope.folder), "reason": str(why)})

    def content(item: tuple[int, Envelope]) -> Update | dict:
        index, envelope = item
        try:
            return check_tensors(envelope, checks, checks.work / f"{index}.safetensors")
        except (Rejected, WireError) as why:
            return {"site": _label(envelope.folder), "reason": str(why)}

    # Hashing and the norms release the GIL, so the updates are read on every core; BLAS (the norms' dot
    # products) on one thread in each, or its own threads would contend with these (measured: 1.7× slower).
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=max(1, min(len(candidates), os.cpu_count() or 1))) as pool:
        checked = list(pool.map(content, enumerate(candidates)))
    valid = [c for c in checked if isinstance(c, Update)]
    rejected += [c for c in checked if not isinstance(c, Update)]
    valid = _copies(valid, rejected)
    return valid, rejected, equivocations


def _label(folder: Path) -> str:
    """How a folder is named in a reason, a warning and the version manifest: its name arrived with the update,
    so control characters are escaped and the length bounded."""
    return printable(folder.name, 64)


def _names(folders: list[str], shown: int = 3) -> str:
    """A bounded list of folder names for a reason (a round may hold any number of them)."""
    more = len(folders) - shown
    return ", ".join(folders[:shown]) + (f" and {more} more" if more > 0 else "")


def check_signature(envelope: Envelope, config: FederationConfig) -> None:
    """The manifest is signed by the key the roster holds for the site it names (when signatures are on)."""
    site = envelope.manifest.site
    if site not in config.site_names():
        raise Rejected(f"manifest.json: site '{site}' is not on the roster")
    key = config.site_key(site)
    if not config.signatures_required() and key is None:
        return
    if key is None:
        raise Rejected(f"site '{site}' has no key on the roster, and this federation requires signed updates; "
                       "add it with `fedtune roster add`")
    if envelope.signature is None:
        raise Rejected("manifest.sig: missing; updates must be signed (train-local --key SITE.key)")
    if not envelope.signed_by(key):
        raise Rejected(f"manifest.sig: not a signature of this manifest by site '{site}''s key (signed by another "
                       "key, or the manifest or its tensors' sha256 changed after signing)")


def _equivocations(envelopes: list[Envelope], config: FederationConfig, rejected: list[dict]):
    """Two different updates signed by one site in one round: all of them are rejected (and recorded).

    Only a signed claim is attributable; an unsigned manifest naming a site is caught by the folder check."""
    by_site: dict[str, list[Envelope]] = defaultdict(list)
    kept, events = [], []
    for envelope in envelopes:
        if config.site_key(envelope.manifest.site) is None:
            kept.append(envelope)
        else:
            by_site[envelope.manifest.site].append(envelope)
    for site, claims in by_site.items():
        if len({canonical_json(e.signed) for e in claims}) == 1:
            # One signed update, copied: not two statements. The copy fails the folder check below.
            kept.extend(claims)
            continue
        outcome = "both are rejected" if len(claims) == 2 else f"all {len(claims)} are rejected"
        for envelope in claims:
            others = _names([_label(e.folder) for e in claims if e is not envelope])
            rejected.append({"site": _label(envelope.folder), "reason": f"equivocation: site '{site}' signed two "
                             f"different updates this round (also in {others}); {outcome}"})
        events.append(Equivocation(site=site, updates=[e.manifest.sha256 for e in claims],
                                   folders=[_label(e.folder) for e in claims]).model_dump())
    return kept, events


def check_lineage(envelope: Envelope, checks: RoundChecks) -> None:
    """Folder, round, parent, base model, LoRA shape, replay — from the manifest alone."""
    manifest, config, parent = envelope.manifest, checks.config, checks.parent
    site = manifest.site
    if envelope.folder.name != site:
        raise Rejected(f"manifest.json names site '{site}' but the folder is '{printable(envelope.folder.name, 64)}'")
    if manifest.round != checks.number:
        late = " (late: only aggregation.async merges updates from earlier versions)" if manifest.round < checks.number else ""
        raise Rejected(f"manifest.json: update is for round {manifest.round}, this round is {checks.number}{late}")
    if manifest.nonce in checks.accepted_nonces:
        raise Rejected("replayed: its nonce belongs to an update already merged in an earlier round")
    if manifest.sha256 in checks.accepted_hashes:
        raise Rejected("replayed: these tensor bytes were already merged in an earlier round")
    if (manifest.parent.version, manifest.parent.sha256) != (parent["version"], parent["adapter_sha256"]):
        if manifest.parent.version == parent["version"]:
            raise Rejected(f"manifest.json: trained from a different {parent['version']} (its sha256 is not the registry's)")
        raise Rejected(f"manifest.json: trained from {manifest.parent.version}, not from the current version "
                       f"{parent['version']}")
    if manifest.base_model.sha256 != config.base_model.sha256:
        raise Rejected("manifest.json: trained on another base model (fingerprint differs)")
    rank = config.site_rank(site)
    lora = manifest.lora
    if (lora.r, lora.alpha, lora.target_modules) != (rank, config.lora.alpha, config.lora.target_modules):
        raise Rejected(f"manifest.json: LoRA settings (r {lora.r}, alpha {lora.alpha}) differ from the federation's "
                       f"(r {rank} for this site, alpha {config.lora.alpha}, target_modules {config.lora.target_modules})")
    if config.privacy.mode == "distributed":
        from fedtune.privacy.dp_fedavg import site_noise_std

        record, std = manifest.privacy, site_noise_std(config)
        if (record.mechanism != "distributed" or record.clip_norm != config.privacy.clip_norm
                or record.noise_std is None or abs(record.noise_std - std) > 1e-9 * std):
            raise Rejected(f"manifest.json: privacy is {record.model_dump()}, but this federation's distributed DP "
                           f"needs each update clipped to {config.privacy.clip_norm} and noised with std {std:.6g}")
    if config.privacy.mode == "local":
        from fedtune.privacy.local import check_update

        reason = check_update(config, manifest.privacy)
        if reason is not None:
            raise Rejected(reason)
    _check_secagg(manifest, checks)
    if manifest.trained != checks.trains:
        if checks.trains == "B":
            raise Rejected("trained A as well, but ffa needs A frozen: set aggregation.method: ffa in federation.yaml "
                           "before the sites train")
        raise Rejected(f"manifest.json: trained {manifest.trained} only; this federation's method trains both factors")


def _check_secagg(manifest, checks: RoundChecks) -> None:
    """A masked update must be masked for this round's plan; a plain one must carry its counts."""
    if checks.secagg is None:
        if manifest.secagg is not None:
            raise Rejected("manifest.json: a masked update (secagg), but this federation does not use secure "
                           "aggregation")
        if manifest.num_examples is None or manifest.num_tokens is None:
            raise Rejected("manifest.json: num_examples and num_tokens are missing (only masked updates omit them)")
        return
    if manifest.secagg is None:
        raise Rejected("manifest.json: not masked, but this federation uses secure aggregation "
                       "(privacy.secure_aggregation): the site must train with this federation.yaml")
    got = manifest.secagg.model_dump(exclude={"shares_sha256", "self_mask_commitment"})
    if got != checks.secagg:
        wrong = sorted(k for k in checks.secagg if got.get(k) != checks.secagg[k])
        raise Rejected(f"manifest.json: masked with other parameters ({', '.join(wrong)}) than this round's "
                       "secure aggregation; the site must train with this federation.yaml")


def check_tensors(envelope: Envelope, checks: RoundChecks, copy: Path) -> Update:
    """Read the tensors once into a private copy, hashing them and taking their norms on the way; then the hash
    against the manifest, keys, shapes and dtypes against the parent, finite values and the norm."""
    manifest = envelope.manifest
    rank = checks.config.site_rank(manifest.site)
    masked = checks.masked is not None
    expected = checks.masked if masked else expected_layout(checks.layout, rank, manifest.trained)
    read = read_private_copy(envelope.folder / ADAPTER_FILE, copy, checks.max_bytes, None if masked else expected)
    sha, got = read.sha256, read.layout
    if sha != manifest.sha256:
        raise Rejected(f"{ADAPTER_FILE}: does not match the sha256 in its manifest (altered or damaged)")
    if got.keys() != expected.keys():
        extra, lost = sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys())
        raise Rejected(f"{ADAPTER_FILE}: tensor keys differ from the global adapter (unexpected: "
                       f"{[printable(k, 80) for k in extra[:2]]}, missing: {lost[:2]})")
    for key, (shape, dtype) in expected.items():
        if got[key] != (shape, dtype):
            raise Rejected(f"{ADAPTER_FILE}: tensor {key} is {got[key][1]}{list(got[key][0])}, expected {dtype}{list(shape)}")
    # A masked update is uniform noise to the coordinator: its site checked and bounded it before masking.
    norm = 0.0 if masked else delta_norm(read, expected)
    limit = checks.config.security.max_update_norm
    if norm > limit:
        raise Rejected(f"{ADAPTER_FILE}: the update's norm {norm:.4g} is beyond security.max_update_norm {limit:g}")
    return Update(site=manifest.site, folder=envelope.folder, manifest=envelope.signed, sha256=sha,
                  nonce=manifest.nonce, num_examples=manifest.num_examples, num_tokens=manifest.num_tokens, rank=rank,
                  trained=manifest.trained, keys=set(expected), tensors=copy, norm=norm, spans=read.spans)


def delta_norm(read: PrivateCopy, keys) -> float:
    """L2 norm of the whole delta from the norms taken while it was read, summed in the parent's key order;
    Rejected when a value is NaN or infinite, or when safetensors itself cannot read the copy the merge opens."""
    from safetensors import safe_open

    try:
        with safe_open(str(read.path), framework="numpy"):
            pass  # safetensors' own parse of the header: what this reader accepted, a torch merge's reader must too
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        raise Rejected(f"{ADAPTER_FILE}: not a readable safetensors file ({printable(err, 120)})") from None
    square_sum = 0.0
    for key in keys:
        if key not in read.norms:
            raise Rejected(f"{ADAPTER_FILE}: tensor {key} is {read.layout[key][1]}, not a float tensor")
        part = read.norms[key]
        if not math.isfinite(part):
            raise Rejected(f"{ADAPTER_FILE}: tensor {key} holds NaN or Inf")
        square_sum += part * part
    return math.sqrt(square_sum)


def _copies(valid: list[Update], rejected: list[dict]) -> list[Update]:
    """The same tensor bytes or nonce twice in one round: a copy of another update; none of them counts."""
    kept = []
    for update in valid:
        twins = [u.folder.name for u in valid if u is not update and (u.sha256 == update.sha256 or u.nonce == update.nonce)]
        if twins:
            rejected.append({"site": update.folder.name,
                             "reason": f"replayed: the same update as {_names(twins)}'s this round"})
        else:
            kept.append(update)
    return kept


