"""A seeded corpus of realistic records with planted PII, and clean sentences full of ordinary numbers.

Every planted value is generated at random and is genuinely valid: phone numbers pass
`phonenumbers.is_valid_number` for their country, IBANs carry correct mod-97 check digits (and the national
check digits where a country has them), card numbers pass Luhn, SSNs pass `stdnum.us.ssn`. The tests use the
corpus to measure the scrubber's recall (`corpus`) and its precision on clean text (`clean_sentences`).

Imported as `piicorpus` (tests/ is on sys.path through conftest.py).
"""

from __future__ import annotations

import ipaddress
import random
import re
import string
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.us import ssn as std_ssn

PHONE_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL")
IBAN_COUNTRIES = ("DE", "GB", "FR", "ES", "IT", "NL")
CARD_ISSUERS = ("visa", "mastercard", "mastercard2", "amex", "discover")

# The placeholder each kind of planted value must become.
PLACEHOLDER = {"email": "EMAIL", "phone": "PHONE", "iban": "IBAN", "card": "CARD", "ssn": "US_SSN", "ip": "IP"}


@dataclass(frozen=True)
class Planted:
    """One planted value: `kind` (email, phone, iban, card, ssn, ip), `variant` (e.g. 'DE national',
    'amex grouped'), the text as written, and the placeholder it must become."""

    kind: str
    variant: str
    value: str

    @property
    def placeholder(self) -> str:
        return PLACEHOLDER[self.kind]

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.variant}"

    @property
    def digits(self) -> str:
        return re.sub(r"\D", "", self.value)


# ---------------------------------------------------------------------------------------------- values

FIRST = ["anna", "bert", "carla", "dmitri", "elena", "farid", "grace", "hugo", "ines", "jonas", "keiko", "liam",
         "marta", "nils", "olga", "pablo", "quentin", "rosa", "sven", "tariq", "ursula", "victor", "wen", "ximena",
         "yusuf", "zoe", "amelie", "bruno", "chiara", "diego", "emma", "finn", "giulia", "hannah", "ivan", "julia",
         "kofi", "lucia", "mateo", "noor", "oscar", "priya", "rafael", "sofia", "tomas", "valentina", "willem"]
LAST = ["mueller", "schmidt", "garcia", "rossi", "dubois", "jansen", "smith", "okafor", "nguyen", "kowalski",
        "martin", "bianchi", "fernandez", "de-vries", "bakker", "moreau", "lopez", "russo", "walker", "hughes",
        "schneider", "fischer", "leroy", "romero", "ricci", "visser", "evans", "patel", "oconnor", "lindqvist"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "web.de", "gmx.net", "orange.fr", "free.fr", "telefonica.es",
           "libero.it", "ziggo.nl", "protonmail.com", "icloud.com", "stmarys-hospital.org.uk", "charite.de",
           "klinikum-nord.de", "aphp.fr", "hospitalclinic.org", "policlinico.it", "umcutrecht.nl",
           "northbank.co.uk", "sparkasse-bremen.de", "credit-agricole.fr", "bbva.es", "intesasanpaolo.com",
           "rabobank.nl", "acme-software.io", "devshop.dev", "cloudops.net", "mail.example.org", "lab.university.edu",
           "health.gov", "cityclinic.health", "fintech.ai", "support.acme.com", "team.eu"]


def email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice([
        f"{first}.{last}", f"{first}_{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}",
        f"{first}.{last}{rng.randint(70, 99)}", f"{last}.{first[0]}", f"{first}+{rng.choice(['billing', 'lab', 'news'])}",
        f"{first[0]}.{last}-{rng.randint(1, 9)}", f"{rng.choice(['info', 'billing', 'it-support', 'records'])}.{last}",
        f"{first.upper()}.{last.capitalize()}",
    ])
    return f"{local}@{rng.choice(DOMAINS)}"


def _digits(rng: random.Random, n: int, first: str = "0123456789") -> str:
    return rng.choice(first) + "".join(rng.choice(string.digits) for _ in range(n - 1)) if n else ""


def _us_phone(rng: random.Random, international: bool) -> str:
    area = rng.choice(["212", "213", "305", "312", "415", "617", "646", "702", "713", "808", "206", "303", "404",
                       "512", "503", "602", "615", "720", "919", "971"])
    while True:
        exchange = _digits(rng, 3, "23456789")
        if exchange[1:] != "11" and exchange != "555":
            break
    line = _digits(rng, 4)
    if international:
        form = rng.choice(["+1 {a} {e} {l}", "+1 ({a}) {e}-{l}", "+1-{a}-{e}-{l}", "+1 {a}-{e}-{l}", "+1.{a}.{e}.{l}"])
    else:
        form = rng.choice(["({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "{a} {e} {l}", "1-{a}-{e}-{l}", "({a}) {e} {l}"])
    return form.format(a=area, e=exchange, l=line)


def _gb_phone(rng: random.Random, international: bool) -> str:
    kind = rng.choice(["london", "mobile", "mobile", "city"])
    if kind == "london":
        a, b = "20", _digits(rng, 4, "378") + " " + _digits(rng, 4)
    elif kind == "mobile":
        a, b = "7" + _digits(rng, 3, "45789"), _digits(rng, 6)
        b = rng.choice([b, f"{b[:3]} {b[3:]}"])
    else:
        a = rng.choice(["161", "131", "117", "113", "121", "141", "151"])
        b = _digits(rng, 3, "2345679") + " " + _digits(rng, 4)
    if international:
        return rng.choice([f"+44 {a} {b}", f"+44 (0){a} {b}", f"+44 (0) {a} {b}"])
    return rng.choice([f"0{a} {b}", f"(0{a}) {b}"] + ([f"0{a}-{b.replace(' ', '-')}"] if kind != "mobile" else []))


def _de_phone(rng: random.Random, international: bool) -> str:
    if rng.random() < 0.5:
        prefix = rng.choice(["151", "152", "157", "159", "160", "162", "163", "170", "171", "172", "173", "174",
                             "175", "176", "177", "178", "179"])
        number = _digits(rng, rng.choice([7, 8]), "123456789")  # lengths differ by prefix; invalid ones are retried
    else:
        prefix, size = rng.choice([("30", 8), ("89", 7), ("40", 8), ("69", 7), ("221", 7), ("211", 7), ("711", 7),
                                   ("341", 7), ("511", 7), ("351", 7), ("421", 7)])
        number = _digits(rng, size, "23456789")
    if international:
        return rng.choice([f"+49 {prefix} {number}", f"+49 (0){prefix} {number}", f"+49 {prefix}-{number}",
                           f"+49{prefix}{number}"])
    return rng.choice([f"0{prefix} {number}", f"0{prefix}/{number}", f"0{prefix}-{number}", f"(0{prefix}) {number}",
                       f"0{prefix} {number[:3]} {number[3:]}"])


def _fr_phone(rng: random.Random, international: bool) -> str:
    first = rng.choice("1234567")
    pairs = [_digits(rng, 2) for _ in range(4)]
    if international:
        return rng.choice([f"+33 {first} {' '.join(pairs)}", f"+33 (0){first} {' '.join(pairs)}",
                           f"+33{first}{''.join(pairs)}", f"+33 {first}.{'.'.join(pairs)}"])
    sep = rng.choice([" ", " ", ".", "-", ""])
    return sep.join([f"0{first}"] + pairs)


def _es_phone(rng: random.Random, international: bool) -> str:
    if rng.random() < 0.5:
        n = rng.choice(["6" + _digits(rng, 8), "7" + rng.choice("1234") + _digits(rng, 7)])
        groups = rng.choice([[n[:3], n[3:6], n[6:]], [n[:3], n[3:5], n[5:7], n[7:]]])
    else:
        n = "9" + rng.choice("12345678") + _digits(rng, 7, "123456789")
        groups = rng.choice([[n[:2], n[2:5], n[5:7], n[7:]], [n[:3], n[3:6], n[6:]]])
    sep = rng.choice([" ", " ", "-"])
    body = rng.choice([sep.join(groups), n])
    return f"+34 {body}" if international else body


def _it_phone(rng: random.Random, international: bool) -> str:
    if rng.random() < 0.5:
        prefix = rng.choice(["320", "328", "329", "333", "334", "335", "338", "339", "340", "345", "347", "348",
                             "349", "366", "380", "388", "389", "391", "392"])
        rest = _digits(rng, 7)
        body = rng.choice([f"{prefix} {rest[:3]} {rest[3:]}", f"{prefix} {rest}", f"{prefix}-{rest}", f"{prefix}{rest}",
                           f"{prefix}.{rest}"])
    else:
        prefix, size = rng.choice([("06", 8), ("02", 8), ("011", 7), ("055", 7), ("051", 7), ("081", 7), ("010", 7)])
        rest = _digits(rng, size, "23456789")
        body = rng.choice([f"{prefix} {rest[:4]} {rest[4:]}", f"{prefix} {rest}", f"{prefix}-{rest}", f"{prefix}/{rest}"])
    return f"+39 {body}" if international else body


def _nl_phone(rng: random.Random, international: bool) -> str:
    if rng.random() < 0.5:
        a, rest = "6", _digits(rng, 8, "12345678")
        b = rng.choice([rest, f"{rest[:4]} {rest[4:]}", f"{rest[:2]} {rest[2:4]} {rest[4:6]} {rest[6:]}"])
    else:
        a = rng.choice(["20", "10", "70", "30", "40", "50", "71", "73", "76", "13", "24", "26", "43", "45"])
        rest = _digits(rng, 9 - len(a), "23456789")
        b = rng.choice([rest, f"{rest[:3]} {rest[3:]}"])
    if international:
        return rng.choice([f"+31 {a} {b}", f"+31 (0){a} {b}", f"+31 (0) {a} {b}", f"+31{a}{b.replace(' ', '')}"])
    return rng.choice([f"0{a} {b}", f"0{a}-{b}", f"(0{a}) {b}"])


_PHONE_MAKERS = {"US": _us_phone, "GB": _gb_phone, "DE": _de_phone, "FR": _fr_phone, "ES": _es_phone,
                 "IT": _it_phone, "NL": _nl_phone}


def phone(rng: random.Random, country: str, international: bool) -> str:
    """A valid number of `country`, in one of the ways people write it (national or +CC international)."""
    for _ in range(200):
        value = _PHONE_MAKERS[country](rng, international)
        try:
            parsed = phonenumbers.parse(value, country)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed) and phonenumbers.region_code_for_number(parsed) == country:
            return value
    raise AssertionError(f"could not generate a valid {country} phone number")


def _iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616 check digits: move country + '00' behind the BBAN, letters to numbers, 98 - (n mod 97)."""
    rearranged = bban + country + "00"
    number = int("".join(str(int(ch, 36)) for ch in rearranged))
    return f"{98 - number % 97:02d}"


def _es_ccc_digit(digits: str) -> str:
    weights = [1, 2, 4, 8, 5, 10, 9, 7, 3, 6]
    value = 11 - sum(w * int(d) for w, d in zip(weights[-len(digits):], digits, strict=True)) % 11
    return {10: "1", 11: "0"}.get(value, str(value))


def _fr_rib_key(bank: str, branch: str, account: str) -> str:
    return f"{97 - (89 * int(bank) + 15 * int(branch) + 3 * int(account)) % 97:02d}"


_IT_ODD = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21]


def _it_cin(abi: str, cab: str, account: str) -> str:
    chars = abi + cab + account
    total = sum(_IT_ODD[int(c)] if i % 2 == 0 else int(c) for i, c in enumerate(chars))
    return string.ascii_uppercase[total % 26]


def _bban(rng: random.Random, country: str) -> str:
    if country == "DE":
        bank = rng.choice(["37040044", "10010010", "50010517", "20041133", "70150000", "12030000", "43060967"])
        return bank + _digits(rng, 10)
    if country == "GB":
        return rng.choice(["NWBK", "BARC", "LOYD", "HBUK", "MIDL", "NAIA", "MONZ"]) + _digits(rng, 6) + _digits(rng, 8)
    if country == "FR":
        bank = rng.choice(["30006", "30003", "20041", "10278", "30004"])
        branch, account = _digits(rng, 5), _digits(rng, 11)
        return bank + branch + account + _fr_rib_key(bank, branch, account)
    if country == "ES":
        bank = rng.choice(["2100", "0049", "0182", "2038", "0081", "1465"])
        branch, account = _digits(rng, 4), _digits(rng, 10)
        return bank + branch + _es_ccc_digit("00" + bank + branch) + _es_ccc_digit(account) + account
    if country == "IT":
        abi, cab, account = rng.choice(["03069", "02008", "05034", "01030", "03062"]), _digits(rng, 5), _digits(rng, 12)
        return _it_cin(abi, cab, account) + abi + cab + account
    if country == "NL":
        return rng.choice(["ABNA", "RABO", "INGB", "TRIO", "SNSB", "ASNB", "KNAB", "BUNQ"]) + _digits(rng, 10)
    raise ValueError(country)


def iban(rng: random.Random, country: str, grouped: bool, check_offset: int = 0) -> str:
    """An IBAN with correct check digits (`check_offset` != 0 makes them wrong, for look-alike tests)."""
    bban = _bban(rng, country)
    check = int(_iban_check_digits(country, bban))
    value = f"{country}{(check + check_offset - 2) % 97 + 2 if check_offset else check:02d}{bban}"
    assert std_iban.is_valid(value) == (check_offset == 0), value
    return std_iban.format(value) if grouped else value


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    return body + luhn.calc_check_digit(body)


def card(rng: random.Random, issuer: str, grouped: bool, valid: bool = True) -> str:
    if issuer == "visa":
        number = _luhn_complete("4", 16, rng)
    elif issuer == "mastercard":
        number = _luhn_complete(str(rng.randint(51, 55)), 16, rng)
    elif issuer == "mastercard2":
        number = _luhn_complete(str(rng.randint(2221, 2720)), 16, rng)
    elif issuer == "amex":
        number = _luhn_complete(rng.choice(["34", "37"]), 15, rng)
    elif issuer == "discover":
        number = _luhn_complete(rng.choice(["6011", "65", str(rng.randint(644, 649))]), 16, rng)
    else:
        raise ValueError(issuer)
    if not valid:
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    assert luhn.is_valid(number) == valid
    if not grouped:
        return number
    sep = rng.choice([" ", " ", "-"])
    if issuer == "amex":
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i:i + 4] for i in range(0, 16, 4))


def ssn(rng: random.Random) -> str:
    while True:
        value = f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if std_ssn.is_valid(value) and len(set(value.replace("-", ""))) > 2:
            return value


def ipv4(rng: random.Random) -> str:
    while True:
        first = rng.choice([10, 172, 192, rng.randint(11, 223)])
        if first == 172:
            octets = [172, rng.randint(16, 31), rng.randint(0, 255), rng.randint(1, 254)]
        elif first == 192:
            octets = [192, 168, rng.randint(0, 255), rng.randint(1, 254)]
        else:
            octets = [first, rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)]
        address = ipaddress.IPv4Address(".".join(map(str, octets)))
        if not address.is_loopback and not address.is_multicast:
            return str(address)


def ipv6(rng: random.Random) -> str:
    groups = [rng.choice(["2001", "2a00", "2a02", "2600", "fd12"])] + [f"{rng.randint(0, 0xFFFF):x}" for _ in range(7)]
    if rng.random() < 0.5:
        groups[2:5] = ["0", "0", "0"]
        return str(ipaddress.IPv6Address(":".join(groups)))  # compressed (::)
    return ":".join(groups)


# ---------------------------------------------------------------------------------------------- records

KIND_WEIGHTS = {"email": 3, "phone": 7, "iban": 4, "card": 4, "ssn": 2, "ipv4": 2, "ipv6": 1}


def planted_value(rng: random.Random, kind: str) -> Planted:
    if kind == "email":
        return Planted("email", "email", email(rng))
    if kind == "phone":
        country, international = rng.choice(PHONE_COUNTRIES), rng.random() < 0.5
        return Planted("phone", f"{country} {'international' if international else 'national'}",
                       phone(rng, country, international))
    if kind == "iban":
        country, grouped = rng.choice(IBAN_COUNTRIES), rng.random() < 0.5
        return Planted("iban", f"{country} {'grouped' if grouped else 'compact'}", iban(rng, country, grouped))
    if kind == "card":
        issuer, grouped = rng.choice(CARD_ISSUERS), rng.random() < 0.6
        return Planted("card", f"{issuer} {'grouped' if grouped else 'plain'}", card(rng, issuer, grouped))
    if kind == "ssn":
        return Planted("ssn", "dashed", ssn(rng))
    if kind == "ipv4":
        return Planted("ip", "v4", ipv4(rng))
    if kind == "ipv6":
        return Planted("ip", "v6", ipv6(rng))
    raise ValueError(kind)


CONTEXT = {
    "email": ["Send the signed form to {v} before Friday.", "You can reach {name} at {v}.",
              "Questions about the invoice go to {v}, not to the front desk.",
              "Her new address is {v}; the old one bounces.", "Please copy {v} on every reply about this account.",
              "The build bot mails failures to {v}.", "Contact: {v}"],
    "phone": ["Call the front desk on {v} to move the appointment.", "{name} can be reached at {v} during office hours.",
              "For urgent questions phone {v}.", "The on-call number is {v} (nights and weekends).",
              "Tel. {v}", "If the card is lost, ring {v} at once.", "Our branch manager's direct line: {v}.",
              "Leave a message on {v} and we will call back."],
    "iban": ["Please transfer the deposit to IBAN {v} by the end of the month.", "Refunds go to account {v}.",
             "The salary is paid into {v}.", "Standing order from {v}, reference rent.",
             "IBAN: {v}", "Wire the fee to {v} and quote the invoice number."],
    "card": ["The patient paid with card {v} at reception.", "Charge the annual fee to {v}.",
             "Card number {v} was reported stolen yesterday.", "Customer disputes a payment made with {v}.",
             "Card: {v}", "The subscription renews on the card ending in the number {v}."],
    "ssn": ["{name}'s social security number is {v}.", "SSN {v} appears on the claim form.",
            "The employer reported wages under SSN {v}.", "Verify the applicant's SSN ({v}) before approval."],
    "ip": ["The failed logins came from {v}.", "Whitelist {v} on the staging firewall.",
           "The lab printer is at {v}.", "Requests from {v} were rate-limited overnight.",
           "Server {name}-db listens on {v}, port 5432."],
}

PROSE = {
    "clinic": ["The clinic moved its diabetes follow-ups to Tuesday mornings.",
               "Nurses record blood pressure before every consultation.",
               "Referral letters are scanned into the patient record the same day.",
               "The pharmacy checks interactions before dispensing a new prescription.",
               "Radiology reports are signed by a consultant before release.",
               "Vaccination appointments fill up quickly in the autumn.",
               "The ward keeps a paper log in case the system is down."],
    "bank": ["The bank reviews overdraft limits once a year.", "A standing order runs until it is cancelled.",
             "Mortgage offers are valid for six months from the date of issue.",
             "Chargebacks take up to ten working days to process.",
             "The branch verifies identity before changing contact details.",
             "Savings interest is credited at the end of each quarter.",
             "Suspicious transfers are held for manual review."],
    "dev": ["The deploy pipeline runs the unit tests before every release.",
            "Rotate the service credentials whenever someone leaves the team.",
            "Incident reports name the service, the impact and the fix.",
            "Access logs are kept for ninety days and then deleted.",
            "The staging cluster mirrors production with smaller nodes.",
            "Code review needs one approval from the owning team.",
            "Feature flags are removed once a rollout reaches everyone."],
}
QUESTIONS = {
    "clinic": ["How do I reach the clinic about {topic}?", "Who handles {topic} at the clinic?",
               "What should a patient do about {topic}?", "Where is the note about {topic} kept?"],
    "bank": ["How does the bank handle {topic}?", "Where should a customer send details about {topic}?",
             "What happened with the {topic} case?", "Which account is used for {topic}?"],
    "dev": ["Who is responsible for {topic}?", "What do we know about the {topic} incident?",
            "How do I report a problem with {topic}?", "Where is {topic} configured?"],
}
TOPIC_WORDS = {
    "clinic": ["repeat prescriptions", "blood tests", "physiotherapy referrals", "vaccinations", "sick notes",
               "home visits", "test results", "allergy records", "dental check-ups", "maternity care"],
    "bank": ["card disputes", "overdrafts", "mortgage payments", "standing orders", "savings transfers",
             "loan repayments", "fraud alerts", "account closures", "currency exchange", "direct debits"],
    "dev": ["the staging firewall", "nightly builds", "database backups", "the login service", "API keys",
            "the VPN gateway", "log retention", "the payment webhook", "the build cache", "on-call alerts"],
}


def sentence(rng: random.Random, item: Planted) -> str:
    """A sentence holding `item` the way the corpus writes it."""
    name = rng.choice(FIRST).capitalize()
    return rng.choice(CONTEXT[item.kind]).format(v=item.value, name=name)


def corpus(seed: int = 0, records: int = 1100) -> tuple[list[dict], list[Planted]]:
    """`records` distinct records (instruction/output, conversations and plain text) about clinics, banks
    and software, holding 1-3 planted values each; returns (records, planted values)."""
    rng = random.Random(seed)
    kinds = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    rows, planted, seen = [], [], set()
    while len(rows) < records:
        domain = rng.choice(list(PROSE))
        values = [planted_value(rng, rng.choice(kinds)) for _ in range(rng.choice([1, 1, 2, 2, 2, 3]))]
        if any(v.value in seen for v in values):
            continue
        sentences = [sentence(rng, v) for v in values]
        prose = rng.sample(PROSE[domain], 2)
        topic = rng.choice(TOPIC_WORDS[domain])
        question = rng.choice(QUESTIONS[domain]).format(topic=topic)
        shape = len(rows) % 5
        if shape in (0, 1):  # instruction/output: the PII in the answer, sometimes in the question too
            if len(sentences) > 1 and rng.random() < 0.5:
                row = {"instruction": f"{question} {sentences[0]}",
                       "output": " ".join([prose[0], *sentences[1:], prose[1]])}
            else:
                row = {"instruction": question, "output": " ".join([prose[0], *sentences, prose[1]])}
        elif shape == 2:  # a conversation with the values spread over the turns
            turns = [{"role": "system", "content": f"You answer questions about {topic} for the {domain} team."},
                     {"role": "user", "content": f"{question} {sentences[0]}"},
                     {"role": "assistant", "content": f"{prose[0]} Noted."}]
            for extra in sentences[1:]:
                turns += [{"role": "user", "content": f"Also: {extra}"}, {"role": "assistant", "content": prose[1]}]
            row = {"messages": turns}
        else:  # plain text
            row = {"text": " ".join([prose[0], f"Regarding {topic}:", *sentences, prose[1]])}
        rows.append(row)
        planted.extend(values)
        seen.update(v.value for v in values)
    return rows, planted


# ---------------------------------------------------------------------------------------------- clean text

def _clean_numbers(rng: random.Random) -> dict[str, str]:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1995, 2026)
    return {
        "year": str(year), "year2": str(rng.randint(1950, 2030)),
        "iso": f"{year}-{month:02d}-{day:02d}", "eu": f"{day:02d}.{month:02d}.{year}", "us": f"{month}/{day}/{year}",
        "long_date": f"{day} {rng.choice(['January', 'March', 'June', 'September', 'November'])} {year}",
        "time": f"{rng.randint(7, 20)}:{rng.choice(['00', '15', '30', '45'])}",
        "usd": f"${rng.randint(1, 99)},{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}",
        "usd_small": f"${rng.randint(5, 999)}.{rng.randint(0, 99):02d}",
        "eur": f"EUR {rng.randint(1, 99)}.{rng.randint(0, 999):03d},{rng.randint(0, 99):02d}",
        "gbp": f"£{rng.randint(1, 250)},{rng.randint(0, 999):03d}",
        "big": f"{rng.randint(1, 9)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
        "pct": f"{rng.randint(1, 99)}.{rng.randint(0, 9)}%", "pct_int": f"{rng.randint(1, 100)}%",
        "dose": f"{rng.choice(['0.5', '2.5', '5', '10', '20', '40', '250', '500', '1000'])} mg",
        "ml": f"{rng.randint(1, 50) * 10} ml", "count": str(rng.randint(2, 480)),
        "count_k": f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}",
        "room": str(rng.randint(1, 9) * 100 + rng.randint(1, 40)), "floor": str(rng.randint(1, 12)),
        "icd": rng.choice(["E11.9", "I10", "J45.909", "M54.5", "K21.0", "F32.1", "N39.0", "Z00.00", "S52.501A"]),
        "version": f"{rng.randint(1, 12)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
        "order": f"#{rng.randint(100, 99999)}",
        "ticket": f"{rng.choice(['JIRA', 'OPS', 'BANK', 'CLIN'])}-{rng.randint(10, 9999)}",
        "bp": f"{rng.randint(100, 160)}/{rng.randint(60, 100)}", "temp": f"{rng.randint(36, 39)}.{rng.randint(0, 9)}",
        "port": str(rng.choice([22, 80, 443, 5432, 6379, 8080, 8443, 9090])),
        "ms": str(rng.randint(5, 2500)), "gb": str(rng.choice([4, 8, 16, 32, 64, 128, 256, 512])),
        "rate": f"{rng.randint(0, 9)}.{rng.randint(0, 99):02d}", "months": str(rng.choice([12, 24, 36, 48, 60, 120, 360])),
        "invoice": f"INV-{year}-{rng.randint(1, 9999):04d}", "page": str(rng.randint(1, 40)),
        "zip": f"{rng.randint(10000, 99999)}", "hba1c": f"{rng.randint(5, 11)}.{rng.randint(0, 9)}",
        "score": f"{rng.randint(0, 10)}/10", "ratio": f"{rng.randint(1, 9)}:{rng.randint(1, 9)}",
        "weight": f"{rng.randint(45, 130)}.{rng.randint(0, 9)} kg", "height": f"{rng.randint(150, 200)} cm",
        "sha": "".join(rng.choice("0123456789abcdef") for _ in range(7)), "build": str(rng.randint(100, 9999)),
    }


CLEAN_TEMPLATES = [
    "The clinic opened in {year} and moved to the new building in {year2}.",
    "Appointments on {iso} start at {time} sharp.",
    "The follow-up is booked for {eu} at {time}.",
    "Her last visit was on {us}, and the next one is in {count} days.",
    "The invoice of {usd} is due on {long_date}.",
    "A consultation costs {usd_small} without insurance.",
    "The total came to {eur} including VAT.",
    "They borrowed {gbp} over {months} months at {rate}% APR.",
    "The city has a population of {big} people.",
    "About {pct} of patients missed their second appointment.",
    "Uptake rose to {pct_int} after the reminder campaign.",
    "Take metformin {dose} twice daily with meals.",
    "Give {ml} of saline over {count} minutes.",
    "The ward has {count} beds on floor {floor}.",
    "Room {room} on floor {floor} is reserved for infusions.",
    "The discharge summary lists {icd} as the main diagnosis.",
    "Code {icd} was used on {count} claims last quarter.",
    "Upgrade the client to version {version} before {eu}.",
    "Release {version} fixed {count} bugs and took {ms} ms less to start.",
    "Order {order} shipped on {iso}.",
    "Ticket {ticket} was closed after {count} comments.",
    "Blood pressure was {bp} mmHg and temperature {temp} °C.",
    "HbA1c fell from {hba1c}% to {hba1c}% in {months} months.",
    "The database listens on port {port} and uses {gb} GB of memory.",
    "Median latency was {ms} ms at {count_k} requests per minute.",
    "Invoice {invoice} covers {count} hours of consulting.",
    "See page {page} of the {year} annual report.",
    "The branch at postcode {zip} closes at {time} on Fridays.",
    "Pain was rated {score} on admission and {score} at discharge.",
    "The mixing ratio is {ratio} by volume.",
    "The patient weighs {weight} and is {height} tall.",
    "Commit {sha} broke build {build}; revert it before {time}.",
    "Savings grew by {pct} in {year}, compared with {pct} in {year2}.",
    "The loan term is {months} months and the rate is fixed at {rate}%.",
    "Between {iso} and {eu} the team closed {count} incidents.",
    "Interest of {usd_small} was credited on {long_date}.",
    "The trial enrolled {count_k} participants across {count} sites.",
    "Backups older than {count} days are deleted at {time} every night.",
    "Dose adjustments above {dose} need a second signature.",
    "The {year} audit found {count} issues, {count} of them minor.",
]


def clean_sentences(seed: int = 0, count: int = 600) -> list[str]:
    """`count` distinct sentences without PII, full of the numbers ordinary text has (dates, amounts, doses,
    versions, ICD codes, room and order numbers)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        template = CLEAN_TEMPLATES[len(out)] if len(out) < len(CLEAN_TEMPLATES) else rng.choice(CLEAN_TEMPLATES)
        # each field gets a fresh value, so a template naming a field twice gets two different numbers
        text = re.sub(r"\{(\w+)\}", lambda m: _clean_numbers(rng)[m.group(1)], template)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
