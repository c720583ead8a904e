"""The coordinator's side of secure aggregation (privacy.secagg has the protocol).

`fedtune aggregate` runs twice for a masked round. The first run checks every update's envelope (signature,
round, parent, shape — what works on masked bytes), then writes the signed unmask request naming the
survivors and the dropped sites, and stops with `Waiting`. Each surviving site answers with `fedtune unmask`.
The second run finds the request, rejects any update that arrived after it, checks the answers' signatures
and, once t are in, removes the masks: what it learns is the sum of the survivors' weighted deltas and of
their weights, from which the new version is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedtune.aggregate.validate import RoundChecks, Update, collect_round
from fedtune.artifacts import stamp
from fedtune.config import FederationConfig
from fedtune.errors import BadInput, Waiting
from fedtune.privacy.secagg import (
    PROTOCOL,
    SAFETENSORS_DTYPE,
    WEIGHT_KEY,
    RoundPlan,
    combine_seed,
    remove_masks,
    round_plan,
    share_index,
)
from fedtune.wire.codec import WireError
from fedtune.wire.secagg import (
    REQUEST_FILE,
    REQUEST_FORMAT,
    RESPONSES_DIR,
    SHARES_FILE,
    document_sha256,
    partitions,
    read_request,
    read_shares,
    read_response,
    response_path,
    write_request,
)
from fedtune.wire.tensors import Layout, expected_layout


@dataclass
class SecureSum:
    """What unmasking a round gives: the survivors' weighted mean delta, and what the version records."""

    mean: dict[str, torch.Tensor]
    valid: list[Update]
    rejected: list[dict]
    equivocations: list[dict]
    record: dict  # the version manifest's `secure_aggregation`


def prepare_checks(config: FederationConfig, parent: dict, checks: RoundChecks) -> RoundPlan:
    """Make `checks` expect masked updates of this round's plan."""
    plan = round_plan(config, parent)
    checks.secagg = plan.record()
    dtype = SAFETENSORS_DTYPE[plan.encoding.modulus_bits]
    masked: Layout = {key: (shape, dtype) for key, (shape, _) in
                      expected_layout(checks.layout, config.lora.r, checks.trains).items()}
    masked[WEIGHT_KEY] = ((1,), dtype)
    checks.masked = masked
    return plan


def secure_sum(config: FederationConfig, registry_key, round_dir: Path, parent: dict, checks: RoundChecks,
               quorum: int, warn, strict: bool = False) -> SecureSum:
    """Unmask the round's sum, or write the unmask request and raise Waiting, or raise Waiting for answers.
    strict: refuse the round (nothing written) when any update is rejected."""
    plan = prepare_checks(config, parent, checks)
    request = read_request(round_dir, config.coordinator_key)
    valid, rejected, equivocations = collect_round(round_dir, checks)
    valid = _with_shares(valid, rejected, plan.ctx.participants)
    if strict and rejected:
        first = rejected[0]
        raise BadInput(f"{round_dir / first['site']}: {first['reason']} (--strict: the round is not aggregated)")
    if request is None:
        _request_unmasking(config, registry_key, round_dir, parent, plan, valid, rejected, quorum, warn)
    _check_request(request, config, parent, plan, round_dir)
    survivors = {s["site"]: s for s in request["survivors"]}
    kept = []
    for update in valid:
        pinned = survivors.get(update.site)
        if pinned is None:
            rejected.append({"site": update.folder.name, "reason": f"arrived after the unmask request declared site "
                             f"{update.site} dropped; its masks cannot be removed without exposing it"})
        elif document_sha256(update.manifest) != pinned["manifest_sha256"]:
            rejected.append({"site": update.folder.name, "reason": "not the update the unmask request pinned "
                             "(replaced after the request was written)"})
        else:
            kept.append(update)
    lost = sorted(set(survivors) - {u.site for u in kept})
    if lost:
        reasons = {r["site"]: r["reason"] for r in rejected}
        raise BadInput(f"{round_dir}: the update of survivor {lost[0]} is missing or no longer valid "
                       f"({reasons.get(lost[0], 'not found')}); the round cannot be unmasked; nothing written")
    for item in rejected:
        warn(f"warning: {round_dir / item['site']}: rejected: {item['reason']}")
    answers = _answers(config, round_dir, request, warn)
    seeds, pairs = _secrets(config, round_dir, request, kept, answers, plan)
    total = _masked_sum(kept, checks.masked, plan.encoding.word)
    remove_masks(total, seeds, pairs, plan.encoding.modulus_bits)
    values = plan.encoding.decode(total)
    weight_total = float(values[-1])
    # Distributed DP fixes every weight at 1/n (n the roster) so one site's influence stays bounded.
    denominator = float(len(config.sites)) if config.privacy.mode == "distributed" else weight_total
    if denominator <= 0:
        raise BadInput(f"{round_dir}: the survivors' weights sum to {weight_total:g}; nothing to average")
    mean, start = {}, 0
    for key, (shape, _) in sorted((k, v) for k, v in checks.masked.items() if k != WEIGHT_KEY):
        size = int(np.prod(shape))
        mean[key] = torch.from_numpy(values[start:start + size].reshape(shape) / denominator).to(torch.float32)
        start += size
    dropped = sorted(set(plan.ctx.participants) - set(survivors))
    record = {
        "protocol": PROTOCOL, "participants": list(plan.ctx.participants), "survivors": sorted(survivors),
        "dropped": dropped, "responders": sorted(answers), "unanswered": sorted(set(survivors) - set(answers)),
        "threshold": plan.threshold, "modulus_bits": plan.encoding.modulus_bits,
        "scale_bits": plan.encoding.scale_bits, "bound": plan.encoding.bound, "weight_total": round(weight_total, 9),
        "request_sha256": document_sha256(request),
    }
    return SecureSum(mean, kept, rejected, equivocations, record)


def _with_shares(valid: list[Update], rejected: list[dict], holders: tuple[str, ...]) -> list[Update]:
    """An update whose sealed shares are missing or altered could never be rebuilt if its site went silent."""
    kept = []
    for update in valid:
        try:
            document = read_shares(update.folder, update.manifest["secagg"]["shares_sha256"])
            if document.site != update.site or document.round != update.manifest["round"] or \
                    sorted(document.shares) != sorted(holders):
                raise WireError(f"{SHARES_FILE}: not one share for each site of this round")
            kept.append(update)
        except WireError as why:
            rejected.append({"site": update.folder.name, "reason": str(why)})
    return kept


def _request_unmasking(config, registry_key, round_dir: Path, parent: dict, plan: RoundPlan, valid: list[Update],
                       rejected: list[dict], quorum: int, warn) -> None:
    """First run: fix who is in the sum, write the signed request, and wait for the answers."""
    for item in rejected:
        warn(f"warning: {round_dir / item['site']}: rejected: {item['reason']}")
    need = max(quorum, plan.threshold)
    if len(valid) < need:
        raise BadInput(f"{round_dir}: {len(valid)} valid masked update(s); secure aggregation needs at least {need} "
                       f"(quorum {quorum}, threshold {plan.threshold}) before it asks for unmasking; nothing written")
    survivors = sorted(valid, key=lambda u: u.site)
    dropped = sorted(set(plan.ctx.participants) - {u.site for u in survivors})
    fields = {
        "format": REQUEST_FORMAT, "federation": config.name, "round": plan.ctx.round,
        "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]},
        "participants": list(plan.ctx.participants),
        "survivors": [{"site": u.site, "manifest_sha256": document_sha256(u.manifest), "nonce": u.nonce}
                      for u in survivors],
        "dropped": dropped, "threshold": plan.threshold, "created": stamp()["created"],
    }
    write_request(round_dir, fields, registry_key)
    names = ", ".join(u.site for u in survivors)
    raise Waiting(f"{round_dir / REQUEST_FILE}: written; waiting for unmask answers from at least {plan.threshold} of "
                  f"the {len(survivors)} survivors ({names})" + (f"; dropped: {', '.join(dropped)}" if dropped else "")
                  + f". Each runs `fedtune unmask --round {round_dir}`, then run aggregate again")


def _check_request(request: dict, config: FederationConfig, parent: dict, plan: RoundPlan, round_dir: Path) -> None:
    expected = {"federation": config.name, "round": plan.ctx.round, "participants": list(plan.ctx.participants),
                "threshold": plan.threshold,
                "parent": {"version": parent["version"], "sha256": parent["adapter_sha256"]}}
    wrong = [key for key, value in expected.items() if request[key] != value]
    if wrong:
        raise BadInput(f"{round_dir / REQUEST_FILE}: made for another {', '.join(wrong)} than this round's; move the "
                       "round folder aside and start the round again")
    if not partitions(request):  # participants were checked above to be this round's
        raise BadInput(f"{round_dir / REQUEST_FILE}: does not split the sites into survivors and dropped")


def _answers(config: FederationConfig, round_dir: Path, request: dict, warn) -> dict[str, dict]:
    """The survivors' answers whose signature, request and contents check out; the others are named in a warning."""
    request_sha = document_sha256(request)
    survivors = [s["site"] for s in request["survivors"]]
    answers = {}
    folder = round_dir / RESPONSES_DIR
    listed = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in listed:
        site = path.name.removesuffix(".json")
        if path.name.startswith(".") or site not in survivors or path != response_path(round_dir, site):
            warn(f"warning: {path}: not the answer of a survivor of this round; ignored")
            continue
        try:
            answer = read_response(path, config.site_key(site), site)
        except WireError as err:
            warn(f"warning: {round_dir / RESPONSES_DIR}/{err}; ignored")
            continue
        problem = None
        if answer["site"] != site or answer["federation"] != config.name or answer["round"] != request["round"]:
            problem = "it names another site, federation or round"
        elif answer["request_sha256"] != request_sha:
            problem = "it answers another unmask request"
        elif set(answer["pairwise_seeds"]) != set(request["dropped"]):
            problem = "its pairwise seeds are not exactly those with the dropped sites"
        elif set(answer["self_mask_shares"]) - set(survivors):
            problem = "it reveals shares of a dropped site's self-mask"
        if problem:
            warn(f"warning: {path}: {problem}; ignored")
            continue
        answers[site] = answer
    return answers


def _secrets(config, round_dir: Path, request: dict, kept: list[Update], answers: dict[str, dict], plan: RoundPlan):
    """Every survivor's self-mask seed and every (survivor, dropped) pairwise seed, or Waiting for more answers."""
    survivors = [u.site for u in kept]
    dropped = request["dropped"]
    waiting_on = sorted(set(survivors) - set(answers))
    if len(answers) < plan.threshold:
        raise Waiting(f"{round_dir}: {len(answers)} of the {plan.threshold} unmask answers needed are in; waiting for "
                      f"{', '.join(waiting_on)} (`fedtune unmask --round {round_dir}`)")
    if dropped and waiting_on:
        # Only a survivor and the dropped site know their pairwise seed; the dropped one is gone.
        raise Waiting(f"{round_dir}: {', '.join(dropped)} dropped before sending, so every survivor's pairwise seed "
                      f"with it is needed; waiting for {', '.join(waiting_on)} (`fedtune unmask --round {round_dir}`)")
    seeds = {}
    for update in kept:
        expected = update.manifest["secagg"]["self_mask_commitment"]
        # A holder's share carries its own index (its place among the participants): no answer can pose as two.
        shares = [bytes.fromhex(a["self_mask_shares"][update.site]) for holder, a in answers.items()
                  if update.site in a["self_mask_shares"]
                  and share_index(bytes.fromhex(a["self_mask_shares"][update.site])) == plan.ctx.share_index(holder)]
        seed = combine_seed(shares, plan.threshold, expected) if len(shares) >= plan.threshold else None
        if seed is None:
            raise Waiting(f"{round_dir}: site {update.site}'s self-mask cannot be rebuilt from the {len(shares)} "
                          f"share(s) answered ({plan.threshold} consistent ones needed); waiting for more answers")
        seeds[update.site] = seed
    pairs = {(u, d): bytes.fromhex(answers[u]["pairwise_seeds"][d]) for u in survivors for d in dropped}
    return seeds, pairs


def _masked_sum(kept: list[Update], layout: Layout, word) -> np.ndarray:
    """Σ of the survivors' masked vectors modulo 2^k, one update file at a time (numpy's words wrap)."""
    order = sorted(k for k in layout if k != WEIGHT_KEY) + [WEIGHT_KEY]
    sizes = [int(np.prod(layout[k][0])) for k in order]
    total = np.zeros(sum(sizes), dtype=word)
    for update in kept:
        with safe_open(str(update.tensors), framework="numpy") as handle:
            start = 0
            for key, size in zip(order, sizes):
                total[start:start + size] += handle.get_tensor(key).reshape(-1)
                start += size
    return total


def describe(record: dict) -> str:
    """One line for the aggregate command."""
    return (f"secure aggregation: {len(record['survivors'])} survivor(s), "
            f"{len(record['dropped'])} dropped, {len(record['responders'])} answer(s) (t {record['threshold']}), "
            f"modulus 2^{record['modulus_bits']}, scale 2^-{record['scale_bits']}")

