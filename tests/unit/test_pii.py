"""PII scrubbing: recall on a seeded corpus of planted values through `prepare`, precision on clean text full
of ordinary numbers, and the unit cases (each kind's placeholder, checksum look-alikes, deny-lists, custom
patterns, conversations, bad patterns, the optional NER model); values other generators write (Faker, and
the formats an outside measurement found surviving) under the default policy; what the card says was not
scanned; and the contract: a site may scrub more than the federation asks, never less."""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import phonenumbers
import piicorpus
import pytest
from conftest import TINY_OVERRIDES, decoded_tokens, run_cli, write_jsonl

from fedtune import models
from fedtune.data import prepare_site
from fedtune.data.pii import PiiPolicy, PiiScrubber

COUNTRIES = ["US", "GB", "DE", "FR", "ES", "IT", "NL"]
MRN = r"MRN-\d{6}"
FEDERATION_TERMS = ["Project Nightingale", "Zorblax"]
SITE_TERMS = ["Okonkwo", "Mary-Jane Whitfield"]
RECORDS = 1100
PLACEHOLDER_TYPES = {"EMAIL", "PHONE", "CARD", "IBAN", "IP", "US_SSN", "US_ITIN", "UK_NINO", "UK_NHS", "DE_TAX_ID",
                     "FR_NIR", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "NL_BSN", "REDACTED", "MRN", "PERSON",
                     "DE_KVNR", "DE_RVNR", "ES_NSS"}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fed(tiny_model, tmp_path_factory):
    """(config, folder) of a federation on the tiny model whose PII policy covers the seven ID countries, an MRN
    pattern and two deny-list terms. Dedup is off: records that differ only in their PII become identical
    once scrubbed, and a dropped record would hide its values from the recall count."""
    from fedtune.federation import init_federation

    overrides = json.loads(json.dumps(TINY_OVERRIDES))
    overrides["data"] |= {"dedup": {"exact": False, "near": False},
                          "pii": {"countries": COUNTRIES, "patterns": {"MRN": MRN}, "deny_list": FEDERATION_TERMS}}
    folder = tmp_path_factory.mktemp("pii-fed") / "fed"
    return init_federation(folder, ["clinic", "bank"], str(tiny_model), overrides), folder


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return models.load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def scrubber(fed):
    config, _ = fed
    return PiiScrubber(PiiPolicy.of(config.data.pii, [], None))


@pytest.fixture(scope="module")
def us_scrubber():
    return PiiScrubber(PiiPolicy(countries=["US"]))


@pytest.fixture(scope="module")
def recall_run(fed, tokenizer, tmp_path_factory):
    """The corpus through `prepare_site`: (records, planted values, data card, decoded tokens)."""
    config, _ = fed
    root = tmp_path_factory.mktemp("pii-recall")
    records, planted = piicorpus.corpus(seed=11, records=RECORDS)
    raw = write_jsonl(root / "raw" / "clinic.jsonl", records)
    card = prepare_site(config, "clinic", [raw], root / "prepared")
    return records, planted, card, decoded_tokens(root / "prepared", tokenizer)


def _tail(value: str, digits: int = 6) -> str:
    """The end of `value` from where its last `digits` digits begin (separators kept)."""
    positions = [i for i, ch in enumerate(value) if ch.isdigit()]
    return value[positions[-digits]:]


def leaks(item: piicorpus.Planted, text: str) -> list[str]:
    """The forms of `item` found in `text`: as written, digits only, or its last six digits as written."""
    if item.kind == "ip":
        pattern = rf"(?<![\w.:]){re.escape(item.value)}(?![\w:]|\.\d)"
        return [item.value] if re.search(pattern, text, flags=re.IGNORECASE) else []
    forms = {item.value}
    if item.kind == "email":
        forms.add(item.value.split("@")[0] + "@")
    elif len(item.digits) >= 7:
        forms |= {item.digits, _tail(item.value)}
    return sorted(f for f in forms if f in text)


# ---------------------------------------------------------------------------------------------- recall

def test_corpus_is_large_and_valid(recall_run):
    from stdnum import iban, luhn
    from stdnum.us import ssn

    records, planted, _card, _text = recall_run
    assert len(records) >= 1000 and len(planted) >= 1500
    assert len({json.dumps(r, sort_keys=True) for r in records}) == len(records)
    by_kind = Counter(p.kind for p in planted)
    assert set(by_kind) == {"email", "phone", "iban", "card", "ssn", "ip"} and min(by_kind.values()) >= 100, by_kind
    labels = {p.label for p in planted}
    assert {f"phone:{c} {f}" for c in COUNTRIES for f in ("international", "national")} <= labels
    assert {f"iban:{c} {f}" for c in piicorpus.IBAN_COUNTRIES for f in ("grouped", "compact")} <= labels
    assert {f"card:{i} {f}" for i in piicorpus.CARD_ISSUERS for f in ("grouped", "plain")} <= labels
    assert {"ip:v4", "ip:v6"} <= labels
    assert len({p.value for p in planted}) == len(planted)  # random values, not a fixed handful
    for p in planted:
        if p.kind == "phone":
            assert phonenumbers.is_valid_number(phonenumbers.parse(p.value, p.variant.split()[0])), p
        elif p.kind == "iban":
            assert iban.is_valid(p.value), p
        elif p.kind == "card":
            assert luhn.is_valid(p.digits), p
        elif p.kind == "ssn":
            assert ssn.is_valid(p.value), p


def test_nothing_is_dropped(recall_run):
    records, _planted, card, _text = recall_run
    assert card["dropped"] == {}, card["dropped"]
    assert card["records"]["read"] == card["records"]["kept"] == len(records)
    assert card["languages"]["kept"].get("en", 0) >= 0.98 * len(records), card["languages"]


def test_recall_on_planted_values(recall_run):
    _records, planted, card, text = recall_run
    # the records did reach the tokens: every replacement the card counts is in them
    assert sum(text.count(f"<{t}>") for t in PLACEHOLDER_TYPES) == sum(card["pii_replaced"].values())
    missed: dict[str, list[str]] = defaultdict(list)
    totals = Counter(p.kind for p in planted)
    for p in planted:
        if leaks(p, text):
            missed[p.label].append(f"{p.value} (found {', '.join(leaks(p, text))})")
    found = len(planted) - sum(map(len, missed.values()))
    recall = {kind: 1 - sum(len(v) for k, v in missed.items() if k.startswith(kind + ":")) / n
              for kind, n in totals.items()}
    report = "; ".join(f"{label}: {len(values)} missed, e.g. {values[:4]}" for label, values in sorted(missed.items()))
    print(f"recall {found / len(planted):.4f} ({found}/{len(planted)}); per kind "
          + ", ".join(f"{k} {r:.4f}" for k, r in sorted(recall.items())))
    assert found / len(planted) >= 0.99, f"recall {found / len(planted):.4f}: {report}"
    assert min(recall.values()) >= 0.99, f"recall per kind {recall}: {report}"


def test_card_counts_match_the_planted_values(recall_run):
    _records, planted, card, _text = recall_run
    counts = card["pii_replaced"]
    assert set(counts) <= PLACEHOLDER_TYPES, counts
    assert all(isinstance(n, int) and n > 0 for n in counts.values()), counts
    total = sum(counts.values())
    # one replacement per planted value; an ambiguous number may be typed as another kind (a Spanish mobile
    # written 612345678 is also a valid SSN), so the total is compared, and the main kinds one by one
    assert 0.99 * len(planted) <= total <= 1.01 * len(planted), (total, len(planted), counts)
    expected = Counter(p.placeholder for p in planted)
    for placeholder in ("EMAIL", "IBAN", "CARD", "IP"):
        assert counts.get(placeholder, 0) == expected[placeholder], (placeholder, counts, expected)


def test_card_holds_no_planted_value(recall_run):
    _records, planted, card, _text = recall_run
    blob = json.dumps(card)
    assert not [p.value for p in planted if leaks(p, blob)]


def test_planted_values_get_their_own_placeholder(recall_run, scrubber):
    """Each value, scrubbed in its sentence, becomes its kind's placeholder. Numbers valid as two kinds (a
    US phone number laid out like an NHS number, a bare nine-digit Spanish mobile that is also a valid SSN)
    may take the other type; they are still replaced."""
    _records, planted, _card, _text = recall_run
    rng = random.Random(5)
    wrong: dict[str, list] = defaultdict(list)
    for p in planted:
        counts: Counter = Counter()
        sentence = piicorpus.sentence(rng, p)
        out = scrubber.scrub(sentence, counts)
        assert p.value not in out, (p, out)
        if counts != Counter({p.placeholder: 1}):
            wrong[p.kind].append((p.value, dict(counts)))
    totals = Counter(p.kind for p in planted)
    rates = {k: 1 - len(wrong[k]) / n for k, n in totals.items()}
    overall = 1 - sum(map(len, wrong.values())) / len(planted)
    assert overall >= 0.97 and min(rates.values()) >= 0.9, (overall, rates, dict(wrong))


# ---------------------------------------------------------------------------------------------- precision

def test_clean_text_is_left_alone(scrubber):
    sentences = piicorpus.clean_sentences(seed=3, count=600)
    assert len(set(sentences)) == 600
    altered = []
    for sentence in sentences:
        counts: Counter = Counter()
        out = scrubber.scrub(sentence, counts)
        if out != sentence:
            altered.append(f"{sentence!r} -> {out!r}")
    print(f"clean sentences altered: {len(altered)}/{len(sentences)}")
    assert len(altered) <= 0.01 * len(sentences), "\n".join(altered)


# ---------------------------------------------------------------------------------------------- unit cases

KNOWN = [
    ("EMAIL", "m.rossi+lab@policlinico.it"),
    ("EMAIL", "IT-Support.Team@acme-software.io"),
    ("PHONE", "(212) 456-7890"), ("PHONE", "+1 415 987 2364"),
    ("PHONE", "020 7946 0958"), ("PHONE", "+44 7911 123456"), ("PHONE", "+44 (0)161 496 0000"),
    ("PHONE", "030 12345678"), ("PHONE", "+49 171 2345678"), ("PHONE", "0171/2345678"),
    ("PHONE", "06 12 34 56 78"), ("PHONE", "+33 1 42 68 53 00"), ("PHONE", "01.42.68.53.00"),
    ("PHONE", "612 34 56 78"), ("PHONE", "+34 912 345 678"),
    ("PHONE", "347 123 4567"), ("PHONE", "+39 06 6988 1234"),
    ("PHONE", "06-12345678"), ("PHONE", "+31 20 123 4567"),
    ("IBAN", "DE89 3704 0044 0532 0130 00"), ("IBAN", "DE89370400440532013000"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"), ("IBAN", "FR14 2004 1010 0505 0001 3M02 606"),
    ("IBAN", "ES91 2100 0418 4502 0005 1332"), ("IBAN", "IT60X0542811101000000123456"),
    ("IBAN", "NL91 ABNA 0417 1643 00"),
    ("CARD", "4111 1111 1111 1111"), ("CARD", "4111-1111-1111-1111"), ("CARD", "5555555555554444"),
    ("CARD", "2223 0031 2200 3222"), ("CARD", "3782 822463 10005"), ("CARD", "378282246310005"),
    ("CARD", "6011 1111 1111 1117"),
    ("US_SSN", "536-22-1847"), ("US_SSN", "536 22 1847"),
    ("IP", "192.168.10.24"), ("IP", "2001:db8:85a3::8a2e:370:7334"),
    ("US_ITIN", "912-91-3457"), ("UK_NHS", "943 476 5919"), ("UK_NINO", "AB 12 34 56 C"),
    ("DE_TAX_ID", "36574261809"), ("DE_TAX_ID", "36 574 261 809"), ("FR_NIR", "2 95 10 99 126 111 93"),
    ("ES_NIF", "54362315K"), ("ES_NIE", "X2482300W"), ("IT_FISCAL_CODE", "RCCMNL83S18D969H"),
    ("NL_BSN", "1112.22.333"),
]


@pytest.mark.parametrize(("placeholder", "value"), KNOWN, ids=[f"{p}-{v}" for p, v in KNOWN])
def test_each_kind_gets_its_placeholder(scrubber, placeholder, value):
    counts: Counter = Counter()
    assert scrubber.scrub(f"Please note {value} in the file.", counts) == f"Please note <{placeholder}> in the file."
    assert counts == Counter({placeholder: 1})


GENERATED = [("email", ()), ("ssn", ()), ("ipv4", ()), ("ipv6", ()),
             *[("phone", (c, i)) for c in COUNTRIES for i in (True, False)],
             *[("iban", (c, g)) for c in piicorpus.IBAN_COUNTRIES for g in (True, False)],
             *[("card", (i, g)) for i in piicorpus.CARD_ISSUERS for g in (True, False)]]


@pytest.mark.parametrize(("kind", "args"), GENERATED, ids=[":".join([k, *map(str, a)]) for k, a in GENERATED])
def test_generated_values_are_replaced(scrubber, kind, args):
    """Ten generated values of each kind and format, in a sentence: none survives."""
    rng = random.Random(zlib.crc32(repr((kind, args)).encode()))
    maker = {"email": piicorpus.email, "ssn": piicorpus.ssn, "ipv4": piicorpus.ipv4, "ipv6": piicorpus.ipv6,
             "phone": piicorpus.phone, "iban": piicorpus.iban, "card": piicorpus.card}[kind]
    for _ in range(10):
        value = maker(rng, *args)
        counts: Counter = Counter()
        out = scrubber.scrub(f"On file: {value}. Thanks.", counts)
        assert value not in out and sum(counts.values()) == 1, (value, out, counts)


def test_checksum_lookalikes_are_left_alone(scrubber, us_scrubber):
    rng = random.Random(8)
    cards = [piicorpus.card(rng, issuer, grouped, valid=False) for issuer in piicorpus.CARD_ISSUERS
             for grouped in (True, False) for _ in range(4)]
    cards += ["4111 1111 1111 1112", "5555 5555 5555 4445", "3782 822463 10006"]
    ibans = [piicorpus.iban(rng, c, g, check_offset=rng.randint(1, 95)) for c in piicorpus.IBAN_COUNTRIES
             for g in (True, False) for _ in range(3)]
    ibans += ["DE88 3704 0044 0532 0130 00", "GB83 WEST 1234 5698 7654 32", "NL90ABNA0417164300"]
    # SSN look-alikes written with spaces or none (dashed, any 3-2-4 number is taken: see test_dashed_ssn_shapes)
    ssns = ["000 12 3456", "666 12 3456", "900 12 3456", "123 00 4567", "536 22 0000", "000123456"]
    changed = []
    for value in cards + ibans + ssns:
        text = f"The reference {value} is on the form."
        for name, s in (("us", us_scrubber), ("seven countries", scrubber)):
            counts: Counter = Counter()
            out = s.scrub(text, counts)
            if _taken_for_valid(value, out, counts, is_iban=value in ibans, us_only=name == "us"):
                changed.append(f"{name}: {text!r} -> {out!r}")
    assert not changed, "\n".join(changed)


def _taken_for_valid(value: str, out: str, counts: Counter, is_iban: bool, us_only: bool) -> bool:
    """Under US rules alone a look-alike card or SSN is left as it is. With seven countries some are valid phone
    numbers (666-12-3456 is a Spanish mobile), and the digits of an IBAN-shaped string may hold one (NL87 ASNB
    8478 3301 37 holds 847 833 0137): those may become <PHONE>, but an IBAN's country and check digits stay."""
    if counts.keys() & {"CARD", "IBAN", "US_SSN"}:
        return True
    if is_iban:
        return value[:4] + " " not in out and value[:6] not in out
    return us_only and value not in out


def test_iban_before_a_capitalised_word_or_number(scrubber):
    """Presidio's IBAN pattern may take a following capital or digit along ('…2195 W'); the IBAN must still go."""
    rng = random.Random(21)
    missed = []
    for _ in range(150):
        value = piicorpus.iban(rng, rng.choice(piicorpus.IBAN_COUNTRIES), rng.random() < 0.5)
        for text in (f"IBAN {value} Whitelist the payee.", f"Pay into {value} 2 days before the due date.",
                     f"{value} X-ray invoices only."):
            counts: Counter = Counter()
            out = scrubber.scrub(text, counts)
            if value in out or counts != Counter({"IBAN": 1}):
                missed.append(f"{text!r} -> {out!r}")
    assert not missed, "\n".join(missed)


def test_deny_list_words_on_word_boundaries(scrubber):
    counts: Counter = Counter()
    text = ("zorblax and ZORBLAX, Zorblax's budget and project  nightingale are secret; "
            "Zorblaxes, zorblax-2, NightingaleProject and Project Nightingales are not.")
    out = scrubber.scrub(text, counts)
    assert out == ("<REDACTED> and <REDACTED>, <REDACTED>'s budget and <REDACTED> are secret; "
                   "Zorblaxes, zorblax-2, NightingaleProject and Project Nightingales are not."), out
    assert counts == Counter({"REDACTED": 4})


def test_site_deny_list_names(fed):
    config, _ = fed
    scrubber = PiiScrubber(PiiPolicy.of(config.data.pii, SITE_TERMS + ["O'Brien"], None))
    counts: Counter = Counter()
    out = scrubber.scrub("Dr. OKONKWO's patient, mary-jane whitfield and O'Brien's son; Mary-Jane alone, "
                         "the Okonkwos and Whitfield-Smith are not on the list.", counts)
    assert out == ("Dr. <REDACTED>'s patient, <REDACTED> and <REDACTED>'s son; Mary-Jane alone, "
                   "the Okonkwos and Whitfield-Smith are not on the list."), out
    assert counts == Counter({"REDACTED": 3})


def test_custom_pattern(scrubber):
    counts: Counter = Counter()
    out = scrubber.scrub("Chart MRN-004512 was merged into MRN-119020; MRN-12345 is too short.", counts)
    assert out == "Chart <MRN> was merged into <MRN>; MRN-12345 is too short."
    assert counts == Counter({"MRN": 2})


SMALL_RECORDS = [
    {"messages": [
        {"role": "system", "content": "You help staff of Project Nightingale; escalate to ops@stmarys-hospital.org.uk."},
        {"role": "user", "content": "Dr. Okonkwo asked about chart MRN-004512. Call him on +44 20 7946 0958."},
        {"role": "assistant",
         "content": "Mary-Jane Whitfield reviewed MRN-004512; refund to GB82 WEST 1234 5698 7654 32."},
        {"role": "user", "content": "And the card 4111 1111 1111 1111 from 192.168.10.24?"},
        {"role": "assistant", "content": "Blocked. The zorblax rollout continues; okonkwo was told at 10:30."},
    ]},
    {"instruction": "Who owns the Zorblax migration?",
     "output": "mary-jane whitfield owns it; reach her at mjw@acme-software.io."},
    {"text": "Zorblaxes are a different product. The Okonkwos moved away. Project Nightingales is a typo."},
    {"instruction": "What is the escalation path?", "output": "File a ticket, then page the on-call engineer."},
]
SMALL_SECRETS = ["ops@stmarys-hospital.org.uk", "+44 20 7946 0958", "MRN-004512", "GB82 WEST 1234 5698 7654 32",
                 "4111 1111 1111 1111", "192.168.10.24", "mjw@acme-software.io"]


def _write_small_site(root: Path) -> tuple[Path, Path]:
    raw = write_jsonl(root / "raw.jsonl", SMALL_RECORDS)
    deny = root / "names.txt"
    deny.write_text("# patients and staff\n" + "\n".join(SITE_TERMS) + "\n\n", encoding="utf-8")
    return raw, deny


@pytest.fixture(scope="module")
def small_run(fed, tokenizer, tmp_path_factory):
    """A few records (a conversation with PII in every turn, deny-list terms, MRNs) prepared with the site's
    own deny-list file: (folder, card, decoded tokens)."""
    config, _ = fed
    root = tmp_path_factory.mktemp("pii-small")
    raw, deny = _write_small_site(root)
    card = prepare_site(config, "clinic", [raw], root / "prepared", deny_list=deny)
    return root / "prepared", card, decoded_tokens(root / "prepared", tokenizer)


def test_cli_deny_lists_redact_case_insensitively(fed, tokenizer, tmp_path, capsys):
    _config, folder = fed
    raw, deny = _write_small_site(tmp_path)
    out = tmp_path / "prepared"
    code, _stdout, err = run_cli(["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input", raw,
                                  "--out", out, "--deny-list", deny, "--json"], capsys)
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    text = decoded_tokens(out, tokenizer)
    for term in FEDERATION_TERMS + SITE_TERMS:
        words = r"\s+".join(map(re.escape, term.split()))
        assert not re.search(rf"(?<![\w-]){words}(?![\w-])", text, flags=re.IGNORECASE), (term, text)
    # only whole words go: longer words holding a term stay
    for kept in ("Zorblaxes", "Okonkwos", "Project Nightingales"):
        assert kept in text
    assert card["pii_replaced"]["REDACTED"] == text.count("<REDACTED>") == 7
    assert card["contract"]["pii_policy"]["site_deny_list_terms"] == len(SITE_TERMS)


def test_conversation_scrubbed_in_every_turn(small_run):
    _out, card, text = small_run
    for secret in SMALL_SECRETS:
        assert secret not in text, secret
    assert text.count("<MRN>") == 2 and text.count("<EMAIL>") == 2
    for placeholder in ("<PHONE>", "<IBAN>", "<CARD>", "<IP>"):
        assert text.count(placeholder) == 1, placeholder
    assert "Blocked. The <REDACTED> rollout continues" in text and "at 10:30" in text
    assert card["pii_replaced"] == {"CARD": 1, "EMAIL": 2, "IBAN": 1, "IP": 1, "MRN": 2, "PHONE": 1, "REDACTED": 7}


def test_card_counts_never_hold_values(small_run):
    out, card, _text = small_run
    assert set(card["pii_replaced"]) <= PLACEHOLDER_TYPES
    written = json.dumps(card).casefold() + (out / "data_card.json").read_text().casefold()
    for secret in SMALL_SECRETS + FEDERATION_TERMS + SITE_TERMS:
        assert secret.casefold() not in written, secret
    assert "okonkwo" not in written and "whitfield" not in written


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_pattern_regex_is_one_error_line(fed, tmp_path, capsys):
    _config, folder = fed
    text = (folder / "federation.yaml").read_text()
    assert "MRN: MRN-\\d{6}" in text, text
    bad = tmp_path / "federation.yaml"
    bad.write_text(text.replace("MRN: MRN-\\d{6}", "MRN: MRN-(\\d{6}"))
    raw = write_jsonl(tmp_path / "raw.jsonl", SMALL_RECORDS)
    out = tmp_path / "prepared"
    code, _stdout, err = run_cli(["prepare", "--config", bad, "--site", "clinic", "--input", raw, "--out", out], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert str(bad) in line and "pattern MRN" in line and "regular expression" in line, line
    assert not out.exists()


def test_ner_model_folder_without_config(fed, tmp_path, capsys):
    _config, folder = fed
    model = tmp_path / "ner"
    model.mkdir()
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    raw = write_jsonl(tmp_path / "raw.jsonl", SMALL_RECORDS)
    out = tmp_path / "prepared"
    code, _stdout, err = run_cli(["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input", raw,
                                  "--out", out, "--ner-model", model], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert str(model) in line and "config.json" in line, line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ner", "raw.jsonl"]


def test_ner_is_off_by_default(recall_run):
    _records, _planted, card, text = recall_run
    assert "<PERSON>" not in text and card["contract"]["pii_policy"]["person_names_by_ner"] is False


@pytest.fixture(scope="module")
def always_person_model(tmp_path_factory) -> Path:
    """A one-layer BERT token classifier whose classifier bias makes every token B-PER: it checks the wiring of
    --ner-model, not the quality of any model."""
    import string

    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("ner-model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase), *".,;:'<>-"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, num_labels=3, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ner_model_names_become_person(fed, tokenizer, always_person_model, tmp_path):
    config, _ = fed
    rows = [{"instruction": "Who called this morning?", "output": "Ximena Okafor called about her results."},
            {"text": "Quentin Lindqvist phoned twice about the invoice."}]
    out = tmp_path / "prepared"
    card = prepare_site(config, "clinic", [write_jsonl(tmp_path / "raw.jsonl", rows)], out,
                        ner_model=always_person_model)
    text = decoded_tokens(out, tokenizer)
    assert "<PERSON>" in text and card["pii_replaced"].get("PERSON", 0) >= 3, (text, card["pii_replaced"])
    for name in ("Ximena", "Okafor", "Quentin", "Lindqvist"):
        assert name not in text
    assert card["contract"]["pii_policy"]["person_names_by_ner"] is True


def test_an_international_number_that_passes_luhn_is_a_phone(scrubber):
    """+49 1516 3201630 is a German mobile whose digits also pass the card checksum; the '+' decides."""
    counts = Counter()
    assert scrubber.scrub("Call +4915163201630 today.", counts) == "Call <PHONE> today."
    assert counts == {"PHONE": 1}


def test_a_card_beside_a_phone_number_keeps_both_types(scrubber):
    """Phones are looked for outside confirmed IDs: the card stays <CARD>, the phone after it <PHONE>."""
    counts = Counter()
    text = "Card 4111 1111 1111 1111, call +44 20 7946 0958."
    assert scrubber.scrub(text, counts) == "Card <CARD>, call <PHONE>."
    assert counts == {"CARD": 1, "PHONE": 1}


# ---------------------------------------------------------------------------------------------- the default policy

@pytest.fixture(scope="module")
def default_scrubber():
    """data.pii as `fedtune init` writes it."""
    from fedtune.config import PiiSettings

    return PiiScrubber(PiiPolicy.of(PiiSettings(), [], None))


# Values an outside measurement (Faker, seven locales) found surviving the earlier defaults: cards outside
# 13-16 digits, US numbers with an extension or dots, national numbers of countries then not configured.
SURVIVORS = [
    ("CARD", "676315510294"),          # 12-digit Maestro
    ("CARD", "5018 0328 5318"),        # 12-digit Maestro, grouped
    ("CARD", "213124821910834"),       # 15-digit JCB starting 2131
    ("CARD", "4589791466495320560"),   # 19-digit Visa
    ("CARD", "4589 7914 6649 5320 560"),
    ("PHONE", "(483)469-4923x597"), ("PHONE", "001-755-616-1804x6774"), ("PHONE", "766.669.3740"),
    ("PHONE", "487-364-7593 ext. 824"), ("PHONE", "+1 (150) 889-9579"),
    ("PHONE", "0114 496 0239"), ("PHONE", "(0118)4960177"), ("PHONE", "+44(0)141 4960809"),  # UK
    ("PHONE", "04 74 27 74 93"),       # FR
    ("PHONE", "05043 103993"),         # DE
    ("PHONE", "0247125328"),           # NL
    ("PHONE", "+45 28 87 70 44"),      # DK, a country not in the list: by its +CC
]
NEW_IDS = [
    ("US_SSN", "958-12-3456"), ("UK_NINO", "ZZ 12 34 56 T"), ("UK_NINO", "ZZ123456T"),
    ("DE_KVNR", "L726783746"), ("DE_RVNR", "73110311T528"), ("ES_NSS", "464836694670"),
    ("AT_SVNR", "4820080403"), ("BE_NN", "18051649945"), ("CA_SIN", "242 008 498"), ("CH_AHV", "756.1743.8029.53"),
    ("PL_PESEL", "92030804145"), ("SE_PERSONNUMMER", "950919-2747"),
]
# Numbers that are not PII, with the separators phone numbers and cards use.
CLEAN_NUMBERS = ["31.01.2024", "2024-01-31", "01/31/2024", "08.00-17.00", "14:30", "$1,234.56", "1.234,56 €",
                 "EUR 12.500,00", "E11.9", "S52.501A", "#3067852", "ORD-2024-843893", "10.0.19045.3803", "v2.14.3",
                 "120/80 mmHg", "5.6 mmol/L", "37.5 °C", "978-1-77454-223-1", "ISBN 978-3-16-148410-0",
                 "INV-2024-00042", "SW1A 1AA", "75008 Paris", "2019-2024", "12 345 678 €", "1,234,567", "0.25 mg",
                 "Lot 23-0456", "PO 4500123456", "case 12345", "3 x 500 mg", "20-30 min", "1:1000", "Ref. 2023/0456",
                 "BMI 27.4", "Mon-Fri 9-17"]


@pytest.mark.parametrize(("placeholder", "value"), SURVIVORS + NEW_IDS, ids=[v for _, v in SURVIVORS + NEW_IDS])
def test_formats_other_generators_write_are_replaced_by_default(default_scrubber, placeholder, value):
    from stdnum import luhn

    if placeholder == "CARD":
        assert luhn.is_valid(value.replace(" ", ""))  # a real card number's checksum, not a look-alike
    counts: Counter = Counter()
    assert default_scrubber.scrub(f"Please note {value} in the file.", counts) == f"Please note <{placeholder}> in the file."
    assert counts == Counter({placeholder: 1})


@pytest.mark.parametrize("value", CLEAN_NUMBERS)
def test_ordinary_numbers_stay_under_the_default_policy(default_scrubber, value):
    text = f"Note: {value}, as agreed."
    assert default_scrubber.scrub(text, Counter()) == text


def test_dashed_ssn_shapes(us_scrubber):
    """Written 123-45-6789 a number is taken for an SSN whatever its area (generators use 000, 666 and 9xx);
    written otherwise it must follow the allocation rules (see test_checksum_lookalikes_are_left_alone)."""
    for value in ("000-12-3456", "666-12-3456", "958-12-3456", "123-00-4567"):
        counts: Counter = Counter()
        assert us_scrubber.scrub(f"SSN {value} on file.", counts) == "SSN <US_SSN> on file.", value
    counts = Counter()
    assert us_scrubber.scrub("ITIN 912-91-3457 on file.", counts) == "ITIN <US_ITIN> on file."


FAKER_LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"]


def test_faker_values_in_seven_locales(default_scrubber):
    """Another generator's values (Faker: every phone format of a locale, every card type, its national IDs) in
    a sentence: at least 99 % are replaced whole under the default policy (benchmarks/pii_recall.py measures
    more locales and clean text)."""
    from faker import Faker

    missed, total = [], 0
    for n, locale in enumerate(FAKER_LOCALES):
        fake = Faker(locale)
        fake.seed_instance(n)
        provider = next(p for p in fake.get_providers() if type(p).__module__.startswith("faker.providers.credit_card"))
        cards = [t for t in provider.credit_card_types if t not in ("visa", "jcb")]  # those two are aliases
        values = [fake.phone_number() for _ in range(30)] + [fake.ssn() for _ in range(10)]
        values += [fake.credit_card_number(cards[i % len(cards)]) for i in range(20)] + [fake.iban() for _ in range(5)]
        for value in values:
            total += 1
            out = default_scrubber.scrub(f"Details: {value}. Thanks.", Counter())
            if not re.fullmatch(r"Details: (<[A-Z_]+>[\s-]*)+\. Thanks\.", out):  # nothing of it left
                missed.append(f"{locale} {value!r} -> {out!r}")
    assert len(missed) <= 0.01 * total, missed


# ---------------------------------------------------------------------------------------------- not scanned

def test_card_says_what_was_not_scanned(small_run):
    _out, card, _text = small_run
    gaps = card["pii_not_scanned"]
    assert "person names" in gaps and "--ner-model" in gaps["person names"] and "--deny-list" in gaps["person names"]
    assert any(k.startswith("national IDs of countries not in") for k in gaps)
    assert any("postal addresses" in k for k in gaps)


def test_not_scanned_names_what_the_policy_leaves_out():
    from fedtune.config import PiiSettings
    from fedtune.data.contract import pii_not_scanned

    gaps = pii_not_scanned(PiiSettings(entities=["EMAIL", "PHONE", "NATIONAL_ID"], countries=["US", "DK"]), ner=True)
    assert "person names" not in gaps
    assert {"CARD", "IBAN", "IP"} <= set(gaps) and "EMAIL" not in gaps
    assert "national IDs of DK" in gaps  # a country on the list with no ID check says so


def test_prepare_warns_about_what_was_not_scanned_every_time(fed, tmp_path, capsys):
    _config, folder = fed
    raw = write_jsonl(tmp_path / "raw.jsonl", SMALL_RECORDS)
    for extra in ([], ["--json"]):
        code, _stdout, err = run_cli(["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input",
                                      raw, "--dry-run", *extra], capsys)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("warning: PII not scanned: ")]
        assert any("person names" in w and "--ner-model" in w for w in warnings), err
        assert any("postal addresses" in w for w in warnings), err


# ---------------------------------------------------------------------------------------------- stricter sites

def _federation_with(folder: Path, dest: Path, pii: dict) -> Path:
    import yaml

    data = yaml.safe_load((folder / "federation.yaml").read_text())
    data["data"]["pii"] |= pii
    dest.write_text(yaml.safe_dump(data), encoding="utf-8")
    return dest


def test_a_site_adds_countries_entities_and_patterns(fed, tokenizer, tmp_path, capsys):
    _config, folder = fed
    config = _federation_with(folder, tmp_path / "federation.yaml", {"entities": ["EMAIL", "PHONE"]})
    rows = [{"instruction": "Which card?", "output": "Card 4111 1111 1111 1111, case CASE-204811, call +45 28 87 70 44."},
            {"text": "Write to ops@clinic.example.org about case CASE-119020."}]
    out = tmp_path / "prepared"
    code, _stdout, err = run_cli(["prepare", "--config", config, "--site", "clinic", "--input",
                                  write_jsonl(tmp_path / "raw.jsonl", rows), "--out", out, "--pii-entity", "CARD",
                                  "--pii-country", "dk", "--pii-pattern", r"CASE=CASE-\d{6}"], capsys)
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    text = decoded_tokens(out, tokenizer)
    assert "4111" not in text and "CASE-2" not in text and "CASE-1" not in text and "28 87" not in text, text
    policy = card["contract"]["pii_policy"]
    assert policy["site_added"] == {"entities": ["CARD"], "countries": ["DK"], "patterns": ["CASE"]}
    assert "CARD" not in card["pii_not_scanned"] and "IBAN" in card["pii_not_scanned"]
    # the federation's own policy is covered: train-local accepts the stricter data
    code, _out, err = run_cli(["train-local", "--config", config, "--site", "clinic", "--data", out,
                               "--global", folder / "registry", "--out", tmp_path / "updates", "--steps", "1"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--pii-pattern", "CASE", "NAME=REGEX"),
    ("--pii-pattern", "MRN=MRN\\d+", "already has MRN"),
    ("--pii-pattern", "case=x", "upper case"),
    ("--pii-country", "XX", "unknown country code XX"),
    ("--pii-entity", "NAMES", "--pii-entity"),
])
def test_bad_site_additions_are_one_error_line(fed, tmp_path, capsys, option, value, fragment):
    _config, folder = fed
    raw = write_jsonl(tmp_path / "raw.jsonl", SMALL_RECORDS)
    code, _stdout, err = run_cli(["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input", raw,
                                  "--out", tmp_path / "prepared", option, value], capsys)
    assert code == 2, err
    assert fragment in _one_error_line(err)
    assert not (tmp_path / "prepared").exists()


def _forged(small_run, tmp_path: Path, change) -> Path:
    """A copy of the small site's prepared folder whose card records another PII policy."""
    import shutil

    out, _card, _text = small_run
    copy = tmp_path / "forged"
    shutil.copytree(out, copy)
    card = json.loads((copy / "data_card.json").read_text())
    change(card["contract"]["pii_policy"])
    (copy / "data_card.json").write_text(json.dumps(card), encoding="utf-8")
    return copy


def _train_local(fed, data: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    _config, folder = fed
    code, _out, err = run_cli(["train-local", "--config", folder / "federation.yaml", "--site", "clinic", "--data", data,
                               "--global", folder / "registry", "--out", tmp_path / "updates", "--steps", "1"], capsys)
    return code, err


def _drop_first_term(policy: dict) -> None:
    policy["deny_list_term_sha256"] = policy["deny_list_term_sha256"][1:]


WEAKER = {
    "entity": (lambda p: p["entities"].remove("PHONE"), "entities PHONE not applied"),
    "country": (lambda p: p["countries"].remove("NL"), "countries NL not applied"),
    "pattern changed": (lambda p: p["patterns"].update(MRN=r"MRN-\d{7}"), "patterns MRN had another regex"),
    "pattern missing": (lambda p: p["patterns"].pop("MRN"), "patterns MRN not applied"),
    "deny-list": (_drop_first_term, "deny_list: 1 term(s) not applied"),
}


@pytest.mark.parametrize("case", list(WEAKER))
def test_train_local_refuses_a_weaker_pii_policy(fed, small_run, tmp_path, capsys, case):
    change, fragment = WEAKER[case]
    code, err = _train_local(fed, _forged(small_run, tmp_path, change), tmp_path, capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert "another PII policy, weaker than federation.yaml's" in line and fragment in line, line
    assert not (tmp_path / "updates").exists()


def test_train_local_accepts_a_stricter_pii_policy(fed, small_run, tmp_path, capsys):
    import hashlib

    def stricter(policy: dict) -> None:
        policy["entities"].append("PERSON_NAME")
        policy["countries"] += ["DK", "NO"]
        policy["patterns"]["CASE"] = r"CASE-\d{6}"
        policy["deny_list_term_sha256"].append(hashlib.sha256(b"another term").hexdigest())

    code, err = _train_local(fed, _forged(small_run, tmp_path, stricter), tmp_path, capsys)
    assert code == 0, err


def test_a_card_from_before_per_term_hashes_needs_the_same_deny_list(fed, small_run, tmp_path, capsys):
    code, err = _train_local(fed, _forged(small_run, tmp_path, lambda p: p.pop("deny_list_term_sha256")), tmp_path, capsys)
    assert code == 0, err
    forged = _forged(small_run, tmp_path / "b", lambda p: (p.pop("deny_list_term_sha256"),
                                                           p.update(deny_list_sha256="0" * 64)))
    code, err = _train_local(fed, forged, tmp_path / "b", capsys)
    assert code == 2 and "deny_list differs" in _one_error_line(err), err


# ---------------------------------------------------------------------------------------------- spaCy pipelines

def _spacy_pipeline(folder: Path, label: str) -> Path:
    """A blank English spaCy pipeline whose entity ruler tags two surnames: it checks the wiring of a spaCy
    --ner-model, not the quality of any model."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": label, "pattern": "Lindqvist"},
                                               {"label": label, "pattern": [{"LOWER": "ximena"}, {"LOWER": "okafor"}]}])
    nlp.to_disk(folder)
    return folder


def test_a_spacy_pipeline_finds_person_names(tmp_path):
    scrubber = PiiScrubber(PiiPolicy(ner_model=str(_spacy_pipeline(tmp_path / "nlp", "PERSON"))))
    counts: Counter = Counter()
    out = scrubber.scrub("Ximena Okafor called; Dr. Lindqvist phoned twice about room 12.", counts)
    assert out == "<PERSON> called; Dr. <PERSON> phoned twice about room 12." and counts == {"PERSON": 2}


def test_a_spacy_pipeline_without_person_labels_is_refused(fed, tmp_path, capsys):
    _config, folder = fed
    model = _spacy_pipeline(tmp_path / "nlp", "ORG")
    code, _stdout, err = run_cli(["prepare", "--config", folder / "federation.yaml", "--site", "clinic", "--input",
                                  write_jsonl(tmp_path / "raw.jsonl", SMALL_RECORDS), "--dry-run", "--ner-model", model],
                                 capsys)
    assert code == 2, err
    assert str(model) in _one_error_line(err) and "PERSON" in _one_error_line(err)
