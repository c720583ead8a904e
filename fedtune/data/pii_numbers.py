"""Number-shaped PII: phone numbers, payment card numbers and national IDs, as Presidio recognizers.

Phone numbers are found by their layout first, so that a number of any country is caught whatever the
federation's `data.pii.countries` say: an international prefix (`+CC`, `00CC`), a trunk `0`, an area code in
brackets, the 3-3-4 groups of North America, an extension (`x123`, `ext. 12`). A number without any of these
(`612 34 56 78`, `4155550100`) is a phone number only when phonenumbers finds it valid in the numbering plan
of one of those countries. Card numbers are 12 to 19 digits (ISO/IEC 7812) that pass Luhn; national IDs, of
the countries in `data.pii.countries`, pass their country's check (python-stdnum, or the rule written here).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable

import phonenumbers
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer import predefined_recognizers as pr

LANGUAGE = "en"
PHONE_ENTITY = "PHONE_NUMBER"
CARD_ENTITY = "CREDIT_CARD"
_SPACE = "[ \u00a0\u202f]"

# Dates and times are written with the same separators as phone numbers (31.01.2024, 2024-01-31, 08.00-17.00);
# they are blanked out before phone numbers are looked for, so that none is read as one, or as part of one.
_DATE_OR_TIME = re.compile(
    r"(?<![\w.,/-])(?:"
    r"[0-3]?\d([./-])[01]?\d\1(?:19|20)?\d{2}"      # 31.01.2024, 31/01/24
    r"|[01]?\d([./-])[0-3]?\d\2(?:19|20)?\d{2}"     # 01/31/2024
    r"|(?:19|20)\d{2}([./-])[01]?\d\3[0-3]?\d"      # 2024-01-31
    r"|[0-2]?\d[.:h][0-5]\d(?:\s?[-\u2013]\s?[0-2]?\d[.:h][0-5]\d)?"  # 08.30, 08.00-17.00
    r")(?![\w]|[.,/-]\d)"
)
# Digit groups joined by one separator each: a space, a dot, a dash or slash (spaces around it allowed), or a
# bracket ("+44 (0)20", "(0118)4960177"); then an optional extension. Not glued to a word or another number.
_PHONE_CHAIN = re.compile(
    rf"(?<![\w+/#\u2116-])(?<!\d[.,])(?:\+{_SPACE}?)?(?:\(\+?\d{{1,5}}\)|\d+)"
    rf"(?:(?:{_SPACE}?[-/]{_SPACE}?|\.|{_SPACE}|(?<=\))|(?=\())(?:\(\d{{1,5}}\)|\d+))*"
    rf"(?:{_SPACE}?(?:x|ext\.?|extn\.?|extension){_SPACE}?\d{{1,6}})?(?![\w]|[.,]\d)",
    re.IGNORECASE,
)
_EXTENSION = re.compile(rf"{_SPACE}?(?:x|ext\.?|extn\.?|extension){_SPACE}?\d{{1,6}}$", re.IGNORECASE)
_GROUP = re.compile(r"\(\+?\d+\)|\d+")
_NANP = re.compile(r"(?:\+?1[-. ]?)?(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}")
_BRACKETED_AREA = re.compile(r"\(\+?\d{2,5}\)")


def _phone_layout(text: str, digits: str, extension: bool) -> bool:
    """Whether `text` (no extension) is laid out as only a phone number is, in any country."""
    if text.startswith("+") or digits.startswith("00"):
        body = digits if text.startswith("+") else digits[2:]
        code = next((body[:n] for n in (1, 2, 3) if int(body[:n]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE), None)
        # E.164 numbers have at most 15 digits; the national part at least 6 (the shortest in use).
        if code is not None and len(body) <= 15 and len(body) - len(code) >= 6:
            return True
        if text.startswith("+"):
            return False
    if digits.startswith("0") and not digits.startswith("000") and not re.match(r"0\b", text):
        # a trunk 0 (or an international 00), not the 0 of 0.19906.3786 or a zero-padded 000123456
        return 8 <= len(digits) <= 13
    if _BRACKETED_AREA.match(text) or extension:
        return 8 <= len(digits) <= 13
    return bool(_NANP.fullmatch(text))


def phone_number_ok(text: str, regions: tuple[str, ...]) -> bool:
    """A phone number by its layout, or valid in the numbering plan of one of `regions` (empty: by layout only)."""
    extension = _EXTENSION.search(text)
    main = text[:extension.start()] if extension else text
    digits = re.sub(r"\D", "", main.replace("(0)", ""))
    if not 7 <= len(digits) <= 17:
        return False
    if _phone_layout(main, digits, extension is not None):
        return True
    for region in regions:
        # Where national numbers are dialled with a trunk 0 they are written with it; without it, the loose
        # plans (Germany's above all) would take order and reference numbers for phone numbers.
        if _trunk_prefix(region) == "0" and not digits.startswith("0"):
            continue
        try:
            number = phonenumbers.parse(main, region)
        except phonenumbers.NumberParseException:
            continue
        # phonenumbers drops what it does not need ('1177 4912 9510' reads as 774 912 9510); every digit
        # written must belong to the number, but a trunk prefix.
        national = phonenumbers.national_significant_number(number)
        if digits in (national, f"{_trunk_prefix(region)}{national}") and phonenumbers.is_valid_number(number):
            return True
    return False


@functools.cache
def _trunk_prefix(region: str) -> str | None:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return metadata.national_prefix if metadata else None


def _sub_chains(text: str, start: int, end: int):
    """(start, end, whole) spans of a chain of digit groups to try, longest first: the whole chain; without a
    first group of up to three digits and a space (a room or case number before the phone number); then shorter
    from the end (numbers after it). A part cut from the end counts only for its layout: some numbering plans
    hold nearly every 8- or 9-digit number, and any long chain has such a part."""
    groups = [m.span() for m in _GROUP.finditer(text, start, end)]
    yield start, end, True
    if len(groups) > 2 and groups[0][1] - groups[0][0] <= 3 and text[groups[0][1]].isspace():
        yield groups[1][0], end, True
    for last in range(len(groups) - 2, 0, -1):
        yield start, groups[last][1], False


class PhoneNumbers(EntityRecognizer):
    """Phone numbers of any country by layout, and of `regions` by their numbering plans (see the module)."""

    def __init__(self, regions: tuple[str, ...]):
        self.regions = regions
        super().__init__(supported_entities=[PHONE_ENTITY], supported_language=LANGUAGE, name="phone numbers")

    def load(self) -> None:
        pass

    def _first_number(self, text: str, start: int, end: int) -> tuple[int, int] | None:
        for s, e, whole in _sub_chains(text, start, end):
            span = text[s:e]
            if (")" in span or not span.startswith("(")) and phone_number_ok(span, self.regions if whole else ()):
                return s, e
        return None

    def analyze(self, text, entities, nlp_artifacts=None):
        masked = _DATE_OR_TIME.sub(lambda m: " " * len(m.group(0)), text)
        results = []
        for match in _PHONE_CHAIN.finditer(masked):
            begin = match.start()
            while (found := self._first_number(masked, begin, match.end())) is not None:
                results.append(RecognizerResult(PHONE_ENTITY, found[0], found[1], 0.5))
                # a chain may hold two numbers ("020 7946 0958 / 020 7946 0959")
                rest = re.search(r"[(+\d]", masked[found[1]:match.end()])
                if rest is None:
                    break
                begin = found[1] + rest.start()
        return results


# ------------------------------------------------------------------------------------------------ cards

# Digit groups joined by single spaces or dashes; a card is written in groups of four (or 4-6-5, 4-6-4) or not
# at all. The groups after the first hold three or more digits but the last (4111 1111 1111 1).
_CARD_CHAIN = re.compile(r"(?<![\w+/-])(?<!\d[.,])\d+(?:[ -]\d+)*(?![\w]|[.,]\d)")
# The digits of an IBAN-shaped string (valid or not: DE94 1001 0010 9605 6541 16) are not a card number.
_IBAN_HEAD = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4})*[ ]?$")


def card_number_ok(value: str) -> bool:
    from stdnum import luhn

    # No card's issuer number starts with 0 (ISO/IEC 7812's industry 0 issues none); a German mobile number
    # written 0157 363 53648 passes Luhn one time in ten.
    digits = re.sub(r"\D", "", value)
    return 12 <= len(digits) <= 19 and digits[0] != "0" and luhn.is_valid(digits)


class CardNumbers(EntityRecognizer):
    """Payment card numbers: 12 to 19 digits (ISO/IEC 7812: 12-digit Maestro, 15-digit JCB, 19-digit Visa, …)
    that pass Luhn, in groups of three or more digits (but the last: 4028 4960 7014 2). A run of groups that
    fails is a look-alike, not searched inside; only a run too long for a card, or one that ends in a short
    group ('4111 1111 1111 1111 2 days'), is tried shorter from the end."""

    def __init__(self):
        super().__init__(supported_entities=[CARD_ENTITY], supported_language=LANGUAGE, name="card numbers")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):
        results = []
        for match in _CARD_CHAIN.finditer(text):
            if _IBAN_HEAD.search(text, max(0, match.start() - 40), match.start()):
                continue
            groups = [(match.start() + m.start(), match.start() + m.end()) for m in re.finditer(r"\d+", match.group(0))]
            if len(groups) > 1 and groups[0][1] - groups[0][0] < 4:
                groups = groups[1:]  # "on 3 4111 1111 1111 1111": the card starts at the second group
            while groups and not any(e - s < 3 for s, e in groups[1:-1]):
                start, end = groups[0][0], groups[-1][1]
                if card_number_ok(text[start:end]):
                    results.append(RecognizerResult(CARD_ENTITY, start, end, 0.5))
                    break
                if sum(e - s for s, e in groups) <= 19 and groups[-1][1] - groups[-1][0] > 2:
                    break
                groups = groups[:-1]
        return results


# ------------------------------------------------------------------------------------------------ national IDs

def stdnum_check(module: str) -> Callable[[str], bool]:
    validator = importlib.import_module(f"stdnum.{module}")
    # Separators go first: some stdnum modules strip only '-' (us.ssn), but IDs are also written with spaces
    # or dots (123 45 6789), as the recognizers' patterns allow.
    return lambda value: validator.is_valid(re.sub(r"[\s./-]", "", value))


def _us_ssn(value: str) -> bool:
    # Written 123-45-6789 a number is an SSN whatever its area: generators and test data use the unissued
    # 000, 666 and 9xx areas. Grouped otherwise or not at all, it must follow the allocation rules.
    from stdnum.us import itin, ssn

    if re.fullmatch(r"\d{3}-\d{2}-\d{4}", value):
        return not itin.is_valid(value)
    return ssn.is_valid(re.sub(r"[\s.-]", "", value))


def _digit_sum(n: int) -> int:
    return n // 10 + n % 10


def _de_kvnr(value: str) -> bool:
    """Krankenversichertennummer: a letter (A=01 … Z=26), eight digits and a check digit (weights 1, 2)."""
    digits = f"{ord(value[0].upper()) - 64:02d}" + value[1:9]
    return sum(_digit_sum(int(d) * (1 + i % 2)) for i, d in enumerate(digits)) % 10 == int(value[9])


def _de_rvnr(value: str) -> bool:
    """Rentenversicherungsnummer: area, birth date (DDMMYY), a letter, serial and a check digit."""
    compact = re.sub(r"\s", "", value).upper()
    digits = compact[:8] + f"{ord(compact[8]) - 64:02d}" + compact[9:11]
    weights = (2, 1, 2, 5, 7, 1, 2, 1, 2, 1, 2, 1)
    return (int(compact[2:4]) <= 31 and 1 <= int(compact[4:6]) % 50 <= 12
            and sum(_digit_sum(int(d) * w) for d, w in zip(digits, weights)) % 10 == int(compact[11]))


def _es_nss(value: str) -> bool:
    """Número de la Seguridad Social: province, number and two control digits (mod 97)."""
    digits = re.sub(r"\D", "", value)
    return (int(digits[:2]) <= 53 or digits[:2] == "66") and int(digits[:10]) % 97 == int(digits[10:])


def _at_svnr(value: str) -> bool:
    """Sozialversicherungsnummer: stdnum checks the check digit only; the birth date must be a date too."""
    from stdnum.at import vnr

    digits = re.sub(r"\D", "", value)
    return vnr.is_valid(digits) and 1 <= int(digits[4:6]) <= 31 and 1 <= int(digits[6:8]) <= 12


def _pattern(entity: str, regex: str, score: float = 0.5) -> PatternRecognizer:
    return PatternRecognizer(supported_entity=entity, patterns=[Pattern(entity.lower(), regex, score)],
                             supported_language=LANGUAGE, global_regex_flags=re.MULTILINE)


def national_id_recognizers(country: str) -> list[tuple[object, str, Callable[[str], bool] | None]]:
    """(Presidio recognizer, placeholder type, validator) for one country's national IDs: one of PII_ID_COUNTRIES
    (fedtune.config), none for any other."""
    # Country recognizers are filed under their country's language; one language for all keeps one pass.
    if country == "US":
        ssn = r"\b\d{3}([- .]?)\d{2}\1\d{4}\b"
        return [(_pattern("US_SSN", ssn), "US_SSN", _us_ssn),
                (pr.UsItinRecognizer(supported_language=LANGUAGE), "US_ITIN", stdnum_check("us.itin"))]
    if country == "GB":
        # The National Insurance number has no check digit. Any letters are taken: the reserved prefixes and
        # suffixes (ZZ … T) are what generators and examples write.
        nino = r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-Z]\b"
        return [(_pattern("UK_NINO", nino), "UK_NINO", None),
                (pr.NhsRecognizer(supported_language=LANGUAGE), "UK_NHS", stdnum_check("gb.nhs"))]
    if country == "DE":
        # Steuer-IdNr: 11 digits, compact or grouped 2-3-3-3 as on tax letters; ISO 7064 mod 11,10 (stdnum).
        # Versichertennummer of the health insurance card (10 characters, sometimes followed by the 10 digits
        # of the card), and the pension insurance number.
        return [(_pattern("DE_TAX_ID", r"\b[1-9]\d ?\d{3} ?\d{3} ?\d{3}\b"), "DE_TAX_ID", stdnum_check("de.idnr")),
                (_pattern("DE_KVNR", r"\b[A-Z]\d{9}(?:\d{10})?\b"), "DE_KVNR", _de_kvnr),
                (_pattern("DE_RVNR", r"\b\d{2} ?\d{6} ?[A-Z] ?\d{3}\b"), "DE_RVNR", _de_rvnr)]
    if country == "FR":
        # Numéro de sécurité sociale (NIR): sex, year, month, department, commune, order, key.
        nir = r"\b[12][ .]?\d{2}[ .]?(?:0[1-9]|1[0-2]|[2-9]\d)[ .]?(?:\d{2}|2[AB])[ .]?\d{3}[ .]?\d{3}[ .]?\d{2}\b"
        return [(_pattern("FR_NIR", nir), "FR_NIR", stdnum_check("fr.nir"))]
    if country == "ES":
        return [(pr.EsNifRecognizer(supported_language=LANGUAGE), "ES_NIF", stdnum_check("es.nif")),
                (pr.EsNieRecognizer(supported_language=LANGUAGE), "ES_NIE", stdnum_check("es.nie")),
                (_pattern("ES_NSS", r"\b\d{2}[ /-]?\d{8}[ /-]?\d{2}\b"), "ES_NSS", _es_nss)]
    if country == "IT":
        return [(pr.ItFiscalCodeRecognizer(supported_language=LANGUAGE), "IT_FISCAL_CODE",
                 stdnum_check("it.codicefiscale"))]
    if country == "NL":
        # Burgerservicenummer: nine digits, optionally grouped 4-2-3, with the eleven-test as its checksum.
        return [(_pattern("NL_BSN", r"\b\d{4}[ .]?\d{2}[ .]?\d{3}\b", 0.3), "NL_BSN", stdnum_check("nl.bsn"))]
    if country == "AT":  # serial, check digit, birth date (DDMMYY)
        return [(_pattern("AT_SVNR", r"\b\d{4} ?\d{6}\b"), "AT_SVNR", _at_svnr)]
    if country == "BE":  # Rijksregisternummer / numéro national: birth date, serial, mod 97
        return [(_pattern("BE_NN", r"\b\d{2}[.]?\d{2}[.]?\d{2}[-.]?\d{3}[-.]?\d{2}\b"), "BE_NN", stdnum_check("be.nn"))]
    if country == "CA":  # Social Insurance Number, Luhn; written 3-3-3
        return [(_pattern("CA_SIN", r"\b\d{3}[- ]\d{3}[- ]\d{3}\b"), "CA_SIN", stdnum_check("ca.sin"))]
    if country == "CH":  # AHV-Nummer: 756, then EAN-13's check
        return [(_pattern("CH_AHV", r"\b756[.]?\d{4}[.]?\d{4}[.]?\d{2}\b"), "CH_AHV", stdnum_check("ch.ssn"))]
    if country == "PL":  # PESEL: birth date, serial, check digit
        return [(_pattern("PL_PESEL", r"\b\d{11}\b"), "PL_PESEL", stdnum_check("pl.pesel"))]
    if country == "SE":  # personnummer: birth date, serial, Luhn; written with its '-' (or '+' past 100)
        return [(_pattern("SE_PERSONNUMMER", r"\b(?:\d{2})?\d{6}[-+]\d{4}\b"), "SE_PERSONNUMMER",
                 stdnum_check("se.personnummer"))]
    return []
