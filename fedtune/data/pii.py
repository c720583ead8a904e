"""PII scrubbing: Presidio's pattern recognizers find candidates, python-stdnum checksums confirm them, and
Presidio's anonymizer writes typed placeholders (`<EMAIL>`, `<PHONE>`, …).

No NLP model runs unless a site points at one it already has: the analyzer uses Presidio's NoOpNlpEngine, so
nothing is downloaded. Presidio's email recognizer would fetch the public-suffix list through tldextract;
the environment variable below stops that before tldextract is imported.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from fedtune.config import PII_ENTITY_TYPES, PiiSettings

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

DENY_LIST_TYPE = "REDACTED"
PERSON_TYPE = "PERSON"
LANGUAGE = "en"  # Presidio files every recognizer under a language; the pattern recognizers are language-free.

# Texts without a digit, '@' or ':' cannot hold an email, phone, card, IBAN, IP or national ID; the
# number recognizers are skipped for them (most clean prose), which is most of the analyzer's cost.
_MAY_HOLD_NUMBERS = re.compile(r"[\d@:]")


def _stdnum_check(module: str) -> Callable[[str], bool]:
    import importlib

    validator = importlib.import_module(f"stdnum.{module}")
    return validator.is_valid


def _card_ok(value: str) -> bool:
    from stdnum import luhn

    digits = re.sub(r"\D", "", value)
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _national_id_recognizers(country: str) -> list[tuple[object, str, Callable[[str], bool] | None]]:
    """(Presidio recognizer, placeholder type, stdnum validator) for one country's national IDs."""
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer import predefined_recognizers as pr

    def pattern(entity: str, regex: str, score: float = 0.5):
        return PatternRecognizer(supported_entity=entity, patterns=[Pattern(entity.lower(), regex, score)],
                                 supported_language=LANGUAGE, global_regex_flags=re.MULTILINE)

    # Country recognizers are filed under their country's language; one language for all keeps one pass.
    if country == "US":
        return [(pr.UsSsnRecognizer(supported_language=LANGUAGE), "US_SSN", _stdnum_check("us.ssn")),
                (pr.UsItinRecognizer(supported_language=LANGUAGE), "US_ITIN", _stdnum_check("us.itin"))]
    if country == "GB":
        # The National Insurance number has no check digit; its letter rules are Presidio's.
        return [(pr.UkNinoRecognizer(supported_language=LANGUAGE), "UK_NINO", None), (pr.NhsRecognizer(supported_language=LANGUAGE), "UK_NHS", _stdnum_check("gb.nhs"))]
    if country == "DE":
        return [(pr.DeTaxIdRecognizer(supported_language=LANGUAGE), "DE_TAX_ID", _stdnum_check("de.idnr"))]
    if country == "FR":
        # Numéro de sécurité sociale (NIR): sex, year, month, department, commune, order, key.
        nir = r"\b[12][ .]?\d{2}[ .]?(?:0[1-9]|1[0-2]|[2-9]\d)[ .]?(?:\d{2}|2[AB])[ .]?\d{3}[ .]?\d{3}[ .]?\d{2}\b"
        return [(pattern("FR_NIR", nir), "FR_NIR", _stdnum_check("fr.nir"))]
    if country == "ES":
        return [(pr.EsNifRecognizer(supported_language=LANGUAGE), "ES_NIF", _stdnum_check("es.nif")),
                (pr.EsNieRecognizer(supported_language=LANGUAGE), "ES_NIE", _stdnum_check("es.nie"))]
    if country == "IT":
        return [(pr.ItFiscalCodeRecognizer(supported_language=LANGUAGE), "IT_FISCAL_CODE", _stdnum_check("it.codicefiscale"))]
    if country == "NL":
        # Burgerservicenummer: nine digits, optionally grouped 4-2-3, with the eleven-test as its checksum.
        return [(pattern("NL_BSN", r"\b\d{4}[ .]?\d{2}[ .]?\d{3}\b", 0.3), "NL_BSN", _stdnum_check("nl.bsn"))]
    return []


class DenyListRecognizer:
    """Site-supplied terms (names, project codes), matched case-insensitively on word boundaries.

    A set lookup over word windows: unlike one big regex alternation, its cost does not grow with the
    number of terms, so a deny-list of thousands of patient names stays cheap.
    """

    WORD = re.compile(r"\w+(?:[-'.]\w+)*")

    def __init__(self, terms: list[str]):
        self.terms = {self._key(t) for t in terms if t.strip()}
        self.max_words = max((len(t.split(" ")) for t in self.terms), default=0)

    @classmethod
    def _key(cls, term: str) -> str:
        return " ".join(m.group(0).casefold() for m in cls.WORD.finditer(term))

    def find(self, text: str) -> list[tuple[int, int]]:
        words = [(m.start(), m.end(), m.group(0).casefold()) for m in self.WORD.finditer(text)]
        spans, i = [], 0
        while i < len(words):
            for n in range(min(self.max_words, len(words) - i), 0, -1):
                if " ".join(w[2] for w in words[i:i + n]) in self.terms:
                    spans.append((words[i][0], words[i + n - 1][1]))
                    i += n
                    break
            else:
                i += 1
        return spans


def _presidio_deny_recognizer(deny: DenyListRecognizer):
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class _Recognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            return [RecognizerResult(DENY_LIST_TYPE, start, end, 1.0) for start, end in deny.find(text)]

    return _Recognizer(supported_entities=[DENY_LIST_TYPE], supported_language=LANGUAGE, name="deny-list")


@dataclass
class PiiPolicy:
    """What to replace: the federation's data.pii settings plus this site's own deny-list and NER model.
    NATIONAL_ID stands for the national IDs of the configured countries."""

    entities: list[str] = field(default_factory=lambda: list(PII_ENTITY_TYPES))
    countries: list[str] = field(default_factory=lambda: ["US"])
    patterns: dict[str, str] = field(default_factory=dict)
    deny_list: list[str] = field(default_factory=list)
    ner_model: str | None = None

    @classmethod
    def of(cls, settings: PiiSettings, site_terms: list[str], ner_model: str | None) -> PiiPolicy:
        return cls(list(settings.entities), list(settings.countries), dict(settings.patterns),
                   list(settings.deny_list) + list(site_terms), ner_model)


class PiiScrubber:
    """Replaces PII in text with typed placeholders; `scrub` returns the new text and counts per type."""

    def __init__(self, policy: PiiPolicy):
        from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
        from presidio_analyzer import predefined_recognizers as pr
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        wanted = set(policy.entities)
        # (recognizer, placeholder type, stdnum validator or None)
        table: list[tuple[object, str, Callable[[str], bool] | None]] = []
        if "EMAIL" in wanted:
            table.append((pr.EmailRecognizer(), "EMAIL", None))
        if "PHONE" in wanted:
            # Leniency 1 keeps numbers valid in the numbering plan of one of the federation's countries; an
            # international (+CC) number is recognized whichever country it belongs to.
            table.append((pr.PhoneRecognizer(supported_regions=tuple(policy.countries), leniency=1), "PHONE", None))
        if "CARD" in wanted:
            table.append((pr.CreditCardRecognizer(), "CARD", _card_ok))
        if "IBAN" in wanted:
            table.append((pr.IbanRecognizer(), "IBAN", _stdnum_check("iban")))
        if "IP" in wanted:
            table.append((pr.IpRecognizer(), "IP", None))
        if "NATIONAL_ID" in wanted:
            for country in policy.countries:
                table.extend(_national_id_recognizers(country))
        always = []  # recognizers that also run on texts without digits
        for name, regex in policy.patterns.items():
            recognizer = PatternRecognizer(supported_entity=name, patterns=[Pattern(name.lower(), regex, 1.0)],
                                           supported_language=LANGUAGE, global_regex_flags=re.MULTILINE)
            table.append((recognizer, name, None))
            always.append(name)
        if policy.deny_list:
            table.append((_presidio_deny_recognizer(DenyListRecognizer(policy.deny_list)), DENY_LIST_TYPE, None))
            always.append(DENY_LIST_TYPE)
        if policy.ner_model:
            table.append((_ner_recognizer(policy.ner_model), PERSON_TYPE, None))
            always.append(PERSON_TYPE)

        registry = RecognizerRegistry(supported_languages=[LANGUAGE])
        self._placeholder: dict[str, str] = {}
        self._validator: dict[str, Callable[[str], bool]] = {}
        for recognizer, placeholder, validator in table:
            registry.add_recognizer(recognizer)
            for entity in recognizer.supported_entities:
                self._placeholder[entity] = placeholder
                if validator is not None:
                    self._validator[entity] = validator
        engine = NoOpNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "none"}])
        engine.load()
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=[LANGUAGE])
        self._anonymizer = AnonymizerEngine()
        self._operators = {e: OperatorConfig("replace", {"new_value": f"<{p}>"}) for e, p in self._placeholder.items()}
        self._all = sorted(self._placeholder)
        self._always = sorted(e for e, p in self._placeholder.items() if p in always)

    def scrub(self, text: str, counts: Counter) -> str:
        """Return `text` with every confirmed PII span replaced; adds one count per replacement to `counts`."""
        entities = self._all if _MAY_HOLD_NUMBERS.search(text) else self._always
        if not entities or not text:
            return text
        found = self._analyzer.analyze(text, language=LANGUAGE, entities=entities)
        confirmed = []
        for result in found:
            validator = self._validator.get(result.entity_type)
            if validator is not None:
                if not validator(text[result.start:result.end]):
                    continue  # a checksum says this is not the ID it looks like
                result.score = 1.0  # a confirmed checksum outranks an overlapping phone-number guess
            confirmed.append(result)
        if not confirmed:
            return text
        result = self._anonymizer.anonymize(text, confirmed, operators=self._operators)
        for item in result.items:
            counts[self._placeholder.get(item.entity_type, item.entity_type)] += 1
        return result.text


def _ner_recognizer(model_path: str):
    """Person names from a token-classification model the site already has on disk (never downloaded)."""
    from pathlib import Path

    from presidio_analyzer.predefined_recognizers.ner.huggingface_ner_recognizer import HuggingFaceNerRecognizer

    from fedtune.errors import BadInput

    if not (Path(model_path) / "config.json").is_file():
        raise BadInput(f"{model_path}: not a local token-classification model folder (no config.json); "
                       "give --ner-model a folder saved with save_pretrained")
    os.environ["HF_HUB_OFFLINE"] = "1"
    recognizer = HuggingFaceNerRecognizer(
        supported_entities=[PERSON_TYPE], supported_language=LANGUAGE, model_name=str(model_path),
        label_mapping={"PER": PERSON_TYPE, "PERSON": PERSON_TYPE}, device="cpu",
    )  # Presidio loads the pipeline in the constructor
    return recognizer
