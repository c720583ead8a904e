"""Record filters: length, exact duplicates, and a first pass of PII scrubbing."""

from __future__ import annotations

import hashlib
import re
import unicodedata

from fedtune.data.sources import Record

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# International (+CC …, grouped or compact E.164) or national formats (at least two digit groups) with
# 8 to 15 digits, allowing spaces, dots, dashes and parentheses.
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,12}(?:[ .-]\d{1,8}){0,5}"
    r"|(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,8}){1,4}"
    r")(?!\w)"
)
# Calendar dates (2024-01-31, 2024.01.31, 31.01.2024, 01-31-2024) are not phone numbers.
_DAY_OR_MONTH = r"(?:0?[1-9]|[12]\d|3[01])"
DATE = re.compile(
    rf"(?<!\d)(?:(?:19|20)\d{{2}}[-./]{_DAY_OR_MONTH}[-./]{_DAY_OR_MONTH}"
    rf"|{_DAY_OR_MONTH}[-./]{_DAY_OR_MONTH}[-./](?:19|20)\d{{2}})(?!\d)"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _phone_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    # Dates (2024-01-31), versions and short numbers are not phone numbers.
    if len(digits) < 8 or len(digits) > 15:
        return False
    if DATE.search(candidate):
        return False
    return candidate.strip().startswith("+") or len(re.findall(r"[ .()-]", candidate)) >= 1


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    """Replace emails, IBANs, card numbers (Luhn-valid) and phone numbers with typed placeholders."""

    def sub(pattern: re.Pattern, label: str, check=None):
        nonlocal text

        def repl(match: re.Match) -> str:
            value = match.group(0)
            if check is not None and not check(value):
                return value
            counts[label] = counts.get(label, 0) + 1
            return f"<{label}>"

        text = pattern.sub(repl, text)

    sub(EMAIL, "EMAIL")
    sub(IBAN, "IBAN", _iban_ok)
    sub(CARD, "CARD_NUMBER", lambda v: _luhn_ok(re.sub(r"\D", "", v)))
    sub(PHONE, "PHONE", _phone_ok)
    return text


def scrub_record(record: Record, counts: dict[str, int]) -> Record:
    if record.text is not None:
        return Record(text=scrub_pii(record.text, counts))
    return Record(messages=[{"role": m["role"], "content": scrub_pii(m["content"], counts)} for m in record.messages])


def normalized_key(record: Record) -> str:
    """Hash of the record's text, case- and whitespace-insensitive, for exact-duplicate removal."""
    parts = []
    if record.messages is not None:
        parts = [f"{m['role']}\x1f{m['content']}" for m in record.messages]
    else:
        parts = [record.text or ""]
    joined = "\x1e".join(" ".join(unicodedata.normalize("NFKC", p).lower().split()) for p in parts)
    return hashlib.sha256(joined.encode()).hexdigest()


def length_verdict(record: Record, min_chars: int, max_chars: int) -> str | None:
    """None to keep the record, else the drop reason."""
    contents = record.contents()
    size = sum(len(c.strip()) for c in contents)
    if size == 0:
        return "empty"
    if record.messages is not None and not any(m["role"] == "assistant" and m["content"].strip() for m in record.messages):
        return "no_answer"
    if size < min_chars:
        return "too_short"
    if size > max_chars:
        return "too_long"
    return None
