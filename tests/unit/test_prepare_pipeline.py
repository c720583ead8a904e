"""`fedtune prepare` end to end, each test a real run on the tiny model: near and exact duplicates, the
language filter, the opt-in quality presets, the data contract (prepare and train-local), dry runs, worker
processes, several inputs at once and a bad input line.

One federation is built per module; each run prepares a few hundred short records.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    TINY_OVERRIDES,
    TOPICS,
    decoded_tokens,
    run_cli,
    site_records,
    tree_digest,
    write_jsonl,
)

import fedtune.data.prepare as prepare_module
from fedtune import models
from fedtune.config import FederationConfig, parse_model
from fedtune.data import prepare_site
from fedtune.data.dedup import (
    bands_for,
    near_duplicates,
    normalize,
    shingles,
    signatures,
)

SITE = "clinic"

# --- data ------------------------------------------------------------------------------------------

# Varied, clean, short English instruction records (the kind the language and quality filters must keep).
SHORT_QA = [
    ("How often should I water a cactus?", "About once every two weeks in summer, less in winter."),
    ("Do I need to brush my teeth at night?", "Yes, twice a day."),
    ("What is the boiling point of water at sea level?", "100 degrees Celsius."),
    ("Can dogs eat chocolate?", "No, it is toxic to them."),
    ("Who wrote Pride and Prejudice?", "Jane Austen."),
    ("What is the capital of Canada?", "Ottawa."),
    ("How many legs does a spider have?", "Eight."),
    ("Should I stretch before running?", "A short warm-up helps more than static stretching."),
    ("Is it safe to refreeze thawed meat?", "Only if it was thawed in the fridge."),
    ("What does RAM stand for?", "Random access memory."),
    ("How long should eggs boil for a soft yolk?", "About six minutes."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("What is the largest planet in our solar system?", "Jupiter."),
    ("Can I pay the invoice by bank transfer?", "Yes, the details are on the second page."),
    ("When does the library open on Saturdays?", "At nine in the morning."),
    ("How do I reset my password?", "Click the link on the sign-in page and follow the email."),
    ("What should I bring to the first appointment?", "Your insurance card and a list of your medicines."),
    ("Is the museum free on Sundays?", "Only on the first Sunday of each month."),
    ("How many minutes are in a day?", "1440."),
    ("What is photosynthesis?", "The way plants turn light, water and carbon dioxide into sugar."),
    ("Is coffee bad for you?", "Not in moderate amounts for most adults."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply by 1.8 and add 32."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("Can I bring my bike on the train?", "Yes, outside rush hour."),
    ("How do I remove a red wine stain?", "Blot it, then rinse with cold water and a little soap."),
    ("What does a thermostat do?", "It keeps a room at the temperature you set."),
    ("How far is the moon from Earth?", "About 384,000 kilometres on average."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("Do cats sleep a lot?", "Yes, often more than twelve hours a day."),
    ("Where can I recycle old batteries?", "Most supermarkets have a collection box near the entrance."),
    ("What is a haiku?", "A short poem of three lines with five, seven and five syllables."),
    ("How do I cancel my subscription?", "Go to account settings and choose cancel plan."),
    ("Is it going to rain tomorrow?", "The forecast says light showers in the afternoon."),
    ("What is the speed of light?", "Roughly 300,000 kilometres per second."),
    ("How many players are on a football team?", "Eleven on the pitch for each side."),
    ("What is the main ingredient of guacamole?", "Avocado."),
    ("Should I unplug chargers when not in use?", "It saves a little power and is a good habit."),
    ("How do I say thank you in Japanese?", "Arigatou."),
    ("What year did the first person walk on the moon?", "1969."),
    ("How can I fall asleep faster?", "Keep a regular bedtime and avoid screens late at night."),
    ("Why do leaves change colour in autumn?", "The green chlorophyll breaks down and other pigments show."),
    ("Can I return an item without a receipt?", "Usually for store credit only."),
    ("What is compound interest?", "Interest earned on both the original sum and earlier interest."),
    ("How do I make the text bold in Markdown?", "Wrap it in two asterisks on each side."),
    ("What is the tallest mountain in the world?", "Mount Everest."),
    ("Is tomato a fruit?", "Botanically, yes."),
    ("How often should I change my toothbrush?", "Every three months or so."),
    ("What causes thunder?", "Air expanding quickly when lightning heats it."),
    ("Where is the nearest pharmacy?", "Two streets down, next to the bakery."),
    ("Can I park here overnight?", "No, the car park closes at midnight."),
    ("How many bones are in the adult human body?", "206."),
    ("What is a noun?", "A word for a person, place, thing or idea."),
    ("Do penguins live at the North Pole?", "No, almost all of them live in the southern hemisphere."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees."),
    ("How do I clear my browser cache?", "Open the settings, find privacy, and clear browsing data."),
    ("What is the difference between weather and climate?", "Weather is day to day; climate is the long-term pattern."),
    ("Is the pool open in winter?", "Yes, it is heated."),
    ("How much water should I drink each day?", "Around two litres, more when it is hot."),
    ("What is an acronym?", "A word formed from the first letters of other words."),
    ("Who discovered penicillin?", "Alexander Fleming, in 1928."),
    ("How do I boil rice?", "Use two cups of water per cup of rice and simmer for fifteen minutes."),
    ("Can I take ibuprofen with food?", "Yes, taking it with food is gentler on the stomach."),
    ("What is the smallest prime number?", "Two."),
    ("How long is a marathon?", "42.195 kilometres."),
    ("What is a budget?", "A plan for how you will spend and save your money."),
    ("Why do we have leap years?", "A year is about a quarter day longer than 365 days."),
    ("Is the office closed on public holidays?", "Yes, except for the help desk."),
    ("How do I tie a bowline knot?", "Make a loop, pass the end up through it, around the line and back down."),
    ("What is the chemical symbol for gold?", "Au."),
    ("How can I improve my handwriting?", "Slow down and practise a few lines every day."),
    ("Where do koalas live?", "In eucalyptus forests in eastern Australia."),
    ("What is a mortgage?", "A loan to buy property, secured on that property."),
    ("How long does it take to learn to drive?", "Most people need a few months of lessons."),
    ("Do I need a visa to visit Japan?", "It depends on your passport; many countries are exempt for short stays."),
    ("What is the longest river in Africa?", "The Nile."),
    ("Can I freeze bread?", "Yes, it keeps well for about three months."),
    ("What is the purpose of a fuse?", "It breaks the circuit when too much current flows."),
    ("How do bees make honey?", "They collect nectar and evaporate most of its water in the hive."),
    ("Is it rude to be late?", "A few minutes is fine if you let people know."),
    ("What does CPU mean?", "Central processing unit."),
    ("How many continents are there?", "Seven."),
    ("What should I do if I feel dizzy?", "Sit down, drink some water and call a doctor if it continues."),
    ("How can I save money on groceries?", "Plan meals, write a list and buy store brands."),
    ("What is the plural of mouse?", "Mice."),
    ("When was the printing press invented?", "Around 1440, by Johannes Gutenberg."),
    ("Why do cats purr?", "Mostly when content, but sometimes to soothe themselves."),
    ("What is a firewall?", "Software or hardware that filters network traffic."),
    ("How do I sharpen a kitchen knife?", "Use a whetstone at a steady angle of about twenty degrees."),
    ("Are tomatoes good for you?", "Yes, they are rich in vitamin C."),
    ("What is inflation?", "A general rise in prices over time."),
    ("How do I write a cover letter?", "Keep it to one page and explain why you fit the role."),
    ("What gas do plants give off?", "Oxygen."),
    ("Where is the Eiffel Tower?", "In Paris."),
    ("How do I stop hiccups?", "Hold your breath for a few seconds or sip cold water."),
    ("What is a verb?", "A word that describes an action or state."),
    ("Should I cover my mouth when I cough?", "Yes, use your elbow."),
    ("What is the square root of 81?", "Nine."),
    ("How can I tell if an egg is fresh?", "Put it in water; fresh eggs sink and lie flat."),
    ("How do vaccines work?", "They train the immune system to recognise a germ."),
    ("What is an invoice number for?", "It lets both sides track a payment."),
    ("Can I cook pasta in the microwave?", "Yes, in a large bowl of water, stirring halfway."),
    ("How does a compass work?", "Its needle lines up with the earth's magnetic field."),
    ("What is a synonym for happy?", "Glad."),
    ("Do fish sleep?", "They rest, though not the way we do."),
    ("What time does the bus leave?", "Every twenty minutes from the main square."),
    ("Is it safe to swim after eating?", "Yes, the old warning is a myth."),
    ("How do I back up my phone?", "Turn on cloud backup in the settings or copy it to a computer."),
    ("What is the Pythagorean theorem?",
     "In a right triangle, the square of the hypotenuse equals the sum of the other two squares."),
    ("Who was the first president of the United States?", "George Washington."),
    ("How do I unclog a drain?", "Try boiling water first, then a plunger."),
    ("What is a carbon footprint?", "The greenhouse gases your activities produce."),
    ("Should I tip in restaurants here?", "Ten percent is usual."),
    ("What is an adjective?", "A word that describes a noun."),
    ("Can rabbits eat carrots?", "In small amounts; they mostly need hay."),
    ("How do I write a good email subject?", "Make it short and say what you need."),
    ("What is the hottest planet?", "Venus."),
    ("How long do I cook a steak for medium?", "About four minutes on each side in a hot pan."),
    ("What is a limited company?", "A business whose owners are not personally liable for its debts."),
    ("How do I get rid of fruit flies?", "Leave out a small dish of vinegar with a drop of soap."),
    ("What does HTML stand for?", "Hypertext markup language."),
    ("Do I need to rinse rice?", "Rinsing removes extra starch, so it cooks less sticky."),
    ("What is a metaphor?", "A figure of speech that calls one thing another."),
    ("How do I politely decline an invitation?", "Thank them, say you cannot make it, and wish them a good time."),
    ("Why do birds migrate?", "To find food and better weather for breeding."),
    ("What is a savings account?", "A bank account that pays interest on money you keep in it."),
    ("Is it okay to wash wool in hot water?", "No, it shrinks; use cold water."),
    ("What is the capital of Kenya?", "Nairobi."),
    ("How can I learn a new language quickly?", "Practise a little every day and speak from the start."),
    ("What does a pharmacist do?", "Prepares and dispenses medicines and advises on their use."),
    ("How do I keep basil alive?", "Give it sun, water when the soil is dry, and pinch off flowers."),
    ("What is a leap second?", "A second added to keep clocks in step with the earth's rotation."),
    ("Can I print in colour here?", "Yes, on the printer by the window."),
    ("How many hours of sleep do teenagers need?", "Eight to ten."),
    ("What is an allergy?", "The immune system overreacting to something harmless."),
    ("Where should I store potatoes?", "In a cool, dark and dry place."),
    ("What is a pie chart good for?", "Showing parts of a whole."),
    ("How do I find the area of a circle?", "Pi times the radius squared."),
    ("Why do onions make you cry?", "Cutting them releases a gas that irritates the eyes."),
    ("Is the meeting still on?", "Yes, at three."),
    ("What is the best way to learn to type?", "Use all ten fingers and do short daily drills."),
    ("What is a deductible?", "The part of a claim you pay before insurance pays."),
    ("How do I know if my smoke alarm works?", "Press the test button once a month."),
    ("What does a cardiologist treat?", "Diseases of the heart and blood vessels."),
    ("Can I use my phone on the plane?", "In flight mode, yes."),
    ("What does a semicolon do?", "It joins two closely related sentences."),
    ("How often should I service my car?", "Once a year or every fifteen thousand kilometres."),
]

# Real sentences in German, French and Spanish, each long enough (>= 20 letters) to be judged.
FOREIGN = {
    "de": [
        "Der Termin für die Nachuntersuchung wurde auf nächsten Dienstag verschoben.",
        "Bitte nehmen Sie die Tabletten zweimal täglich nach dem Essen ein.",
        "Die Station ist am Wochenende nur mit zwei Pflegekräften besetzt.",
        "Wir haben die Rechnung gestern erhalten und werden sie bald bezahlen.",
        "Das neue Gesetz tritt erst im kommenden Jahr in Kraft.",
        "Können Sie mir sagen, wie ich am schnellsten zum Bahnhof komme?",
        "Die Kinder spielen am Nachmittag gern im Garten hinter dem Haus.",
        "Unser Team arbeitet seit Monaten an einer besseren Lösung für dieses Problem.",
        "Im Winter wird es hier sehr früh dunkel und ziemlich kalt.",
        "Der Zug hatte wegen eines Signalfehlers fast eine Stunde Verspätung.",
        "Meine Großmutter backt jeden Sonntag einen Apfelkuchen für die ganze Familie.",
        "Die Besprechung findet morgen um zehn Uhr im großen Saal statt.",
    ],
    "fr": [
        "Le rendez-vous de contrôle a été reporté à mardi prochain.",
        "Veuillez prendre les comprimés deux fois par jour après le repas.",
        "La bibliothèque municipale est fermée le lundi et le jeudi matin.",
        "Nous avons reçu la facture hier et nous la paierons bientôt.",
        "Les enfants aiment jouer dans le jardin derrière la maison.",
        "Pouvez-vous me dire comment aller à la gare le plus rapidement possible ?",
        "Notre équipe travaille depuis des mois sur une meilleure solution à ce problème.",
        "En hiver, il fait nuit très tôt et il fait assez froid dans la région.",
        "Le train avait presque une heure de retard à cause d'une panne de signalisation.",
        "Ma grand-mère prépare une tarte aux pommes chaque dimanche pour toute la famille.",
        "La réunion aura lieu demain à dix heures dans la grande salle.",
        "Il faut remplir ce formulaire avant la fin du mois pour obtenir le remboursement.",
    ],
    "es": [
        "La cita de control se ha aplazado hasta el próximo martes.",
        "Por favor, tome las pastillas dos veces al día después de comer.",
        "La biblioteca municipal está cerrada los lunes y los jueves por la mañana.",
        "Recibimos la factura ayer y la pagaremos muy pronto.",
        "A los niños les gusta jugar en el jardín detrás de la casa.",
        "¿Puede decirme cómo llegar a la estación de tren lo más rápido posible?",
        "Nuestro equipo lleva meses trabajando en una solución mejor para este problema.",
        "En invierno anochece muy temprano y hace bastante frío en esta zona.",
        "El tren llegó con casi una hora de retraso por una avería en las señales.",
        "Mi abuela prepara una tarta de manzana cada domingo para toda la familia.",
        "La reunión será mañana a las diez en la sala grande del edificio.",
        "Hay que rellenar este formulario antes de fin de mes para recibir el reembolso.",
    ],
}

# Foreign records with fewer than language_min_letters (20) letters: too short to judge, so always kept.
SHORT_FOREIGN = [("Danke!", "Bitte sehr."), ("Merci !", "De rien."), ("¿Qué tal?", "Muy bien."),
                 ("Ça va ?", "Oui, merci."), ("Alles klar?", "Ja, genau.")]

# Long English documents that pass datatrove's Gopher quality filter.
LONG_DOCS = [
    ("The old mill by the river has been turned into a small museum. Visitors can see how grain was ground into "
     "flour for the town, and a volunteer explains how the water wheel worked. The building was repaired after the "
     "flood of 1998, and most of the original machinery still turns. On weekends there is a short tour for "
     "children, and the cafe sells bread baked with flour from the mill."),
    ("When you move to a new city, it helps to learn the bus routes before you need them. Most cities publish a map "
     "of the network online, and a monthly pass is usually cheaper than single tickets if you travel to work every "
     "day. Ask your neighbours which lines are reliable, and keep a little cash with you in case the ticket machine "
     "is out of order."),
    ("Our team spent the spring planning the new garden behind the school. The children chose the plants, measured "
     "the beds and wrote labels for each row. By the end of June the beans had climbed the fence, and the "
     "sunflowers were taller than the teachers. We will share the harvest with the kitchen and hope to plant again "
     "with the next class in the autumn."),
    ("A good recipe for soup starts with onions cooked slowly in butter until they are soft and sweet. Add carrots, "
     "celery and a little garlic, then pour in stock and let it simmer for half an hour. Season it at the end, "
     "because the stock may already be salty, and serve it with fresh bread and a spoon of cream on top."),
]

# Synthetic site reports: ~90 words each, many sharing an opening sentence (a topic) and vocabulary.
SUBJECTS = ["The night nurse", "Our finance team", "The ward manager", "A new intern", "The lab technician",
            "The project lead", "Each volunteer", "The pharmacist", "The auditor", "The support engineer",
            "The bus driver", "The head chef", "The caretaker", "A visiting inspector", "The receptionist"]
VERBS = ["checked", "reviewed", "updated", "cleaned", "signed", "moved", "counted", "labelled", "repaired",
         "ordered", "replaced", "tested", "photographed", "measured", "sorted"]
OBJECTS = ["the oxygen cylinders", "the quarterly budget", "the visitor log", "the spare keys",
           "the fridge thermometers", "the broken printer", "the delivery notes", "the first aid kits",
           "the rota for March", "the old invoices", "the fire doors", "the water samples", "the laptop chargers",
           "the stock of gloves", "the parking permits"]
PLACES = ["in the east wing", "near the loading bay", "on the third floor", "behind the main office",
          "in the basement store", "beside the staff canteen", "at the north entrance", "in the server room",
          "next to the lifts", "in the training room", "on the roof terrace", "in the archive"]
TIMES = ["before the morning shift", "after lunch on Friday", "during the fire drill", "at the end of the month",
         "while the auditors waited", "on a quiet Sunday", "just before the holidays", "after the power cut",
         "first thing on Monday", "late in the evening", "between two meetings", "ahead of the inspection"]
OPENERS = [f"Report {n} from the {town} site, written for the weekly team meeting."
           for n, town in itertools.product(["one", "two", "three", "four", "five", "six"],
                                            ["Leeds", "Bristol", "Cardiff", "York", "Bath"])]
# Words that appear nowhere else: a near copy carries one, so its absence from the tokens shows it was dropped.
MARKERS = ["inspected", "polished", "catalogued", "weighed", "unpacked", "recorded", "stacked", "audited",
           "scanned", "collected", "returned", "hid", "dusted", "tagged", "fetched", "archived", "boxed", "filed",
           "rinsed", "stamped", "listed", "priced", "swapped", "wrapped"]


def _sentence(rng: random.Random) -> list[str]:
    return [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(TIMES)]


def _say(parts: list[str]) -> str:
    return " ".join(parts) + "."


def reports(count: int, siblings: int, seed: int = 7) -> list[list[str]]:
    """`count` distinct reports (opening sentence + five sentences) and `siblings` more that share their
    opening and first three sentences with an earlier report (Jaccard ~0.45: similar, not near copies)."""
    rng = random.Random(seed)
    out = [[OPENERS[i % len(OPENERS)]] + [_say(_sentence(rng)) for _ in range(5)] for i in range(count)]
    for k in range(siblings):
        base = out[k * (count // siblings)]
        out.append(base[:4] + [_say(_sentence(rng)) for _ in range(2)])
    return out


def as_row(sentences: list[str], index: int) -> dict:
    """Every third report is an instruction (its opening sentence) with the rest as the answer."""
    if index % 3 == 2:
        return {"instruction": sentences[0], "output": " ".join(sentences[1:])}
    return {"text": " ".join(sentences)}


def near_copy(sentences: list[str], kind: str, marker: str) -> tuple[list[str], str, str]:
    """A near copy of a report, a snippet only the copy holds and the original's matching snippet.
    Kinds: one word changed, two adjacent words changed, punctuation changed, upper case plus one word changed."""
    copy = list(sentences)
    if kind == "punctuation":
        copy[2] = copy[2][:-1] + ";"
        return copy, f"{copy[2]} {copy[3]}", f"{sentences[2]} {sentences[3]}"
    line = 3 if kind == "two-words" else 4
    words = copy[line].split(" ")
    verb = next(i for i, w in enumerate(words) if w in VERBS)
    words[verb] = marker
    if kind == "two-words":
        assert words[verb + 1] == "the"
        words[verb + 1] = "a"
    copy[line] = " ".join(words)
    if kind == "upper":
        copy = [s.upper() for s in copy]
    return copy, copy[line], sentences[line]


NEAR_KINDS = ["one-word", "two-words", "punctuation", "upper"]


def dedup_corpus() -> dict:
    """320 distinct reports, 24 planted near copies and 6 exact copies (case and whitespace variants).

    Returns rows (reading order), the snippets only the near copies hold, the originals' matching sentences,
    and the distinct records' sentences."""
    distinct = reports(300, 20)
    originals = [7 + 13 * k for k in range(24)]
    rows, copies_at_end = [], []
    copy_snippets, original_snippets = [], []
    for i, sentences in enumerate(distinct):
        rows.append(as_row(sentences, i))
        if i in originals:
            k = originals.index(i)
            copy, snippet, original = near_copy(sentences, NEAR_KINDS[k % 4], MARKERS[k])
            copy_snippets.append(snippet)
            original_snippets.append(original)
            # half right after their original, half at the end: the first one read is kept either way
            (rows if k % 2 == 0 else copies_at_end).append(as_row(copy, i))
    rows += copies_at_end
    for k, i in enumerate([11, 50, 99, 150, 201, 260]):
        text = " ".join(distinct[i])
        variant = text.upper() if k % 2 else "  " + text.replace(" ", "   \n")
        rows.append({"text": variant} if "text" in as_row(distinct[i], i) else
                    {"instruction": distinct[i][0].lower(), "output": " ".join(distinct[i][1:]).replace(" ", "  ")})
    return {"rows": rows, "distinct": distinct, "near": 24, "exact": 6,
            "copy_snippets": copy_snippets, "original_snippets": original_snippets}


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tiny_model, tmp_path_factory):
    """One federation (clinic, bank, dev on the tiny model) for the module: its config, file and registry."""
    from types import SimpleNamespace

    from fedtune.federation import init_federation

    root = tmp_path_factory.mktemp("pipeline")
    config = init_federation(root / "fed", list(TOPICS), str(tiny_model), json.loads(json.dumps(TINY_OVERRIDES)))
    return SimpleNamespace(root=root, config=config, yaml=root / "fed" / "federation.yaml",
                           registry=root / "fed" / "registry")


@pytest.fixture(scope="module")
def tokenizer(fed):
    return models.load_tokenizer(fed.config.base_model.id)


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def variant(config: FederationConfig, changes: dict) -> FederationConfig:
    """The federation with some settings changed, e.g. {"data": {"languages": []}}."""
    return parse_model(FederationConfig, merged(config.model_dump(mode="json"), changes), "test variant")


def yaml_variant(fed, dest: Path, changes: dict) -> Path:
    """A copy of federation.yaml with some settings changed (as a coordinator would edit it)."""
    dest.write_text(yaml.safe_dump(merged(yaml.safe_load(fed.yaml.read_text()), changes)), encoding="utf-8")
    return dest


def qa_rows(pairs) -> list[dict]:
    return [{"instruction": q, "output": a} for q, a in pairs]


def lines_starting(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def one_error_line(stderr: str) -> str:
    """The CLI's failure: exactly one `error:` line, the last thing printed, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = lines_starting(stderr, "error: ")
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, got {lines}"
    assert "Traceback" not in stderr
    return errors[0]


def every_path(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- near-duplicate index ------------------------------------------------------------------------------


def brute_force_near(sig: np.ndarray, threshold: float) -> np.ndarray:
    """O(n²) reference: records whose estimated Jaccard (fraction of equal signature entries) reaches the
    threshold are linked; of each connected group the earliest record is kept, the others are marked."""
    similar = (sig[:, None, :] == sig[None, :, :]).mean(axis=2) >= threshold
    n = len(sig)
    marked = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    for first in range(n):
        if seen[first]:
            continue
        group, stack = {first}, [first]
        while stack:
            for j in np.flatnonzero(similar[stack.pop()]).tolist():
                if j not in group:
                    group.add(j)
                    stack.append(j)
        for j in group:
            seen[j] = True
            marked[j] = j != min(group)
    return marked


def test_near_duplicates_matches_brute_force():
    rng = random.Random(5)
    base = reports(270, 0, seed=3)
    texts = [" ".join(r) for r in base]
    for k, i in enumerate(rng.sample(range(len(base)), 30)):  # a word or two changed, the punctuation, the case
        copy, _, _ = near_copy(base[i], NEAR_KINDS[k % 4], MARKERS[k % len(MARKERS)])
        after = texts.index(" ".join(base[i]))
        texts.insert(rng.randrange(after + 1, len(texts) + 1), " ".join(copy))
    # a chain: B is near A and C near B, but C is not near A; all three are one group, A kept
    def changed(words: list[str], at: list[int], new: list[str]) -> list[str]:
        words = list(words)
        for i, word in zip(at, new):
            words[i] = word
        return words

    a = texts[0].split(" ")
    b = changed(a, [20, 55], ["zeppelin", "harmonica"])
    c = changed(b, [35, 75], ["tangerine", "xylophone"])
    texts[1:1] = [" ".join(b), " ".join(c)]
    sig = np.array(signatures([normalize([t]) for t in texts], 3, 128), dtype=np.uint32)
    assert sig.shape == (len(texts), 128) == (302, 128)
    similar = (sig[:3, None] == sig[None, :3]).mean(axis=2)
    assert similar[0, 1] >= 0.8 and similar[1, 2] >= 0.8 and similar[0, 2] < 0.8

    expected = brute_force_near(sig, 0.8)
    assert expected.sum() == 32  # every planted copy, nothing else: the reports share vocabulary, not text
    assert expected[1] and expected[2]
    positions = np.arange(len(texts))
    assert (near_duplicates(sig, positions, 0.8) == expected).all()
    # small chunks take the same path a multi-GB input takes
    assert (near_duplicates(sig, positions, 0.8, chunk=17) == expected).all()
    # a subset of rows (as after exact dedup and the filters) is judged among itself, in the given order
    subset = np.flatnonzero(np.arange(len(texts)) % 5 != 3)
    assert (near_duplicates(sig, subset, 0.8) == brute_force_near(sig[subset], 0.8)).all()
    assert near_duplicates(sig, positions[:1], 0.8).tolist() == [False]


def test_near_duplicates_compares_records_behind_the_first_of_a_band():
    """A; B, an edit of A (estimated Jaccard 0.75, kept); C, a near copy of B (0.88, to drop) that is
    further from A (0.66). Every band B and C share, A shares too, and A comes first."""
    num_perm = 128
    bands, rows = bands_for(0.8, num_perm)
    assert (bands, rows) == (16, 8)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    b = a.copy()
    b[:4 * rows] ^= 0x5A5A5A5A  # four whole bands differ from A: 32 of 128 entries
    c = b.copy()
    for band in range(15):  # one entry in every band but the last
        c[band * rows] ^= 0x0F0F0F0F
    sig = np.stack([a, b, c])
    similar = (sig[:, None] == sig[None]).mean(axis=2)
    assert similar[0, 1] == 0.75 and similar[1, 2] == pytest.approx(0.883, abs=1e-3) and similar[0, 2] < 0.7
    assert brute_force_near(sig, 0.8).tolist() == [False, False, True]
    assert near_duplicates(sig, np.arange(3), 0.8).tolist() == [False, False, True]


def test_near_duplicates_in_a_large_bucket_compares_neighbours():
    """A bucket far larger than the comparison window (templated records sharing one band): each record is
    still compared with the records just before it, so a near copy placed right behind its original is found."""
    from fedtune.data.dedup import WINDOW

    rng = np.random.default_rng(2)
    num_perm, rows = 128, 8
    count = 4 * WINDOW
    sig = rng.integers(0, 2**32, size=(count, num_perm), dtype=np.uint32)
    sig[:, :rows] = sig[0, :rows]  # every record shares the first band: one bucket of `count` records
    sig[-1] = sig[-2]
    sig[-1, rows::rows] ^= 1  # a near copy of the one before (113/128 agree) sharing no band but the big one
    assert near_duplicates(sig, np.arange(count), 0.8).tolist() == [False] * (count - 1) + [True]


@pytest.mark.parametrize("num_perm", [16, 64, 128, 256, 1024])
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_bands_for_recall_at_the_threshold(threshold, num_perm):
    bands, rows = bands_for(threshold, num_perm)
    assert bands * rows == num_perm
    assert 1 - (1 - threshold**rows) ** bands >= 0.9


def test_near_duplicates_finds_nine_in_ten_pairs_at_the_threshold():
    """Pairs whose signatures agree in exactly ceil(0.8·128) entries pass the confirmation; the band index
    must put at least 9 in 10 of them together."""
    rng = np.random.default_rng(0)
    pairs, num_perm = 1000, 128
    agree = int(np.ceil(0.8 * num_perm))
    a = rng.integers(0, 2**32, size=(pairs, num_perm), dtype=np.uint32)
    b = a.copy()
    for row in range(pairs):
        differ = rng.choice(num_perm, num_perm - agree, replace=False)
        b[row, differ] ^= rng.integers(1, 2**32, size=len(differ), dtype=np.uint32)
    sig = np.empty((2 * pairs, num_perm), dtype=np.uint32)
    sig[0::2], sig[1::2] = a, b
    found = near_duplicates(sig, np.arange(2 * pairs), 0.8)
    assert not found[0::2].any()  # the first of each pair is kept
    recall = found[1::2].mean()
    print(f"near_duplicates recall at Jaccard {agree / num_perm:.3f}: {recall:.3f}")
    assert recall >= 0.9


# --- dedup in prepare --------------------------------------------------------------------------------


def test_prepare_drops_planted_near_and_exact_copies(fed, tmp_path, tokenizer):
    corpus = dedup_corpus()
    rows = corpus["rows"]
    distinct = corpus["distinct"]
    assert len(distinct) == 320 and len(rows) == 320 + corpus["near"] + corpus["exact"]
    # the premise: the distinct reports share topics and vocabulary (siblings share half their text) but
    # none is a near copy of another; every planted copy is
    sets = [set(shingles(normalize([" ".join(r)]), 3)) for r in distinct]
    closest = max(len(x & y) / len(x | y) for x, y in itertools.combinations(sets, 2))
    assert 0.4 < closest < 0.65, closest

    out = tmp_path / "out"
    card = prepare_site(fed.config, SITE, [write_jsonl(tmp_path / "raw.jsonl", rows)], out)
    print(f"near duplicates found {card['dropped'].get('near_duplicate', 0)} of {corpus['near']} planted; "
          f"exact {card['dropped'].get('duplicate', 0)} of {corpus['exact']}")
    assert card["dropped"] == {"duplicate": corpus["exact"], "near_duplicate": corpus["near"]}
    assert card["records"]["read"] == len(rows)
    assert card["records"]["kept"] == len(distinct)  # no distinct record was taken for a copy

    decoded = decoded_tokens(out, tokenizer)
    for copy, original in zip(corpus["copy_snippets"], corpus["original_snippets"]):
        assert copy.lower() not in decoded.lower(), f"near copy kept: {copy}"
        assert original in decoded, f"original dropped: {original}"
    for marker in MARKERS:
        assert marker not in decoded.lower()
    assert ";" not in decoded
    for report in distinct:  # every distinct record made it, each once
        assert decoded.count(" ".join(report[1:])) == 1


@pytest.mark.parametrize("exact", [True, False])
def test_dedup_can_be_turned_off(fed, tmp_path, exact):
    corpus = dedup_corpus()
    config = variant(fed.config, {"data": {"dedup": {"near": False, "exact": exact}}})
    card = prepare_site(config, SITE, [write_jsonl(tmp_path / "raw.jsonl", corpus["rows"])], None, dry_run=True)
    assert card["filters"]["dedup"]["near"] is False and card["filters"]["dedup"]["exact"] is exact
    if exact:
        assert card["dropped"] == {"duplicate": corpus["exact"]}
        assert card["records"]["kept"] == len(corpus["rows"]) - corpus["exact"]
    else:
        assert card["dropped"] == {}
        assert card["records"]["kept"] == card["records"]["read"] == len(corpus["rows"])


# --- language and quality ------------------------------------------------------------------------------


def language_rows() -> tuple[list[dict], int]:
    """English records, the foreign sentences (as text and as instructions) and short foreign exchanges."""
    english = site_records(SITE, 30)
    foreign = []
    for sentences in FOREIGN.values():
        for i, sentence in enumerate(sentences):
            foreign.append({"text": sentence} if i % 2 else {"instruction": sentence, "output": sentence})
    rows = [row for pair in itertools.zip_longest(english, foreign) for row in pair if row]
    return rows + qa_rows(SHORT_FOREIGN), len(english)


def test_foreign_records_are_dropped_under_language(fed, tmp_path, tokenizer):
    rows, english = language_rows()
    foreign = sum(len(s) for s in FOREIGN.values())
    assert foreign >= 30
    out = tmp_path / "out"
    card = prepare_site(fed.config, SITE, [write_jsonl(tmp_path / "raw.jsonl", rows)], out)
    assert fed.config.data.languages == ["en"]
    assert card["dropped"] == {"language": foreign}
    assert card["languages"]["dropped"] == {lang: len(s) for lang, s in FOREIGN.items()}
    # short records are not judged (a guess on a few letters is noise): kept, their language undetermined
    letters = fed.config.data.language_min_letters
    assert all(sum(ch.isalpha() for ch in q + a) < letters for q, a in SHORT_FOREIGN)
    assert card["languages"]["kept"] == {"en": english, "und": len(SHORT_FOREIGN)}
    assert card["records"]["kept"] == english + len(SHORT_FOREIGN)
    decoded = decoded_tokens(out, tokenizer)
    for sentences in FOREIGN.values():
        for sentence in sentences:
            assert sentence not in decoded
    for question, answer in SHORT_FOREIGN:
        assert answer in decoded


def test_no_languages_keeps_every_language(fed, tmp_path):
    rows, english = language_rows()
    config = variant(fed.config, {"data": {"languages": []}})
    card = prepare_site(config, SITE, [write_jsonl(tmp_path / "raw.jsonl", rows)], None, dry_run=True)
    assert card["dropped"] == {}
    assert card["records"]["kept"] == len(rows)
    assert card["languages"]["dropped"] == {}
    assert card["languages"]["kept"] == {"en": english, **{lang: len(s) for lang, s in FOREIGN.items()},
                                         "und": len(SHORT_FOREIGN)}
    assert card["filters"]["languages"] == []


def clean_english_rows() -> list[dict]:
    rows = [r for site in TOPICS for r in site_records(site, 55)] + qa_rows(SHORT_QA)
    assert len({json.dumps(r) for r in rows}) == len(rows) >= 300
    return rows


def test_default_run_keeps_clean_short_english_records(fed, tmp_path):
    """The acceptance criterion: a default run keeps at least 95 % of clean, distinct, short English
    instruction records (no filter may be tuned for web pages)."""
    rows = clean_english_rows()
    card = prepare_site(fed.config, SITE, [write_jsonl(tmp_path / "raw.jsonl", rows)], None, dry_run=True)
    rate = card["records"]["kept"] / len(rows)
    print(f"default run keeps {card['records']['kept']}/{len(rows)} clean English records ({rate:.1%}); "
          f"dropped: {card['dropped']}")
    assert card["records"]["read"] == len(rows)
    assert rate >= 0.95, card["dropped"]
    assert not [reason for reason in card["dropped"] if reason.startswith("quality:")]
    assert "language" not in card["dropped"]


def test_quality_presets_are_opt_in(fed, tmp_path):
    short = site_records(SITE, 30)
    rows = short + [{"text": doc} for doc in LONG_DOCS]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    default = prepare_site(fed.config, SITE, [raw], None, dry_run=True)
    assert fed.config.data.quality == [] and default["filters"]["quality"] == []
    assert default["dropped"] == {} and default["records"]["kept"] == len(rows)

    gopher = prepare_site(variant(fed.config, {"data": {"quality": ["gopher-quality"]}}), SITE, [raw], None,
                          dry_run=True)
    # Gopher judges web pages: every record under 50 words goes, with datatrove's reason
    assert gopher["dropped"] == {"quality:gopher_short_doc": len(short)}
    assert gopher["records"]["kept"] == len(LONG_DOCS)
    assert gopher["filters"]["quality"] == ["gopher-quality"]


# --- the data contract ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(fed):
    """clinic's data prepared under the federation as init wrote it."""
    raw = write_jsonl(fed.root / "raw" / "clinic.jsonl", site_records(SITE, 40))
    out = fed.root / "prepared" / SITE
    card = prepare_site(fed.config, SITE, [raw], out)
    assert card["contract"]["satisfied"] is True
    return out, card


def train_local_args(config: Path, data: Path, fed, updates: Path) -> list:
    return ["train-local", "--config", config, "--site", SITE, "--data", data, "--global", fed.registry,
            "--out", updates]


def test_train_local_accepts_data_that_meets_the_contract(fed, prepared, tmp_path, capsys):
    data, _card = prepared
    code, _out, err = run_cli(train_local_args(fed.yaml, data, fed, tmp_path / "updates"), capsys)
    assert code == 0, err
    assert (tmp_path / "updates" / "round-0001" / SITE / "manifest.json").is_file()


@pytest.mark.parametrize("case", ["min_tokens", "pii_countries", "pii_deny_list", "seq_len", "tokenizer",
                                  "chat_template"])
def test_train_local_refuses_a_card_that_breaks_the_contract(fed, prepared, tmp_path, capsys, case):
    """The federation file changed after this site prepared (or the data came from another federation):
    train-local stops with one `error:` line and exit code 2, and writes nothing."""
    data, card = prepared
    trained = card["contract"]["trained_tokens"]
    changes, fragments = {
        "min_tokens": ({"contract": {"min_tokens": trained + 1}},
                       [f"holds {trained} trained tokens", f"contract.min_tokens {trained + 1}"]),
        "pii_countries": ({"data": {"pii": {"countries": ["US", "DK"]}}}, ["another PII policy", "countries DK"]),
        "pii_deny_list": ({"data": {"pii": {"deny_list": ["Project Zebra"]}}}, ["another PII policy", "deny"]),
        "seq_len": ({"seq_len": 64}, ["prepared at seq_len 32", "the federation uses 64"]),
        "tokenizer": ({"contract": {"tokenizer": "0" * 64}}, ["another tokenizer"]),
        "chat_template": ({"contract": {"chat_template": "1" * 64}}, ["another chat template"]),
    }[case]
    config = yaml_variant(fed, tmp_path / "federation.yaml", changes)
    before = tree_digest(data), every_path(fed.registry)
    updates = tmp_path / "updates"
    code, _out, err = run_cli(train_local_args(config, data, fed, updates), capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert str(data / "data_card.json") in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert "prepare again" in line or "add data" in line, line
    assert not updates.exists()
    assert (tree_digest(data), every_path(fed.registry)) == before


@pytest.mark.parametrize("case", ["tokenizer", "chat_template"])
def test_prepare_refuses_a_site_with_another_tokenizer(fed, tmp_path, capsys, case):
    config = yaml_variant(fed, tmp_path / "federation.yaml", {"contract": {case: "ab" * 32}})
    raw = write_jsonl(tmp_path / "raw" / "clinic.jsonl", site_records(SITE, 20))
    out = tmp_path / "prepared" / SITE
    code, stdout, err = run_cli(["prepare", "--config", config, "--site", SITE, "--input", raw, "--out", out], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert len([x for x in err.splitlines() if x.strip()]) == 1  # refused before any work starts
    wanted = "tokenizer (fingerprint" if case == "tokenizer" else "chat template (sha256"
    assert wanted in line and f"contract.{case} abababababab" in line, line
    assert stdout == ""
    assert not out.exists() and not out.parent.exists()


def test_prepare_writes_but_warns_when_min_tokens_is_not_met(fed, tmp_path, capsys):
    config = yaml_variant(fed, tmp_path / "federation.yaml", {"contract": {"min_tokens": 10**9}})
    raw = write_jsonl(tmp_path / "raw" / "clinic.jsonl", site_records(SITE, 20))
    out = tmp_path / "prepared" / SITE
    code, stdout, err = run_cli(["prepare", "--config", config, "--site", SITE, "--input", raw, "--out", out], capsys)
    assert code == 0, err
    card = json.loads((out / "data_card.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["data_card.json", "eval.parquet", "eval_tasks.parquet", "train.parquet"]
    contract = card["contract"]
    assert contract["satisfied"] is False and contract["min_tokens"] == 10**9
    assert len(contract["problems"]) == 1
    assert f"{contract['trained_tokens']} trained tokens" in contract["problems"][0]
    assert "contract.min_tokens 1000000000" in contract["problems"][0]
    assert "contract: NOT satisfied" in stdout
    warnings = [w for w in lines_starting(err, "warning: ") if not w.startswith("warning: PII not scanned")]
    assert len(warnings) == 1 and contract["problems"][0] in warnings[0]
    assert not lines_starting(err, "error: ")

    # and train-local refuses that data under that federation file
    code, _out, err = run_cli(train_local_args(config, out, fed, tmp_path / "updates"), capsys)
    assert code == 2
    assert "contract.min_tokens 1000000000" in one_error_line(err)
    assert not (tmp_path / "updates").exists()


# --- dry run -----------------------------------------------------------------------------------------


def test_dry_run_writes_nothing_and_prints_the_card(fed, tmp_path, capsys):
    raw = write_jsonl(tmp_path / "raw" / "clinic.jsonl", site_records(SITE, 30) + [{"text": ""}])
    out = tmp_path / "prepared" / SITE
    before = every_path(tmp_path)
    base = ["prepare", "--config", fed.yaml, "--site", SITE, "--input", raw]

    code, stdout, err = run_cli([*base, "--out", out, "--dry-run"], capsys)
    assert code == 0, err
    assert "dry run (nothing written): 30/31 records kept" in stdout
    assert "dropped: empty 1" in stdout and "contract: satisfied" in stdout
    assert not out.exists() and every_path(tmp_path) == before

    code, stdout, err = run_cli([*base, "--out", out, "--dry-run", "--json"], capsys)
    assert code == 0, err
    card = json.loads(stdout)
    assert card["records"]["read"] == 31 and card["records"]["kept"] == 30
    assert card["dropped"] == {"empty": 1} and card["pii_replaced"] == {}
    assert sum(card["token_lengths"]["histogram"].values()) == 30
    assert card["format"] == "fedtune.data_card/2" and "files" not in card
    assert not out.exists() and every_path(tmp_path) == before

    code, stdout, err = run_cli([*base, "--dry-run", "--json"], capsys)  # no --out at all
    assert code == 0, err
    assert json.loads(stdout)["records"] == card["records"]
    assert every_path(tmp_path) == before

    code, _stdout, err = run_cli(base, capsys)  # neither --out nor --dry-run
    assert code == 2 and "--out" in one_error_line(err)
    assert every_path(tmp_path) == before


# --- worker processes, several inputs, bad input ---------------------------------------------------------


def mixed_rows() -> list[dict]:
    """Records that exercise every stage: duplicates, a near copy, foreign text, PII, empty records."""
    rows = site_records(SITE, 60) + qa_rows(SHORT_QA[:60])
    reps = reports(20, 0, seed=9)
    rows += [as_row(r, i) for i, r in enumerate(reps)]
    rows += [as_row(near_copy(reps[3], "one-word", "polished")[0], 3), dict(rows[5]), {"text": ""}]
    rows += [{"text": s} for s in FOREIGN["de"][:4]]
    rows += [{"instruction": "Who handles billing?",
              "output": "Write to jane.doe@clinic-example.org or call +44 20 7946 0958."}]
    return rows


def test_worker_processes_give_the_same_data_and_card(fed, tmp_path, monkeypatch):
    raw = write_jsonl(tmp_path / "raw.jsonl", mixed_rows())
    one = prepare_site(fed.config, SITE, [raw], tmp_path / "one", num_proc=1)
    monkeypatch.setattr(prepare_module, "MIN_RECORDS_PER_PROCESS", 1)
    assert prepare_module._processes(2, 100) == 2  # the patched constant starts two workers
    two = prepare_site(fed.config, SITE, [raw], tmp_path / "two", num_proc=2)
    assert one["dropped"] == {"duplicate": 1, "empty": 1, "language": 4, "near_duplicate": 1}
    assert one["pii_replaced"] == {"EMAIL": 1, "PHONE": 1}
    for key in ("sources", "records", "dropped", "pii_replaced", "languages", "tokens", "token_lengths",
                "sequences", "contract", "files"):
        assert one[key] == two[key], key
    for split in ("train", "eval"):
        a, b = (pq.read_table(tmp_path / run / f"{split}.parquet") for run in ("one", "two"))
        for column in ("input_ids", "labels"):
            assert np.array_equal(np.array(a.column(column).to_pylist()), np.array(b.column(column).to_pylist()))


def test_several_inputs_keep_per_source_counts(fed, tmp_path, tokenizer):
    import csv

    jsonl = write_jsonl(tmp_path / "raw" / "a.jsonl", site_records("clinic", 25) + [{"text": ""}])
    table = tmp_path / "raw" / "b.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(site_records("bank", 12))
    text = tmp_path / "raw" / "c.txt"
    text.write_text("\n\n".join(LONG_DOCS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    card = prepare_site(fed.config, SITE, [jsonl, table, text], out)
    assert [(s["name"], s["records"]) for s in card["sources"]] == [("a.jsonl", 26), ("b.csv", 12),
                                                                     ("c.txt", len(LONG_DOCS))]
    assert card["records"]["read"] == 26 + 12 + len(LONG_DOCS)
    assert card["records"]["kept"] == 25 + 12 + len(LONG_DOCS) and card["dropped"] == {"empty": 1}
    decoded = decoded_tokens(out, tokenizer)
    for needle in (site_records("clinic", 25)[-1]["output"], site_records("bank", 12)[-1]["output"], LONG_DOCS[-1]):
        assert needle in decoded


def test_a_bad_line_in_the_middle_of_an_input(fed, tmp_path, capsys):
    rows = site_records(SITE, 10)
    raw = tmp_path / "raw" / "clinic.jsonl"
    raw.parent.mkdir()
    body = [json.dumps(r) for r in rows]
    body.insert(5, '{"instruction": "How is north-7 asthma coded?", "output": }')
    raw.write_text("\n".join(body) + "\n", encoding="utf-8")
    good = write_jsonl(tmp_path / "raw" / "more.jsonl", site_records("bank", 5))
    before = every_path(tmp_path)
    out = tmp_path / "prepared" / SITE
    code, stdout, err = run_cli(["prepare", "--config", fed.yaml, "--site", SITE, "--input", good, "--input", raw,
                                 "--out", out], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert line.startswith(f"error: {raw}:6: not valid JSON (Expecting value"), line
    assert "DatasetGenerationError" not in err and "generating the dataset" not in err
    assert stdout == ""
    assert every_path(tmp_path) == before
