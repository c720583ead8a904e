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
from collections.abc import Callable
from dataclasses import dataclass, field

# Before Presidio imports tldextract: its email check must use the suffix list bundled with tldextract.
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer import predefined_recognizers as pr
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig

from fedtune.config import DEFAULT_PII_COUNTRIES, PII_ENTITY_TYPES, PiiSettings
from fedtune.data.pii_numbers import CardNumbers, PhoneNumbers, card_number_ok, national_id_recognizers, stdnum_check

DENY_LIST_TYPE = "REDACTED"
PERSON_TYPE = "PERSON"
LANGUAGE = "en"  # Presidio files every recognizer under a language; the pattern recognizers are language-free.

# Phone numbers, card numbers, IBANs and every national ID but the Italian fiscal code hold a run of at least
# six digits, written together or grouped.
_PHONE_CANDIDATE = re.compile(r"\d(?:[\s().\-/]{0,3}\d){5}")
# Cheap tests for what a text could hold, so that a recognizer only runs where it could find something:
# most records have no '@', no dotted quad and no run of six digits, and then the analyzer is not called.
_GATES = {
    "EMAIL": re.compile(r"@"),
    "IP": re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|[0-9A-Fa-f]*:[0-9A-Fa-f]*:"),
    "IT_FISCAL_CODE": re.compile(r"[A-Za-z]{6}[0-9LMNPQRSTUVlmnpqrstuv]{2}[A-Za-z]"),
}
# A number right after an international prefix or an area code in brackets ('+34 883010748', '1-174-537-8383',
# '+43 (0) 2724 82447577', '(351) 923803236'), or followed by an extension ('267-428-4269 x693'), is (part of)
# a phone number, whatever checksum it passes.
_PHONE_BEFORE = re.compile(r"(?:\+\d{0,3}[\s.-]?(?:\(0\)[\s.-]?)?|\(\+?\d{1,5}\)[\s.-]?|(?<![\w.,-])1[-.])$")
_PHONE_AFTER = re.compile(r"\s?(?:x|ext\.?|extn\.?)\s?\d", re.IGNORECASE)


def _gates(recognizer, placeholder: str) -> tuple[re.Pattern, re.Pattern | None]:
    """The cheap tests a text must pass before `recognizer` runs on it: one shared by many recognizers, then
    (or None) one of its own."""
    if placeholder in _GATES:
        return _GATES[placeholder], None
    if type(recognizer) is PatternRecognizer:
        # A national ID's own patterns, searched with `re` (without the validators, case-blind: a superset of
        # what the recognizer finds) where the text has digits: far cheaper than the analyzer's pass.
        own = re.compile("|".join(f"(?:{p.regex})" for p in recognizer.patterns), re.IGNORECASE | re.MULTILINE)
        return _PHONE_CANDIDATE, own
    return _PHONE_CANDIDATE, None


class _NoContext(ContextAwareEnhancer):
    """Context words need the tokens of an NLP model; with none, looking them up only costs time."""

    def __init__(self):
        super().__init__(context_similarity_factor=0, min_score_with_context_similarity=0,
                         context_prefix_count=0, context_suffix_count=0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return raw_results


class _Iban(pr.IbanRecognizer):
    """Presidio tries a match with and without its optional last groups and keeps the first its own check
    accepts; that check can pass 'ES29…2195 W' (an IBAN before a capitalised word), which stdnum then rejects,
    losing the IBAN. With stdnum's check here, the shorter, valid span is kept."""

    _check = staticmethod(stdnum_check("iban"))

    def validate_result(self, pattern_text: str) -> bool:
        return self._check(pattern_text)


class DenyListTerms:
    """Site-supplied terms (names, project codes), matched case-insensitively on word boundaries.

    A set lookup over word windows: unlike one big regex alternation, its cost does not grow with the
    number of terms, so a deny-list of thousands of patient names stays cheap.
    """

    # Joiners keep "Mary-Jane" and "O'Brien" one word; a possessive 's is not part of the word ("Okonkwo's").
    WORD = re.compile(r"\w+(?:[-.]\w+|'(?!s\b)\w+)*")

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


class _DenyList(EntityRecognizer):
    def __init__(self, terms: DenyListTerms):
        self.terms = terms
        super().__init__(supported_entities=[DENY_LIST_TYPE], supported_language=LANGUAGE, name="deny-list")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):
        return [RecognizerResult(DENY_LIST_TYPE, start, end, 1.0) for start, end in self.terms.find(text)]


@dataclass
class PiiPolicy:
    """What to replace: the data.pii settings a site prepares under (the federation's, and what the site adds),
    its own deny-list terms and NER model. NATIONAL_ID stands for the national IDs of the configured countries."""

    entities: list[str] = field(default_factory=lambda: list(PII_ENTITY_TYPES))
    countries: list[str] = field(default_factory=lambda: list(DEFAULT_PII_COUNTRIES))
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
        wanted = set(policy.entities)
        # (recognizer, placeholder type, stdnum validator or None)
        table: list[tuple[object, str, Callable[[str], bool] | None]] = []
        if "EMAIL" in wanted:
            table.append((pr.EmailRecognizer(), "EMAIL", None))
        if "PHONE" in wanted:
            table.append((PhoneNumbers(tuple(policy.countries)), "PHONE", None))
        if "CARD" in wanted:
            table.append((CardNumbers(), "CARD", card_number_ok))
        if "IBAN" in wanted:
            table.append((_Iban(), "IBAN", stdnum_check("iban")))
        if "IP" in wanted:
            table.append((pr.IpRecognizer(), "IP", None))
        if "NATIONAL_ID" in wanted:
            for country in policy.countries:
                table.extend(national_id_recognizers(country))
        always = []  # recognizers that also run on texts without digits
        for name, regex in policy.patterns.items():
            recognizer = PatternRecognizer(supported_entity=name, patterns=[Pattern(name.lower(), regex, 1.0)],
                                           supported_language=LANGUAGE, global_regex_flags=re.MULTILINE)
            table.append((recognizer, name, None))
            always.append(name)
        if policy.deny_list:
            table.append((_DenyList(DenyListTerms(policy.deny_list)), DENY_LIST_TYPE, None))
            always.append(DENY_LIST_TYPE)
        if policy.ner_model:
            table.append((_ner_recognizer(policy.ner_model), PERSON_TYPE, None))
            always.append(PERSON_TYPE)

        registry = RecognizerRegistry(supported_languages=[LANGUAGE])
        self._placeholder: dict[str, str] = {}
        self._validator: dict[str, Callable[[str], bool]] = {}
        # cheap test → (the recognizer's own test or None → entities): see _gates
        gated: dict[re.Pattern, dict[re.Pattern | None, list[str]]] = {}
        for recognizer, placeholder, validator in table:
            registry.add_recognizer(recognizer)
            for entity in recognizer.supported_entities:
                self._placeholder[entity] = placeholder
                if validator is not None:
                    self._validator[entity] = validator
                if placeholder not in always:
                    gate, own = _gates(recognizer, placeholder)
                    gated.setdefault(gate, {}).setdefault(own, []).append(entity)
        self._gated = [(gate, list(inner.items())) for gate, inner in gated.items()]
        engine = NoOpNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "none"}])
        engine.load()
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=[LANGUAGE],
                                        context_aware_enhancer=_NoContext())
        self._anonymizer = AnonymizerEngine()
        self._operators = {e: OperatorConfig("replace", {"new_value": f"<{p}>"}) for e, p in self._placeholder.items()}
        self._always = sorted(e for e, p in self._placeholder.items() if p in always)

    def _confirmed(self, text: str, entities: list[str]) -> list:
        """Presidio's findings in `text` that survive the checksums (and phone spans trimmed of brackets)."""
        confirmed = []
        for result in self._analyzer.analyze(text, language=LANGUAGE, entities=entities):
            validator = self._validator.get(result.entity_type)
            if validator is not None:
                if (_PHONE_BEFORE.search(text, max(0, result.start - 12), result.start)
                        or _PHONE_AFTER.match(text, result.end)):
                    continue  # '+4915163201630' passes Luhn, but it is a phone number, not a card
                if not validator(text[result.start:result.end]):
                    continue  # a checksum says this is not the ID it looks like
                result.score = 1.0  # a confirmed checksum outranks an overlapping phone-number guess
            confirmed.append(result)
        return confirmed

    def scrub(self, text: str, counts: Counter) -> str:
        """Return `text` with every confirmed PII span replaced; adds one count per replacement to `counts`."""
        if not text:
            return text
        entities = list(self._always)
        for gate, inner in self._gated:
            if gate.search(text):
                entities += [e for own, group in inner if own is None or own.search(text) for e in group]
        phones = [e for e in entities if self._placeholder[e] == "PHONE"]
        others = [e for e in entities if self._placeholder[e] != "PHONE"]
        confirmed = self._confirmed(text, others) if others else []
        if phones:
            # Phone numbers are looked for outside the IDs a checksum confirmed: a card number or an IBAN
            # is not a phone number, and phonenumbers' matcher would spend most of its time inside them.
            masked = text
            for result in confirmed:
                if result.entity_type in self._validator:
                    masked = masked[:result.start] + " " * (result.end - result.start) + masked[result.end:]
            confirmed += self._confirmed(masked, phones)
        if not confirmed:
            return text
        result = self._anonymizer.anonymize(text, confirmed, operators=self._operators)
        for item in result.items:
            counts[self._placeholder.get(item.entity_type, item.entity_type)] += 1
        return result.text


class _SpacyPersons(EntityRecognizer):
    """PERSON entities of a spaCy pipeline (only its tokenizer, tok2vec and ner run)."""

    def __init__(self, nlp):
        self.nlp = nlp
        super().__init__(supported_entities=[PERSON_TYPE], supported_language=LANGUAGE, name="spacy persons")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):
        return [RecognizerResult(PERSON_TYPE, e.start_char, e.end_char, 0.85)
                for e in self.nlp(text).ents if e.label_ in ("PERSON", "PER")]


def _ner_recognizer(model: str):
    """Person names from a model the site already has (never downloaded): a token-classification model folder
    (Hugging Face, saved with save_pretrained), or a spaCy pipeline, as an installed package name or a folder."""
    from pathlib import Path

    import spacy

    from fedtune.errors import BadInput

    folder = Path(model)
    if (folder / "config.json").is_file():
        from presidio_analyzer.predefined_recognizers.ner.huggingface_ner_recognizer import (
            HuggingFaceNerRecognizer,
        )

        os.environ["HF_HUB_OFFLINE"] = "1"
        return HuggingFaceNerRecognizer(
            supported_entities=[PERSON_TYPE], supported_language=LANGUAGE, model_name=str(folder),
            label_mapping={"PER": PERSON_TYPE, "PERSON": PERSON_TYPE}, device="cpu",
        )  # Presidio loads the pipeline in the constructor
    if (folder / "config.cfg").is_file() or (not folder.exists() and spacy.util.is_package(model)):
        nlp = spacy.load(model, exclude=["tagger", "parser", "senter", "lemmatizer", "attribute_ruler"])
        labels = {label for name in nlp.pipe_names for label in getattr(nlp.get_pipe(name), "labels", ())}
        if not labels & {"PERSON", "PER"}:
            raise BadInput(f"{model}: this spaCy pipeline finds no PERSON entities; give one with a ner component "
                           "that does (e.g. en_core_web_sm)")
        return _SpacyPersons(nlp)
    raise BadInput(f"{model}: not a token-classification model folder (no config.json), a spaCy pipeline folder (no "
                   "config.cfg) or an installed spaCy package; give --ner-model one of those")
