"""Recall and precision of `prepare`'s PII step on values nobody here wrote: Faker's generators, many locales.

    pip install faker
    python benchmarks/pii_recall.py                          # the default policy (data.pii defaults)
    python benchmarks/pii_recall.py --countries US           # another data.pii.countries
    python benchmarks/pii_recall.py --compare "US;US,GB,DE,FR,ES,IT,NL;default;default,DK"   # a row per set
    python benchmarks/pii_recall.py --speed 20000            # also: records/s on benchmarks/prepare.py's corpus
    python benchmarks/pii_recall.py --names --ner-model en_core_web_sm   # person names, with a detector

Planted values: for each locale, Faker's emails, phone numbers (`phone_number()`, which draws from every
format the locale has, extensions included, and `cellphone_number()` where the locale has one), card
numbers of every card type (written as Faker gives them and grouped in fours), IBANs (compact and grouped),
IPv4/IPv6 addresses, and the locale's national IDs (`ssn()` and the other ID generators it has). Each value
sits in a clinical or banking sentence. A value counts as removed only when every letter and digit of it was
replaced (a phone number whose extension survives is a miss).

Clean records are two sentences full of numbers that are not PII (dates and times in the locale's formats,
amounts, ICD-10 codes, order, invoice, lot and ticket numbers, versions, lab values and measurements, ISBNs,
postcodes); precision is the share of clean records left exactly as they were.

The scrubber is fedtune's own (`PiiScrubber` with the federation's `data.pii` settings), the one `prepare` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORE_LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"]
EXTRA_LOCALES = ["en_CA", "en_IE", "en_AU", "de_AT", "de_CH", "fr_CH", "nl_BE", "pt_PT", "pl_PL", "sv_SE", "da_DK"]
# National ID generators beyond `ssn()` that a locale's Faker provider has.
EXTRA_IDS = {"en_US": ["itin"], "de_DE": ["kvnr", "rvnr"], "es_ES": ["nif", "nie", "nuss"]}

TEMPLATES = {
    "email": ["Please send the discharge letter to {v} before Friday.",
              "{name} asked that lab results go to {v} from now on.",
              "Statements for this account are e-mailed to {v}.",
              "The customer's new contact address is {v}; the old one bounces.",
              "Referral from Dr. {last} ({v}) attached.", "E-mail: {v}"],
    "phone": ["Patient asked to be called back on {v} once the MRI report is signed.",
              "{name} can be reached at {v} between 9 and 5.",
              "Next of kin: {name}, tel. {v}.", "The account holder changed her mobile number to {v} on {date}.",
              "Fraud team tried {v} twice on {date}; no answer.", "Phone: {v}",
              "Cardiology follow-up, contact number {v} (mobile).",
              "If the card is blocked, the customer should ring {v}."],
    "card": ["The patient paid the co-payment with card {v} at reception.",
             "Customer disputes a charge of 129.90 on card {v}.", "Card number {v} was reported stolen on {date}.",
             "Please refund the deposit to the card ending ... no, the full number is {v}.", "Card: {v}",
             "Recurring payment for the gym membership is taken from {v}."],
    "iban": ["Please transfer the reimbursement to IBAN {v} by the end of the month.",
             "Salary of {name} is paid into {v}.", "Direct debit mandate for account {v} signed on {date}.",
             "IBAN: {v}", "Refunds for the private treatment go to {v}."],
    "ip": ["The failed logins on the patient portal came from {v}.", "Whitelist {v} on the online-banking firewall.",
           "The infusion pump in ward 4 reports to {v}.", "Requests from {v} were rate-limited overnight."],
    "national_id": ["{name}'s national insurance number is {v}.", "ID {v} appears on the claim form.",
                    "Verify the applicant's ID number ({v}) before opening the account.",
                    "Insurance no. {v}, admitted on {date}.", "Tax ID: {v}"],
}

CLEAN = [
    "The follow-up is booked for {date} at {time}.", "Her last visit was on {date2}, the next is in {n} days.",
    "The invoice of {amount} is due on {date}.", "A consultation costs {amount} without insurance.",
    "The discharge summary lists {icd} as the main diagnosis.", "Code {icd} was billed on {n} claims last quarter.",
    "Order {order} shipped on {date}.", "Invoice {invoice} covers {n} hours of consulting.",
    "Ticket {ticket} was closed after {n} comments.", "Upgrade the client to version {version} before {date}.",
    "Blood pressure was {bp} mmHg, pulse {n}, temperature {temp} °C.", "HbA1c fell from {hba1c}% to {hba1c}%.",
    "Glucose {lab} mmol/L, creatinine {n} µmol/L, CRP {lab} mg/L.", "The patient weighs {kg} kg and is {cm} cm tall.",
    "Take {dose} mg twice daily for {n} days.", "Lot {lot} of the vaccine expires on {date}.",
    "The branch at {postcode} closes at {time} on Fridays.", "Mortgage of {amount} over {months} months at {rate}%.",
    "The fund returned {rate}% in {year}, against {rate}% in {year2}.", "The trial enrolled {big} patients.",
    "See ISBN {isbn}, chapter {n}.", "Purchase order {po} was approved on {date}.",
    "Build {build} of release {version} passed {big} tests.", "Room {room} on floor {floor} is booked from {time}.",
    "The balance was {amount} on {date} and {amount} on {date2}.", "Reference {ref} was filed on {date}.",
    "Between {date} and {date2} the ward admitted {n} patients.", "Median wait time fell to {n} minutes in {year}.",
]
ICD = ["E11.9", "I10", "J45.909", "M54.5", "K21.0", "F32.1", "N39.0", "Z00.00", "S52.501A", "C34.90", "R07.9"]
DATE_FORMATS = {"en_US": ["%m/%d/%Y", "%B %d, %Y"], "en_CA": ["%Y-%m-%d", "%B %d, %Y"]}
DATE_EU = ["%d.%m.%Y", "%d/%m/%Y", "%Y-%m-%d", "%d-%m-%Y", "%d %B %Y", "%d.%m.%y"]


def _faker(locale: str, seed: int):
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(seed)
    return fake


def _group(value: str, size: int = 4) -> str:
    return " ".join(value[i:i + size] for i in range(0, len(value), size))


def planted_values(locale: str, per_kind: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind, variant, value) for one locale."""
    fake = _faker(locale, seed)
    rng = random.Random(seed)
    out = []
    for i in range(per_kind):
        out.append(("email", "email", rng.choice([fake.email, fake.free_email, fake.company_email])()))
        out.append(("phone", "phone_number", fake.phone_number()))
        if hasattr(fake, "cellphone_number"):
            out.append(("phone", "cellphone_number", fake.cellphone_number()))
        iban = fake.iban()
        out.append(("iban", "iban " + ("grouped" if i % 2 else "compact"), _group(iban) if i % 2 else iban))
        out.append(("ip", "ipv4", fake.ipv4()))
        if i % 2:
            out.append(("ip", "ipv4_private", fake.ipv4_private()))
        else:
            out.append(("ip", "ipv6", fake.ipv6()))
        out.append(("national_id", "ssn", fake.ssn()))
        for generator in EXTRA_IDS.get(locale, []):
            out.append(("national_id", generator, getattr(fake, generator)()))
    provider = next(p for p in fake.get_providers() if type(p).__module__.startswith("faker.providers.credit_card"))
    card_types = [t for t in provider.credit_card_types if t not in ("visa", "jcb")]  # those two are aliases
    for i in range(per_kind):
        kind = card_types[i % len(card_types)]
        number = fake.credit_card_number(kind)
        grouped = (i // len(card_types)) % 2 == 1
        out.append(("card", f"{kind} {'grouped' if grouped else 'plain'}", _group(number) if grouped else number))
    return out


def planted_sentence(rng: random.Random, fake, kind: str, value: str) -> tuple[str, str, str]:
    """(prefix, value, suffix) of one sentence."""
    template = rng.choice(TEMPLATES[kind])
    fields = {"name": fake.name(), "last": fake.last_name(), "date": fake.date(rng.choice(DATE_EU))}
    before, after = template.split("{v}")
    return before.format(**fields), value, after.format(**fields)


def clean_record(rng: random.Random, fake, locale: str) -> str:
    def field(name: str) -> str:
        formats = DATE_FORMATS.get(locale, DATE_EU)
        decimal = "." if locale.startswith("en") else ","
        values = {
            "date": lambda: fake.date(rng.choice(formats)), "date2": lambda: fake.date(rng.choice(formats)),
            "time": lambda: rng.choice([fake.time("%H:%M"), fake.time("%I:%M %p"), fake.time("%Hh%M")]),
            "n": lambda: str(rng.randint(2, 480)), "amount": lambda: fake.pricetag(),
            "icd": lambda: rng.choice(ICD), "order": lambda: rng.choice(
                [f"#{rng.randint(100000, 9999999)}", f"{rng.randint(100, 999)}-{rng.randint(1000000, 9999999)}",
                 f"ORD-{rng.randint(2019, 2026)}-{rng.randint(0, 999999):06d}", str(rng.randint(10**7, 10**9))]),
            "invoice": lambda: f"INV-{rng.randint(2019, 2026)}-{rng.randint(1, 99999):05d}",
            "ticket": lambda: f"{rng.choice(['OPS', 'CLIN', 'BANK'])}-{rng.randint(10, 99999)}",
            "version": lambda: rng.choice([f"{rng.randint(1, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}",
                                           f"10.0.{rng.randint(10000, 22999)}.{rng.randint(1, 5000)}"]),
            "bp": lambda: f"{rng.randint(100, 180)}/{rng.randint(60, 110)}",
            "temp": lambda: f"{rng.randint(35, 40)}{decimal}{rng.randint(0, 9)}",
            "hba1c": lambda: f"{rng.randint(5, 12)}{decimal}{rng.randint(0, 9)}",
            "lab": lambda: f"{rng.randint(1, 30)}{decimal}{rng.randint(0, 9)}",
            "kg": lambda: f"{rng.randint(40, 140)}{decimal}{rng.randint(0, 9)}",
            "cm": lambda: str(rng.randint(140, 210)),
            "dose": lambda: rng.choice(["0.5", "2.5", "5", "10", "20", "40", "250", "500", "1000"]),
            "lot": lambda: rng.choice([f"{rng.randint(1000000, 9999999)}", f"AB{rng.randint(10000, 99999)}"]),
            "postcode": lambda: fake.postcode(), "months": lambda: str(rng.choice([12, 24, 60, 120, 240, 360])),
            "rate": lambda: f"{rng.randint(0, 9)}{decimal}{rng.randint(0, 99):02d}",
            "year": lambda: str(rng.randint(1990, 2026)), "year2": lambda: str(rng.randint(1990, 2026)),
            "big": lambda: f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}" if decimal == "." else
            f"{rng.randint(1, 99)}.{rng.randint(0, 999):03d}",
            "isbn": lambda: fake.isbn13(), "po": lambda: f"45{rng.randint(0, 99999999):08d}",
            "build": lambda: str(rng.randint(1000, 99999)), "room": lambda: str(rng.randint(100, 940)),
            "floor": lambda: str(rng.randint(1, 12)),
            "ref": lambda: rng.choice([f"{rng.randint(2019, 2026)}/{rng.randint(1, 99999):05d}",
                                       f"{rng.randint(10, 99)}-{rng.randint(100000, 999999)}"]),
        }
        return values[name]()

    sentences = rng.sample(CLEAN, 2)
    return " ".join(re.sub(r"\{(\w+)\}", lambda m: field(m.group(1)), s) for s in sentences)


def removed(original: str, out: str, start: int, end: int) -> bool:
    """Whether every letter and digit of original[start:end] was replaced in `out`: the part of `original` that
    `out` left unchanged at both ends must not reach into the value's letters and digits."""
    head = 0
    while head < min(len(original), len(out)) and original[head] == out[head]:
        head += 1
    tail = 0
    while (tail < min(len(original), len(out)) - head and original[-1 - tail] == out[-1 - tail]):
        tail += 1
    kept = [i for i in range(start, end) if original[i].isalnum() and (i < head or i >= len(original) - tail)]
    return not kept


def policy_for(countries: list[str] | None, ner_model: str | None = None):
    from fedtune.config import PiiSettings
    from fedtune.data.pii import PiiPolicy

    settings = PiiSettings() if countries is None else PiiSettings(countries=countries)
    return PiiPolicy.of(settings, [], ner_model)


def measure(countries: list[str] | None, locales: list[str], per_kind: int, clean_per_locale: int, seed: int,
            show: int) -> dict:
    from fedtune.data.pii import PiiScrubber

    policy = policy_for(countries)
    scrubber = PiiScrubber(policy)
    hits: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    misses: dict[tuple[str, str], list[str]] = defaultdict(list)
    types: dict[str, Counter] = defaultdict(Counter)
    clean_total = clean_kept = 0
    altered: list[str] = []
    for n, locale in enumerate(locales):
        fake = _faker(locale, seed + n)
        rng = random.Random(seed * 1000 + n)
        for kind, variant, value in planted_values(locale, per_kind, seed + n):
            before, value, after = planted_sentence(rng, fake, kind, value)
            text = before + value + after
            counts: Counter = Counter()
            out = scrubber.scrub(text, counts)
            ok = removed(text, out, len(before), len(before) + len(value))
            hits[(locale, kind)][0] += ok
            hits[(locale, kind)][1] += 1
            types[kind].update(counts)
            if not ok:
                seen = out[len(before) - 3:len(out) - len(after) + 3]
                misses[(locale, kind)].append(f"{variant}: {value!r} -> {seen!r}")
        for _ in range(clean_per_locale):
            text = clean_record(rng, fake, locale)
            out = scrubber.scrub(text, Counter())
            clean_total += 1
            if out == text:
                clean_kept += 1
            else:
                altered.append(f"{locale}: {text!r} -> {out!r}")
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_locale: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (locale, kind), (found, total) in hits.items():
        for table, key in ((by_kind, kind), (by_locale, locale)):
            table[key][0] += found
            table[key][1] += total
    core = [hits[(loc, k)] for loc in CORE_LOCALES if loc in locales for k in TEMPLATES]
    found = sum(h[0] for h in hits.values())
    total = sum(h[1] for h in hits.values())
    return {
        "countries": policy.countries, "locales": locales, "planted": total, "removed": found,
        "recall": round(found / total, 4),
        "recall_core_locales": round(sum(h[0] for h in core) / max(1, sum(h[1] for h in core)), 4),
        "recall_by_kind": {k: round(f / t, 4) for k, (f, t) in sorted(by_kind.items())},
        "recall_by_locale": {k: round(f / t, 4) for k, (f, t) in by_locale.items()},
        "recall_by_locale_kind": {f"{loc} {k}": [f, t] for (loc, k), (f, t) in sorted(hits.items())},
        "clean_records": clean_total, "clean_untouched": clean_kept,
        "clean_precision": round(clean_kept / clean_total, 4),
        "placeholders_by_kind": {k: dict(v.most_common()) for k, v in sorted(types.items())},
        "missed_examples": {f"{loc} {k}": v[:show] for (loc, k), v in sorted(misses.items())},
        "altered_clean_examples": altered[:show * 4],
    }


def speed(records: int, countries: list[str] | None) -> dict:
    """Records per second of the PII step alone (one process, best of three passes) on benchmarks/prepare.py's
    generated records."""
    import importlib.util

    from fedtune.data.pii import PiiScrubber

    spec = importlib.util.spec_from_file_location("prepare_bench", ROOT / "benchmarks" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = random.Random(0)
    texts = []
    for _ in range(records):
        row = module.make_record(rng)
        parts = [m["content"] for m in row["messages"]] if "messages" in row else \
            [row["text"]] if "text" in row else [row["instruction"], row["output"]]
        texts.append(parts)
    scrubber = PiiScrubber(policy_for(countries))
    walls = []
    for _ in range(3):  # the best of three passes: timings on a shared machine move by a tenth
        counts: Counter = Counter()
        started = time.perf_counter()
        for parts in texts:
            for part in parts:
                scrubber.scrub(part, counts)
        walls.append(time.perf_counter() - started)
    return {"records": records, "seconds": round(min(walls), 2), "records_per_s": round(records / min(walls)),
            "replaced": sum(counts.values())}


def names(locales: list[str], count: int, seed: int, ner_model: str | None) -> dict:
    """Recall on Faker person names (first and last name, no titles) in clinical and banking sentences, and the
    clean records in which the detector finds a person."""
    from fedtune.data.pii import PiiScrubber

    scrubber = PiiScrubber(policy_for(None, ner_model))
    templates = ["{v} was admitted on {date} with chest pain.", "Dr. {v} signed the discharge letter.",
                 "The account was opened by {v} in {year}.", "Please call {v} about the overdue invoice.",
                 "Next of kin: {v} (daughter).", "Referral for {v}, see attached results.",
                 "{v}'s mortgage application was approved.", "Patient {v} missed the follow-up appointment.",
                 "Transfer of 250.00 EUR from {v} to the savings account.", "Seen today: {v}, 54, with a cough."]
    found = total = 0
    by_locale: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    missed = []
    started = time.perf_counter()
    for n, locale in enumerate(locales):
        fake = _faker(locale, seed + n)
        rng = random.Random(seed + n)
        for _ in range(count):
            value = f"{fake.first_name()} {fake.last_name()}"
            before, after = rng.choice(templates).split("{v}")
            fields = {"date": fake.date("%d.%m.%Y"), "year": str(rng.randint(1990, 2026))}
            before, after = before.format(**fields), after.format(**fields)
            text = before + value + after
            out = scrubber.scrub(text, Counter())
            ok = removed(text, out, len(before), len(before) + len(value))
            found += ok
            total += 1
            by_locale[locale][0] += ok
            by_locale[locale][1] += 1
            if not ok and len(missed) < 12:
                missed.append(f"{locale}: {out}")
    seconds = time.perf_counter() - started
    clean = with_person = 0
    examples = []
    for n, locale in enumerate(locales):
        fake, rng = _faker(locale, seed + 100 + n), random.Random(seed + 100 + n)
        for _ in range(count):
            text = clean_record(rng, fake, locale)
            counts: Counter = Counter()
            out = scrubber.scrub(text, counts)
            clean += 1
            if counts["PERSON"]:
                with_person += 1
                if len(examples) < 8:
                    examples.append(f"{locale}: {out}")
    return {"ner_model": ner_model, "names": total, "removed": found, "recall": round(found / total, 4),
            "recall_by_locale": {k: round(f / t, 4) for k, (f, t) in by_locale.items()},
            "clean_records": clean, "clean_with_a_person_found": with_person,
            "clean_precision": round((clean - with_person) / clean, 4), "sentences_per_s": round(total / seconds),
            "missed_examples": missed, "clean_person_examples": examples}


def _countries(text: str) -> list[str] | None:
    """'default' (None: PiiSettings' default), 'default,DK' (the default and more), ALL (every locale's country)
    or a comma-separated list."""
    from fedtune.config import DEFAULT_PII_COUNTRIES

    codes = [c.strip().upper() for c in text.split(",") if c.strip()]
    if codes == ["DEFAULT"]:
        return None
    if codes[:1] == ["DEFAULT"]:
        return list(DEFAULT_PII_COUNTRIES) + codes[1:]
    if codes == ["ALL"]:
        return sorted({loc.split("_")[1] for loc in CORE_LOCALES + EXTRA_LOCALES})
    return codes


def _print(result: dict, show: int) -> None:
    print(f"countries {','.join(result['countries'])}: recall {result['recall']:.4f} "
          f"({result['removed']}/{result['planted']}), on {', '.join(CORE_LOCALES)}: "
          f"{result['recall_core_locales']:.4f}; "
          f"clean records untouched {result['clean_untouched']}/{result['clean_records']} "
          f"({result['clean_precision']:.4f})")
    kinds = list(TEMPLATES)
    print(f"{'locale':8} " + " ".join(f"{k:>11}" for k in kinds) + f" {'all':>7}")
    for locale in result["locales"]:
        cells = []
        for kind in kinds:
            f, t = result["recall_by_locale_kind"].get(f"{locale} {kind}", [0, 0])
            cells.append(f"{f:>5}/{t:<5}" if t else f"{'-':>11}")
        print(f"{locale:8} " + " ".join(cells) + f" {result['recall_by_locale'][locale]:>7.4f}")
    print("per kind: " + ", ".join(f"{k} {v:.4f}" for k, v in result["recall_by_kind"].items()))
    if show:
        for key, values in result["missed_examples"].items():
            print(f"  missed {key}: " + "; ".join(values))
        for line in result["altered_clean_examples"]:
            print(f"  altered clean {line}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--countries", default="default",
                        help="data.pii.countries: comma-separated, 'default', 'default,DK' (more) or ALL")
    parser.add_argument("--compare", help="several country sets separated by ';' (summary rows only)")
    parser.add_argument("--locales", default=",".join(CORE_LOCALES + EXTRA_LOCALES))
    parser.add_argument("--per-kind", type=int, default=60, help="values of each kind per locale")
    parser.add_argument("--clean", type=int, default=300, help="clean records per locale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="missed values shown per locale and kind")
    parser.add_argument("--speed", type=int, default=0, help="also time the PII step on this many records")
    parser.add_argument("--names", action="store_true", help="person names instead (with --ner-model)")
    parser.add_argument("--ner-model", help="as `prepare --ner-model`")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    locales = [loc.strip() for loc in args.locales.split(",") if loc.strip()]
    if args.names:
        result = names(locales, args.per_kind, args.seed, args.ner_model)
        print(json.dumps(result, indent=None if args.json else 1))
        return
    if args.compare:
        rows = []
        for text in args.compare.split(";"):
            result = measure(_countries(text), locales, args.per_kind, args.clean, args.seed, 0)
            if args.speed:
                result["speed"] = speed(args.speed, _countries(text))
            rows.append(result)
            speed_text = f" {result['speed']['records_per_s']} records/s" if args.speed else ""
            print(f"{','.join(result['countries']):40} recall {result['recall']:.4f} ({result['removed']}/"
                  f"{result['planted']}) core {result['recall_core_locales']:.4f} "
                  f"clean {result['clean_precision']:.4f} ({result['clean_untouched']}/{result['clean_records']})"
                  f"{speed_text}", flush=True)
        if args.json:
            print(json.dumps(rows))
        return
    result = measure(_countries(args.countries), locales, args.per_kind, args.clean, args.seed, args.show)
    if args.speed:
        result["speed"] = speed(args.speed, _countries(args.countries))
    if args.json:
        print(json.dumps(result))
        return
    _print(result, args.show)
    if args.speed:
        s = result["speed"]
        print(f"speed: {s['records']} records in {s['seconds']} s, {s['records_per_s']} records/s "
              "(PII step, one process)")


if __name__ == "__main__":
    main()
