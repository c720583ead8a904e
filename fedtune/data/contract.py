"""The data contract: what every site's prepared data must satisfy so that the federation trains one adapter
on one token space (tokenizer, chat template, seq_len), with enough data (min_tokens) scrubbed under at least
the federation's PII policy. `prepare` records the check in the data card; `train-local` refuses a card that
does not match, or whose PII policy is weaker than the federation's (a stricter site is welcome)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedtune.config import PII_ENTITY_TYPES, PII_ID_COUNTRIES, FederationConfig, PiiSettings
from fedtune.errors import BadInput


def _term_sha(term: str) -> str:
    return hashlib.sha256(term.strip().casefold().encode()).hexdigest()


def _list_sha(terms: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(t.casefold() for t in terms)).encode()).hexdigest()


def site_pii_settings(federation: PiiSettings, countries: list[str] | None = None, entities: list[str] | None = None,
                      patterns: dict[str, str] | None = None) -> PiiSettings:
    """The PII policy a site prepares under: the federation's data.pii and what the site adds to it (more
    countries, entity types or patterns; never fewer). Refuses a site pattern that reuses a federation pattern's
    name with another regex, and anything data.pii itself would refuse."""
    from pydantic import ValidationError

    patterns = patterns or {}
    clashes = [n for n, regex in patterns.items() if n in federation.patterns and federation.patterns[n] != regex]
    if clashes:
        raise BadInput(f"--pii-pattern {clashes[0]}: the federation's data.pii.patterns already has {clashes[0]} with "
                       "another regex; give this site's pattern another name")
    try:
        return PiiSettings(
            entities=list(dict.fromkeys([*federation.entities, *(entities or [])])),
            countries=[*federation.countries, *(countries or [])],
            patterns={**federation.patterns, **patterns},
            deny_list=list(federation.deny_list),
        )
    except ValidationError as err:
        option = {"entities": "--pii-entity", "countries": "--pii-country", "patterns": "--pii-pattern"}
        problems = "; ".join(f"{option.get(e['loc'][0], e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise BadInput(f"prepare: {problems}") from None


def pii_policy(config: FederationConfig, site_terms: int, ner: bool, applied: PiiSettings | None = None) -> dict:
    """The PII policy a card records: what was applied (the federation's data.pii plus the site's additions), the
    federation deny-list terms it covered (as hashes: they are in federation.yaml; the site's own terms are
    only counted, never hashed, as a name's hash can be guessed) and the site's own means."""
    federation = config.data.pii
    applied = applied or federation
    return {
        "entities": sorted(applied.entities),
        "countries": sorted(applied.countries),
        "patterns": {name: applied.patterns[name] for name in sorted(applied.patterns)},
        "deny_list_sha256": _list_sha(federation.deny_list),
        "deny_list_term_sha256": sorted({_term_sha(t) for t in federation.deny_list}),
        "site_deny_list_terms": site_terms,
        "site_added": {"entities": sorted(set(applied.entities) - set(federation.entities)),
                       "countries": sorted(set(applied.countries) - set(federation.countries)),
                       "patterns": sorted(set(applied.patterns) - set(federation.patterns))},
        "person_names_by_ner": ner,
    }


def pii_policy_gaps(recorded: dict, federation: PiiSettings) -> list[str]:
    """Where a card's recorded PII policy is weaker than the federation's data.pii (empty: it covers it). A
    site may have been stricter: more entity types, countries, patterns or deny-list terms are fine."""
    gaps = []
    for key in ("entities", "countries"):
        missing = sorted(set(getattr(federation, key)) - set(recorded.get(key) or []))
        if missing:
            gaps.append(f"{key} {', '.join(missing)} not applied")
    patterns = recorded.get("patterns") or {}
    for name, regex in sorted(federation.patterns.items()):
        if name not in patterns:
            gaps.append(f"patterns {name} not applied")
        elif patterns[name] != regex:
            gaps.append(f"patterns {name} had another regex")
    if "deny_list_term_sha256" in recorded:
        covered = set(recorded["deny_list_term_sha256"])
        missing = sum(_term_sha(t) not in covered for t in federation.deny_list)
        if missing:
            gaps.append(f"deny_list: {missing} term(s) not applied")
    elif recorded.get("deny_list_sha256") != _list_sha(federation.deny_list):  # a card from before per-term hashes
        gaps.append("deny_list differs")
    return gaps


def pii_not_scanned(applied: PiiSettings, ner: bool) -> dict[str, str]:
    """What `prepare` did not look for, and how to have it looked for: the card says it, every time."""
    gaps = {}
    if not ner:
        gaps["person names"] = ("give --ner-model (a token-classification model folder or a spaCy pipeline) "
                                "or --deny-list FILE")
    for entity in PII_ENTITY_TYPES:
        if entity not in applied.entities:
            gaps[entity] = "left out by data.pii.entities; add it there, or with --pii-entity for this site"
    if "NATIONAL_ID" in applied.entities:
        unchecked = [c for c in applied.countries if c not in PII_ID_COUNTRIES]
        if unchecked:
            gaps[f"national IDs of {', '.join(unchecked)}"] = ("no check for them here; add their format to "
                                                               "data.pii.patterns, or --pii-pattern NAME=REGEX")
        addable = [c for c in PII_ID_COUNTRIES if c not in applied.countries]
        no_check = "no check here: add their format to data.pii.patterns, or --pii-pattern NAME=REGEX"
        gaps["national IDs of countries not in data.pii.countries"] = (
            f"add {', '.join(addable)} there (--pii-country for this site); other countries have {no_check}"
            if addable else no_check)
    if "PHONE" in applied.entities:
        gaps["local phone numbers of countries not in data.pii.countries"] = (
            "found only when written with +CC, a trunk 0, an area code in brackets or an extension; add the country")
    gaps["postal addresses, dates of birth, record and account numbers"] = (
        "add their formats to data.pii.patterns, or --pii-pattern NAME=REGEX for this site")
    return gaps


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
    gaps = pii_policy_gaps(recorded.get("pii_policy") or {}, config.data.pii)
    if gaps:
        raise BadInput(f"{where}: prepared under another PII policy, weaker than federation.yaml's data.pii "
                       f"({'; '.join(gaps)}); prepare again")
