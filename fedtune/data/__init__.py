"""On-site data preparation: read raw files; filter by length, language and quality; scrub PII; remove
exact and near duplicates; tokenize, pack and split; write the data card."""

from fedtune.data.prepare import prepare_site

__all__ = ["prepare_site"]
