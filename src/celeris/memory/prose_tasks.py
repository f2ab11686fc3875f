"""The `prose` task family: long-context retrieval written independently of the synthetic suite.

Three kinds, none built from the synthetic family's templates (no "grass is green" filler, no
"magic number", no UUIDs, no VAR chains):
- `narrative_fact`: a chronicle of a town in varied sentences, in which four residents each have one fact of
  the same sort, stated once (the city they live in, how many of some goods they ordered, or the date they
  arrived); the question asks one resident's;
- `table_lookup`: a harbour master's report with small markdown tables of berthed vessels spread through it;
  the question asks one cell (tonnes) of the row another column (the vessel's name) identifies;
- `docstring_qa`: a reference listing of real standard-library functions (module.name(signature), then the
  docstring's first paragraph, read with `ast` from the running Python's stdlib, so the text depends on the
  Python version); the question asks for one function's documentation, scored on its first sentence.

Every answer occurs exactly once in its context. NAMM was evolved and selected on the synthetic family
only; this family is never used for evolution or selection (`memory evolve` refuses its samples, for
training and for `--val`), so scores on it say how far a policy carries over to text it was not fitted to.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

from celeris.errors import CelerisError

# ----------------------------------------------------------------------------- narrative_fact
FIRST = ("Amara Bello Chiara Dmitri Elena Farid Greta Hiro Ines Jonas Kalinda Lucas Marta Nikolai Olga Pavel "
         "Quentin Rosa Samir Tamsin Umar Vera Wendell Ximena Yusuf Zofia Anton Beatrix Cormac Delphine").split()
LAST = ("Okafor Lindqvist Moreau Tanaka Rossi Haddad Novak Ferreira Brennan Kowalski Sato Dubois Petrov Alvarez "
        "Mbeki Larsen Costa Nakamura Ibrahim Fischer Quinn Horvat Silva Grant Yilmaz Weber").split()
CITIES = ("Lisbon Tallinn Porto Ghent Bergen Krakow Seville Lyon Turin Graz Utrecht Tromso Valencia Bologna "
          "Gdansk Bratislava Aarhus Salzburg Cork Nantes Ljubljana Brno Malmo Tampere Coimbra Trieste").split()
MONTHS = ("January February March April May June July August September October November December").split()
GOODS = ("crates of pears", "sacks of flour", "rolls of canvas", "boxes of nails", "jars of honey",
         "bundles of firewood", "tins of paint", "bolts of linen", "barrels of cider", "reams of paper")
PLACES = ("the bakery", "the harbour", "the old mill", "the station", "the library", "the square", "the orchard",
          "the workshop", "the ferry landing", "the clinic", "the chapel", "the boathouse", "the post office",
          "the market hall", "the schoolyard", "the bridge")
TIMES = ("that morning", "after lunch", "in the late afternoon", "before dawn", "on the way home",
         "during the storm", "the following evening", "at the end of the week", "around midday", "after supper")
ACTIVITIES = ("mending fishing nets", "sorting the morning letters", "repainting a fence", "reading an old almanac",
              "arguing about the weather", "tuning a borrowed fiddle", "sweeping the steps", "counting seagulls",
              "repairing a cart wheel", "writing a complaint to the council", "baking far too many rolls",
              "teaching a dog to sit", "drawing the church tower", "looking for a lost glove")
OBJECTS = ("a dented kettle", "a folded map", "a basket of eggs", "a broken umbrella", "a parcel tied with string",
           "a brass lantern", "a stack of ledgers", "a child's kite", "a jar of buttons", "a wooden stool")
TOPICS = ("the new timetable", "the price of coal", "an old photograph", "the leaking roof of the chapel",
          "who had won the rowing race", "the broken clock in the square", "the summer fair", "the river's height")
ADJECTIVES = ("crowded", "quiet", "cold", "damp", "noisy", "half empty", "unusually warm", "full of smoke")

FILLER = (
    "{Time}, {A} was out {activity} near {place}.",
    "{Time} {place} was {adj}, so {A} left earlier than planned.",
    "{A} and {B} argued about {topic} until the tea went cold.",
    "Someone had left {object} by the door of {place}, and nobody claimed it.",
    "{A} wrote a long letter to {B} about {topic} but never posted it.",
    "The rain kept {A} indoors {time}, {activity}.",
    "At {place} people talked of little except {topic}.",
    "{A} found {object} behind {place} and carried it home without a word.",
    "{Time} {B} was seen {activity}, which surprised no one.",
    "{A} swore that {place} had been {adj} for as long as anyone could remember.",
    "It was {B} who first noticed {object} floating down the river.",
    "{A} lent {object} to {B}, and it came back a week later with a note.",
    "A stray cat followed {A} all the way from {place}.",
    "The bell at {place} rang twice {time}, and {B} counted the strokes out loud.",
    "{A} complained to {B} that {place} was always {adj} on market days.",
    "Nobody could agree on {topic}, least of all {A} and {B}.",
    "{Time} the wind turned, and the smell of the sea reached {place}.",
    "{B} stopped by {place} {time} and stayed far longer than intended.",
    "{A} had a habit of {activity} whenever the ferry was late.",
    "Children chased each other around {place} while {A} pretended not to notice.",
    "{A} sold {object} to a traveller for less than it was worth.",
    "The lamps along {place} were lit early {time}.",
    "{B} told a story about {topic} that nobody quite believed.",
    "{A} fell asleep {activity} and woke to find the candle burnt down.",
)

# Each fact: its sentences (stated once, varied wording), the question, and the answer prefix.
FACTS = {
    "city": (("{A} moved to {v} the year the mill closed, and has lived there ever since.",
              "These days {A} lives in {v}, in a narrow house above a tailor's shop.",
              "After years of wandering, {A} settled for good in {v}."),
             "In which city does {A} live now?", "{A} lives in"),
    "quantity": (("For the spring fair {A} ordered {v} {goods}, far more than anyone expected.",
                  "{A} placed an order for exactly {v} {goods} with the carrier from the coast.",
                  "The ledger shows that {A} bought {v} {goods} before the winter."),
                 "How many {goods} did {A} order?", "{A} ordered"),
    "date": (("{A} first arrived in town on {v}, carrying a single suitcase.",
              "The records say {A} came to the town on {v}, just before the floods.",
              "{A} stepped off the coach for the first time on {v}."),
             "On what date did {A} first arrive in town?", "{A} arrived on"),
}


def _people(rng: random.Random, n: int) -> list[str]:
    firsts, lasts = rng.sample(FIRST, n), rng.sample(LAST, n)
    return [f"{a} {b}" for a, b in zip(firsts, lasts, strict=True)]


def _fill(rng: random.Random, template: str, names: list[str]) -> str:
    a, b = rng.sample(names, 2)
    time = rng.choice(TIMES)
    return template.format(A=a, B=b, time=time, Time=time[0].upper() + time[1:], place=rng.choice(PLACES),
                           activity=rng.choice(ACTIVITIES), object=rng.choice(OBJECTS), topic=rng.choice(TOPICS),
                           adj=rng.choice(ADJECTIVES))


def _fill_to(make: Callable[[], str], n_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Pieces from `make` until they add up to about `n_tokens` (counted one by one, + 1 for the separator)."""
    out, total = [], 0
    while total < n_tokens:
        p = make()
        out.append(p)
        total += count(p) + 1
    return out


def narrative_fact(rng: random.Random, length: int, count: Callable[[str], int], holders: int = 4):
    names = _people(rng, holders + 3)  # three residents appear only in the filler
    people = names[:holders]  # each has one fact of the same sort, so the question must pick the right one
    kind = rng.choice(list(FACTS))
    values = {"city": rng.sample(CITIES, holders), "quantity": [str(v) for v in rng.sample(range(30, 100), holders)],
              # two-digit days and quantities apart, so no answer is a substring of another value
              "date": [f"{m} {d}" for m, d in rng.sample([(m, d) for m in MONTHS for d in range(10, 29)], holders)]}[kind]
    goods = rng.sample(GOODS, holders)
    facts = [rng.choice(FACTS[kind][0]).format(A=p, v=v, goods=g) for p, v, g in zip(people, values, goods, strict=True)]
    body = _fill_to(lambda: _fill(rng, rng.choice(FILLER), names), length - sum(count(f) for f in facts) - 40, count)
    for fact in facts:
        body.insert(rng.randint(0, len(body)), fact)
    i = rng.randrange(holders)
    paragraphs = [" ".join(body[j:j + 6]) for j in range(0, len(body), 6)]
    ctx = "Below is a chronicle of a small harbour town and the people who live there.\n\n" + "\n\n".join(paragraphs)
    _, question, prefix = FACTS[kind]
    return ctx, question.format(A=people[i], goods=goods[i]), [values[i]], "contains", prefix.format(A=people[i])


# ----------------------------------------------------------------------------- table_lookup
VESSELS = ("Albatross Aurora Beacon Bramble Calypso Cinder Cormorant Dauntless Driftwood Ember Endeavour Falcon Fjord "
           "Gannet Goldcrest Halcyon Harrier Heron Juniper Kestrel Kittiwake Lark Lodestar Magpie Mariner Meridian "
           "Minerva Nautilus Nimbus Osprey Pelican Peregrine Petrel Plover Puffin Quill Raven Resolute Saltire "
           "Sandpiper Seraph Skylark Solstice Sparrow Starling Tempest Thistle Tern Triton Valiant Vanguard Wagtail "
           "Whimbrel Wren Zephyr Bluebell Clover Foxglove Heather Primrose Sorrel Tansy Yarrow Larkspur Marigold").split()
PORTS = ("Rotterdam Antwerp Hamburg Bremen Gdansk Riga Tallinn Bergen Aarhus Lisbon Porto Bilbao Genoa Trieste "
         "Marseille Valencia").split()
CARGO = ("timber", "coal", "grain", "wool", "salt", "steel", "cement", "cotton", "copper", "tea")
QUAYS = ("the north quay", "the coal berth", "the east basin", "the old dry dock", "the pilot station",
         "the customs shed", "the grain silo", "the lock gates", "the fuel jetty", "the net lofts")
WORKS = ("dredging", "repaving", "rewiring the cranes", "painting the bollards", "replacing the fenders",
         "clearing silt", "surveying the sea wall", "fitting new floodlights")
STAFF = ("the harbour master", "the night watchman", "the deputy pilot", "the customs officer", "the crane foreman",
         "the berthing clerk", "the port engineer", "the lock keeper")
REPORT = (  # an operations report's voice, with no digits, so the table holds the only numbers
    "Work on {quay} continued, with {work} expected to finish before the autumn gales.",
    "{Staff} reported that {quay} was {state} for most of the week.",
    "Fog delayed the morning tides twice, and {staff} postponed {work} at {quay}.",
    "A complaint about noise from {quay} was passed to {staff} for a reply.",
    "{Staff} asked for more hands at {quay}, where {work} had fallen behind.",
    "The budget committee again deferred {work} at {quay}.",
    "Visitors from the maritime museum toured {quay} with {staff}.",
    "{Staff} inspected {quay} and found it {state}.",
    "Heavy swell kept small craft away from {quay} for several days.",
    "The contract for {work} at {quay} was put out to tender.",
    "{Staff} recommended that {work} at {quay} be brought forward.",
    "Gulls nesting on {quay} have once more slowed {work}.",
    "Training for new staff took place at {quay} under {staff}.",
    "The insurance surveyor called at {quay} and spoke with {staff}.",
)
STATES = ("in good order", "badly silted", "short of lighting", "crowded with idle barges", "quieter than usual",
          "in need of repair")


def _report_line(rng: random.Random) -> str:
    staff = rng.choice(STAFF)
    return rng.choice(REPORT).format(quay=rng.choice(QUAYS), work=rng.choice(WORKS), staff=staff,
                                     Staff=staff[0].upper() + staff[1:], state=rng.choice(STATES))


def table_lookup(rng: random.Random, length: int, count: Callable[[str], int], tables: int = 3, rows: int = 2):
    # Small tables spread through a report. With the full cache SmolLM2-135M answered 0 of 6 lookups in one
    # 8-row table even at 300 tokens, and 0 of 6 in one 4-row table at 1.6k tokens (it read the last row);
    # 3 tables of 2 rows at 1.6k: 7 and 5 of 8 on two seeds; 4 tables: 3 and 1 of 8.
    vessels, tonnes = rng.sample(VESSELS, tables * rows), rng.sample(range(1000, 10000), tables * rows)
    blocks = []
    for t in range(tables):
        lines = [f"| {v} | {w} | {rng.choice(PORTS)} | {rng.choice(CARGO)} |"
                 for v, w in zip(vessels[t * rows:(t + 1) * rows], tonnes[t * rows:(t + 1) * rows], strict=True)]
        blocks.append(f"Vessels berthed at {rng.choice(QUAYS)} that week:\n\n| Vessel | Tonnes | Port | Cargo |\n"
                      "|---|---|---|---|\n" + "\n".join(lines))
    body = _fill_to(lambda: _report_line(rng), length - sum(count(b) for b in blocks) - 30, count)
    paragraphs = [" ".join(body[j:j + 5]) for j in range(0, len(body), 5)]
    for block in blocks:
        paragraphs.insert(rng.randint(0, len(paragraphs)), block)
    i = rng.randrange(tables * rows)
    ctx = "Harbour master's report for the season.\n\n" + "\n\n".join(paragraphs)
    return ctx, f"How many tonnes does the vessel {vessels[i]} carry?", [str(tonnes[i])], "contains", \
        f"The {vessels[i]} carries"


# ----------------------------------------------------------------------------- docstring_qa
def _first_sentence(doc: str) -> str:
    para = " ".join(doc.split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return m.group(1) if m else para


@cache
def stdlib_docstrings() -> tuple[tuple[str, str, str], ...]:
    """`(module, name(signature), first paragraph)` for every public module-level function of the running
    Python's top-level stdlib modules whose docstring opens with a paragraph of 8-80 words and a first
    sentence of 4-20 words (doctest examples left out), in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            para = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if 8 <= len(para.split()) <= 80 and 4 <= len(_first_sentence(para).split()) <= 20 and ">>>" not in para:
                out.append((path.stem, f"{node.name}({ast.unparse(node.args)})", para))
    return tuple(out)


def docstring_qa(rng: random.Random, length: int, count: Callable[[str], int]):
    entries = list(stdlib_docstrings())
    rng.shuffle(entries)
    chosen: list[tuple[str, str, str]] = []  # (module.name, header line, first sentence)

    def entry() -> str:
        while True:  # one entry per function name, so the question is unambiguous
            if not entries:
                raise CelerisError(f"the standard library's docstrings run out before {length:,} tokens")
            module, sig, para = entries.pop()
            name = sig.split("(")[0]
            if all(c[0].rsplit(".", 1)[1] != name for c in chosen):
                break
        chosen.append((f"{module}.{name}", f"{module}.{sig}", _first_sentence(para)))
        return f"{module}.{sig}\n    {para}"

    ctx = "\n\n".join(_fill_to(entry, length - 60, count))
    cands = [c for c in chosen if ctx.count(c[2]) == 1]  # the answer occurs once
    if not cands:
        raise CelerisError("no docstring in the listing has a first sentence of its own; try another seed")
    q, header, first = rng.choice(cands)
    ctx = "Reference listing of Python standard-library functions (module.name(signature), then its documentation).\n\n" + ctx
    # The answer prefix repeats the entry's header line, so the model can go on by copying (as for kv_uuid).
    return ctx, f"Quote the documentation of {q} from the listing above.", [first], "contains", header + "\n   "


KINDS = ("narrative_fact", "table_lookup", "docstring_qa")
GENERATORS = {"narrative_fact": narrative_fact, "table_lookup": table_lookup, "docstring_qa": docstring_qa}
MAX_NEW_TOKENS = {"narrative_fact": 16, "table_lookup": 16, "docstring_qa": 40}  # a 20-word sentence is ~30 tokens
