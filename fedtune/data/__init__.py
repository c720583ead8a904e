"""On-site data preparation: read raw files, filter, scrub PII, tokenize, pack, split."""

from fedtune.data.prepare import prepare_site

__all__ = ["prepare_site"]
