"""The data contract: what every site's prepared data must satisfy so that the federation trains one adapter
on one token space (tokenizer, chat template, seq_len), with enough data (min_tokens) scrubbed under one
PII policy. `prepare` records the check in the data card; `train-local` refuses a card that does not match."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedtune.config import FederationConfig
from fedtune.errors import BadInput


def chat_template_sha(tokenizer) -> str:
    template = tokenizer.chat_template
    return hashlib.sha256(template.encode()).hexdigest() if template else "none"


def pii_policy(config: FederationConfig, site_terms: int, ner: bool) -> dict:
    """The PII policy a card records: the federation's part (compared by train-local) and the site's own."""
    settings = config.data.pii
    shared = "\n".join(sorted(t.casefold() for t in settings.deny_list))
    return {
        "entities": sorted(settings.entities),
        "countries": sorted(settings.countries),
        "patterns": {name: settings.patterns[name] for name in sorted(settings.patterns)},
        "deny_list_sha256": hashlib.sha256(shared.encode()).hexdigest(),
        "site_deny_list_terms": site_terms,
        "person_names_by_ner": ner,
    }


FEDERATION_POLICY_KEYS = ("entities", "countries", "patterns", "deny_list_sha256")


def check_tokenizer(config: FederationConfig, fingerprint: str, template_sha: str, source: str) -> None:
    """Refuse a site whose tokenizer or chat template is not the federation's (prepare, before any work)."""
    contract = config.contract
    if contract.tokenizer and contract.tokenizer != fingerprint:
        raise BadInput(f"{source}: this site's tokenizer (fingerprint {fingerprint[:12]}) is not the federation's "
                       f"(contract.tokenizer {contract.tokenizer[:12]}); install the base model the federation names")
    if contract.chat_template and contract.chat_template != template_sha:
        raise BadInput(f"{source}: this site's chat template (sha256 {template_sha[:12]}) is not the federation's "
                       f"(contract.chat_template {contract.chat_template[:12]}); install the base model the federation names")


def contract_record(config: FederationConfig, fingerprint: str, template_sha: str, trained_tokens: int,
                    policy: dict) -> dict:
    """The card's `contract` block: what was checked and whether it holds."""
    problems = []
    if trained_tokens < config.contract.min_tokens:
        problems.append(f"the train split holds {trained_tokens} trained tokens; the federation requires "
                        f"contract.min_tokens {config.contract.min_tokens}")
    return {
        "tokenizer": fingerprint,
        "chat_template": template_sha,
        "seq_len": config.seq_len,
        "min_tokens": config.contract.min_tokens,
        "trained_tokens": trained_tokens,
        "pii_policy": policy,
        "satisfied": not problems,
        "problems": problems,
    }


def require_contract(card: dict, config: FederationConfig, fingerprint: str, template_sha: str, folder: Path) -> None:
    """train-local: refuse prepared data whose card does not match the federation, with one line."""
    where = folder / "data_card.json"
    recorded = card.get("contract")
    if not isinstance(recorded, dict):
        raise BadInput(f"{where}: records no data contract (prepared by an older fedtune); prepare again")
    wanted_tokenizer = config.contract.tokenizer or fingerprint
    if recorded.get("tokenizer") != wanted_tokenizer:
        raise BadInput(f"{where}: prepared with another tokenizer than the federation's; prepare again")
    if recorded.get("chat_template") != (config.contract.chat_template or template_sha):
        raise BadInput(f"{where}: prepared with another chat template than the federation's; prepare again")
    if recorded.get("seq_len") != config.seq_len:
        raise BadInput(f"{where}: prepared at seq_len {recorded.get('seq_len')}, the federation uses {config.seq_len}; prepare again")
    trained = int(recorded.get("trained_tokens", 0))
    if trained < config.contract.min_tokens:
        raise BadInput(f"{where}: the train split holds {trained} trained tokens, below the federation's "
                       f"contract.min_tokens {config.contract.min_tokens}; add data and prepare again")
    policy = recorded.get("pii_policy") or {}
    wanted = pii_policy(config, 0, False)
    for key in FEDERATION_POLICY_KEYS:
        if policy.get(key) != wanted[key]:
            raise BadInput(f"{where}: prepared under another PII policy (data.pii {key.split('_')[0]} differs from "
                           "federation.yaml); prepare again")
