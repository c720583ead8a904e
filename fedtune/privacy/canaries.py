"""Canaries: random secret records that `prepare --canaries N` plants in a site's training split, so that
`fedtune audit` can measure how much of a record an adapter memorizes (Carlini et al., "The Secret Sharer",
USENIX Security 2019).

A canary is a conversation like the site's own: "What is the access code for account K7QZP?" answered by a
random secret of six digits (10⁶ secrets). Every candidate secret of a canary should take the same number of
tokens, so that all are scored alike and in equal-length batches. Plain digits ("409127") do on tokenizers that
split digits one by one or in fixed groups (six tokens on SmolLM2's and on the tests' tokenizer) and cost about
half as much to score as digits separated by spaces ("4 0 9 1 2 7": eleven tokens on both, a digit and a space
each), which `prepare` falls back to when plain digits vary in length (BPE vocabularies that merge digit runs).
Tags and secrets come from the OS's random source, never from the federation's seed, so nobody can recompute
them from a config.
The canaries stay in `<prepared>/canaries.json` (mode 0600) beside the tokens; the data card says only how many.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.errors import BadInput, StageFailed

CANARIES_FILE = "canaries.json"
CANARIES_FORMAT = "fedtune.canaries/1"
PROMPT_TEMPLATE = "What is the access code for account {tag}?"
TAG_ALPHABET = string.ascii_uppercase + string.digits
TAG_LENGTH = 5


@dataclass(frozen=True)
class SecretFormat:
    """`digits` random decimal digits joined by `separator`: the space of secrets has 10**digits members."""

    digits: int = 6
    separator: str = " "

    @property
    def space(self) -> int:
        return 10 ** self.digits

    def render(self, number: int) -> str:
        """The secret numbered `number` (0 ≤ number < space), leading zeros kept."""
        return self.separator.join(f"{number:0{self.digits}d}")

    def number(self, secret: str) -> int:
        """The inverse of render."""
        return int(secret.replace(self.separator, "") if self.separator else secret)

    def random(self) -> str:
        return self.render(secrets.randbelow(self.space))

    def to_json(self) -> dict:
        return {"kind": "digits", "digits": self.digits, "separator": self.separator}

    @classmethod
    def from_json(cls, value: dict, source: str) -> SecretFormat:
        if not isinstance(value, dict) or value.get("kind") != "digits" or not isinstance(value.get("digits"), int) \
                or not isinstance(value.get("separator"), str) or not 1 <= value["digits"] <= 18:
            raise BadInput(f"{source}: its secret format is not one fedtune knows; prepare the folder again")
        return cls(value["digits"], value["separator"])


DEFAULT_FORMAT = SecretFormat()
PLAIN_FORMAT = SecretFormat(6, "")


@dataclass(frozen=True)
class Canary:
    prompt: str
    secret: str
    repeats: int = 1

    def messages(self, secret: str | None = None) -> list[dict]:
        """The canary as a conversation (with another secret in its place when `secret` is given)."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.secret if secret is None else secret}]


@dataclass(frozen=True)
class CanarySet:
    """What canaries.json holds: the secrets' format, the canaries, and the rows of train.parquet they are in."""

    site: str
    format: SecretFormat
    canaries: list[Canary]
    rows: list[int]


def secret_tokens(tokenizer, canary: Canary, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
    """The canary's prompt tokens and each candidate secret's tokens, split as `prepare` tokenizes the
    conversation: the answer's tokens are those that start inside it (the end-of-turn tokens after it are left
    out, so a candidate is scored on its own characters only)."""
    before = tokenizer.apply_chat_template(canary.messages()[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(canary.messages(), tokenize=False)
    start, end = len(before), len(before) + len(canary.secret)
    if full[:start] != before or full[start:end] != canary.secret:
        raise StageFailed("the chat template does not render the canary's prompt and secret as they are; "
                          "exposure cannot be measured with this tokenizer")
    # Rendering the template once per candidate costs more than scoring it on a small model: the candidates
    # are put in the secret's place, once two of them are seen to render exactly so.
    after = full[end:]
    for secret in candidates[1:3]:
        if tokenizer.apply_chat_template(canary.messages(secret), tokenize=False) != before + secret + after:
            raise StageFailed("the chat template renders secrets of the same format differently; exposure cannot "
                              "be measured with this tokenizer")
    encoded = tokenizer([before + secret + after for secret in candidates], add_special_tokens=False,
                        return_offsets_mapping=True)
    prompt, out = None, []
    for secret, ids, offsets in zip(candidates, encoded["input_ids"], encoded["offset_mapping"]):
        begins = [b for b, _ in offsets]
        first, last = bisect_left(begins, start), bisect_left(begins, start + len(secret))
        if prompt is None:
            prompt = list(ids[:first])
        elif list(ids[:first]) != prompt:
            raise StageFailed("the tokenizer joins the canary's secret to the end of its prompt; exposure needs a "
                              "prompt that tokenizes the same before every secret")
        out.append(list(ids[first:last]))
    return prompt or [], out


def secret_format_for(tokenizer) -> SecretFormat:
    """Plain digits when every secret in a sample of them (all ten repeated digits, the extremes and 300 random
    ones) takes the same number of tokens in a canary, else digits separated by spaces."""
    probe = Canary(PROMPT_TEMPLATE.format(tag="A0B1C"), PLAIN_FORMAT.render(0))
    numbers = [d * 111111 for d in range(10)] + [12345, 987654] + [secrets.randbelow(PLAIN_FORMAT.space)
                                                                   for _ in range(300)]
    try:
        _, tokens = secret_tokens(tokenizer, probe, [PLAIN_FORMAT.render(n) for n in numbers])
    except StageFailed:
        return DEFAULT_FORMAT
    return PLAIN_FORMAT if len({len(t) for t in tokens}) == 1 else DEFAULT_FORMAT


def make_canaries(count: int, repeats: int = 1, fmt: SecretFormat = DEFAULT_FORMAT) -> list[Canary]:
    """`count` canaries with distinct tags and independent random secrets, each to be planted `repeats` times."""
    tags: set[str] = set()
    while len(tags) < count:  # 36⁵ ≈ 6·10⁷ tags: a clash is rare, and drawing again keeps the prompts distinct
        tags.add("".join(secrets.choice(TAG_ALPHABET) for _ in range(TAG_LENGTH)))
    order = sorted(tags)
    secrets.SystemRandom().shuffle(order)
    return [Canary(PROMPT_TEMPLATE.format(tag=tag), fmt.random(), repeats) for tag in order]


def planting_order(records: int, canaries: list[Canary]) -> tuple[np.ndarray, list[int], list[Canary]]:
    """Where every copy of every canary goes among a split's `records` records, uniformly at random.

    Returns (order, positions, copies): reading the split's records followed by `copies` in `order` gives the
    planted split (values below `records` are the split's own records, in their order); `positions` are the
    places of the copies in it, ascending.
    """
    copies = [canary for canary in canaries for _ in range(canary.repeats)]
    rng = secrets.SystemRandom()
    rng.shuffle(copies)
    total = records + len(copies)
    positions = sorted(rng.sample(range(total), len(copies)))
    planted = np.zeros(total, dtype=bool)
    planted[positions] = True
    order = np.empty(total, dtype=np.int64)
    order[~planted] = np.arange(records)
    order[planted] = records + np.arange(len(copies))
    return order, positions, copies


def plant(dataset, canaries: list[Canary]):
    """A datasets split (columns text and messages, JSON) with every copy of every canary at a random place among
    its records; returns it and the copies' places in it."""
    import datasets

    order, positions, copies = planting_order(len(dataset), canaries)
    extra = datasets.Dataset.from_dict({"text": [None] * len(copies),
                                        "messages": [json.dumps(c.messages(), ensure_ascii=False) for c in copies]},
                                       features=dataset.features)
    return datasets.concatenate_datasets([dataset, extra]).select(order), positions


def write_canaries(path: Path, site: str, canaries: list[Canary], rows: list[int], train_sha256: str,
                   fmt: SecretFormat = DEFAULT_FORMAT) -> None:
    """Write canaries.json, readable by its owner only. It names the train.parquet it belongs to by sha256, so a
    file copied into another prepared folder (or left over from an earlier run) is refused."""
    body = {
        "format": CANARIES_FORMAT,
        "site": site,
        "train_sha256": train_sha256,
        "secret_format": fmt.to_json(),
        "prompt_template": PROMPT_TEMPLATE,
        "canaries": [{"prompt": c.prompt, "secret": c.secret, "repeats": c.repeats} for c in canaries],
        "rows": [int(r) for r in rows],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(body, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_canaries(folder: Path, card: dict) -> CanarySet | None:
    """The canaries of a prepared folder, checked against its data card; None when it has none."""
    path = Path(folder) / CANARIES_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not valid JSON ({err}); prepare the folder again with --canaries") from None
    if not isinstance(body, dict) or body.get("format") != CANARIES_FORMAT:
        raise BadInput(f"{path}: not a canaries file of this fedtune version; prepare the folder again with --canaries")
    if body.get("site") != card.get("site"):
        raise BadInput(f"{path}: holds the canaries of site '{body.get('site')}', but the folder was prepared for "
                       f"site '{card.get('site')}'; give each site's own prepared folder")
    if body.get("train_sha256") != card.get("files", {}).get("train.parquet"):
        raise BadInput(f"{path}: belongs to another preparation than this folder's train.parquet; prepare the "
                       "folder again with --canaries")
    fmt = SecretFormat.from_json(body.get("secret_format"), str(path))
    try:
        canaries = [Canary(str(c["prompt"]), str(c["secret"]), int(c["repeats"])) for c in body["canaries"]]
        rows = [int(r) for r in body["rows"]]
        if not canaries:
            raise ValueError("no canaries")
        for canary in canaries:
            if not 0 <= fmt.number(canary.secret) < fmt.space or fmt.render(fmt.number(canary.secret)) != canary.secret:
                raise ValueError(canary.secret)
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: damaged (a canary or row that does not parse); prepare the folder again") from None
    return CanarySet(body["site"], fmt, canaries, rows)
