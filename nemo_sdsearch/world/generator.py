"""Deterministic synthetic world: entities, relations, one passage per entity, and questions.

Entities: persons, organizations, cities, countries (>= 1,000 in all), with 9 relation types
(birthplace, birth year, occupation, founder, founding year, headquarters, city country, city founding
year, capital). Passages follow the Search-R1 corpus format `{"id", "contents"}` with contents
`"Title"\\ntext`; questions follow FlashRAG `{"id", "question", "golden_answers", "metadata"}` in three
kinds: single-hop, two-hop bridge (two searches) and comparison (two searches; the answer is the earlier
year, so it cannot be guessed from the two names in the question).

Every hop of a question records the query a competent searcher would write and the *evidence sentence*
of the passage that answers it; the warm-start demonstrations are built from these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Names are built from a fixed inventory of 140 syllables (consonant + vowel, optionally + n), two per
# word. The project tokenizer learns each syllable as one token, so a name costs 2-5 tokens: short
# enough for the tiny model to copy exactly from the question into its query and from a passage
# into its answer, which is the skill the warm start has to teach.
SYLLABLES = [c + v + n for c in "bdfgklmnprstvz" for v in "aeiou" for n in ("", "n")]
ORG_KINDS = ["Works", "Labs", "Company", "Guild", "Institute", "Foundry", "Press", "Bank", "Mills", "Society"]
COUNTRY_ENDINGS = ["ia", "land", "stan", "ora", "ica"]
OCCUPATIONS = ["painter", "engineer", "composer", "chemist", "sailor", "architect", "poet", "judge",
               "physician", "merchant", "astronomer", "sculptor", "teacher", "banker", "botanist",
               "historian", "inventor", "mapmaker", "weaver", "printer"]


@dataclass
class Hop:
    entity: str
    relation: str
    query: str
    evidence: str  # the exact passage sentence that holds the answer of this hop
    value: str


@dataclass
class Question:
    id: str
    question: str
    golden_answers: list[str]
    kind: str
    relation: str
    hops: list[Hop]

    def to_flashrag(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "golden_answers": self.golden_answers,
            "metadata": {"kind": self.kind, "relation": self.relation,
                         "hops": [h.__dict__ for h in self.hops]},
        }


@dataclass
class World:
    seed: int
    persons: dict[str, dict] = field(default_factory=dict)
    orgs: dict[str, dict] = field(default_factory=dict)
    cities: dict[str, dict] = field(default_factory=dict)
    countries: dict[str, dict] = field(default_factory=dict)
    passages: list[dict] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return set(self.persons) | set(self.orgs) | set(self.cities) | set(self.countries)

    @property
    def num_entities(self) -> int:
        return len(self.names)


class _Names:
    def __init__(self, rng: random.Random, exclude: set[str]):
        self.rng, self.used = rng, set(exclude)

    def word(self, syllables: int = 2) -> str:
        return "".join(self.rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()

    def unique(self, make) -> str:
        for _ in range(10_000):
            name = make()
            # Also reserve every word of a multi-word name, so a first name is never a city.
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted")


def build_world(seed: int, n_persons: int = 500, n_orgs: int = 250, n_cities: int = 250,
                n_countries: int = 30, exclude_names: set[str] | None = None) -> World:
    """Build a world. Names in `exclude_names` (e.g. another world's) are never used."""
    rng = random.Random(seed)
    names = _Names(rng, exclude_names or set())
    w = World(seed)
    for _ in range(n_countries):
        k = names.unique(lambda: names.word() + rng.choice(COUNTRY_ENDINGS))
        w.countries[k] = {"capital": None}
    country_list = list(w.countries)
    for i in range(n_cities):
        c = names.unique(lambda: names.word())
        k = country_list[i % n_countries] if i < n_countries else rng.choice(country_list)
        w.cities[c] = {"country": k, "year": rng.randint(800, 1699)}
        if w.countries[k]["capital"] is None:
            w.countries[k]["capital"] = c
    city_list = list(w.cities)
    for _ in range(n_persons):
        p = names.unique(lambda: f"{names.word()} {names.word()}")
        w.persons[p] = {"birthplace": rng.choice(city_list), "year": rng.randint(1700, 1989),
                        "occupation": rng.choice(OCCUPATIONS), "founded": None}
    founders = rng.sample(list(w.persons), n_orgs)
    for founder in founders:
        o = names.unique(lambda: f"{names.word()} {rng.choice(ORG_KINDS)}")
        w.orgs[o] = {"founder": founder, "year": rng.randint(1750, 2019), "headquarters": rng.choice(city_list)}
        w.persons[founder]["founded"] = o
    w.passages = _passages(w, rng)
    return w


# Evidence sentences: one template per relation, used both in passages and in demonstrations.
def _ev_birthplace(p, w): return f"{p} was born in the city of {w.persons[p]['birthplace']}."
def _ev_birth_year(p, w): return f"{p} was born in the year {w.persons[p]['year']}."
def _ev_occupation(p, w):
    occ = w.persons[p]["occupation"]
    return f"{p} worked as {'an' if occ[0] in 'aeiou' else 'a'} {occ}."
def _ev_founded(p, w): return f"{p} founded {w.persons[p]['founded']}."
def _ev_founder(o, w): return f"{o} was founded by {w.orgs[o]['founder']}."
def _ev_org_year(o, w): return f"{o} was founded in the year {w.orgs[o]['year']}."
def _ev_headquarters(o, w): return f"{o} has its headquarters in {w.orgs[o]['headquarters']}."
def _ev_city_country(c, w): return f"{c} is a city in {w.cities[c]['country']}."
def _ev_city_year(c, w): return f"{c} was founded in the year {w.cities[c]['year']}."
def _ev_capital(k, w): return f"The capital of {k} is {w.countries[k]['capital']}."


def _passages(w: World, rng: random.Random) -> list[dict]:
    texts = []
    for p, a in w.persons.items():
        s = [_ev_birthplace(p, w), _ev_birth_year(p, w), _ev_occupation(p, w)]
        if a["founded"]:
            s.append(_ev_founded(p, w))
        texts.append((p, s))
    for o in w.orgs:
        texts.append((o, [_ev_founder(o, w), _ev_org_year(o, w), _ev_headquarters(o, w)]))
    for c in w.cities:
        s = [_ev_city_country(c, w), _ev_city_year(c, w)]
        k = w.cities[c]["country"]
        if w.countries[k]["capital"] == c:
            s.append(f"{c} is the capital of {k}.")
        texts.append((c, s))
    for k in w.countries:
        texts.append((k, [f"{k} is a country.", _ev_capital(k, w)]))
    rng.shuffle(texts)
    return [{"id": str(i), "contents": f'"{title}"\n' + " ".join(sents)} for i, (title, sents) in enumerate(texts)]


def _aliases(kind: str, value: str) -> list[str]:
    if kind == "person":
        return [value, value.split()[-1]]
    if kind == "city":
        return [value, f"{value} City"]
    if kind == "country":
        return [value, f"Republic of {value}"]
    return [value]


# relation -> (subject table, templates, query suffix, evidence, value getter, value kind)
_SINGLE = {
    "birthplace": ("persons", ["Where was {s} born?", "In which city was {s} born?"], "birthplace",
                   _ev_birthplace, lambda s, w: w.persons[s]["birthplace"], "city"),
    "birth_year": ("persons", ["In what year was {s} born?", "When was {s} born?"], "birth year",
                   _ev_birth_year, lambda s, w: str(w.persons[s]["year"]), "year"),
    "founder": ("orgs", ["Who founded {s}?", "Who is the founder of {s}?"], "founder",
                _ev_founder, lambda s, w: w.orgs[s]["founder"], "person"),
    "org_year": ("orgs", ["In what year was {s} founded?", "When was {s} founded?"], "founding year",
                 _ev_org_year, lambda s, w: str(w.orgs[s]["year"]), "year"),
    "headquarters": ("orgs", ["Where does {s} have its headquarters?", "In which city is {s} headquartered?"],
                     "headquarters", _ev_headquarters, lambda s, w: w.orgs[s]["headquarters"], "city"),
    "city_country": ("cities", ["In which country is {s}?", "{s} is a city in which country?"], "country",
                     _ev_city_country, lambda s, w: w.cities[s]["country"], "country"),
    "city_year": ("cities", ["When was the city of {s} founded?", "In what year was {s} founded?"],
                  "founding year", _ev_city_year, lambda s, w: str(w.cities[s]["year"]), "year"),
    "capital": ("countries", ["What is the capital of {k}?", "Which city is the capital of {k}?"], "capital",
                _ev_capital, lambda s, w: w.countries[s]["capital"], "city"),
}
# bridge relation -> (subject table, templates, first relation, second relation)
_BRIDGE = {
    "founder_birthplace": ("orgs", ["Where was the founder of {s} born?",
                                    "In which city was the founder of {s} born?"], "founder", "birthplace"),
    "founder_birth_year": ("orgs", ["In what year was the founder of {s} born?",
                                    "When was the founder of {s} born?"], "founder", "birth_year"),
    "headquarters_country": ("orgs", ["In which country does {s} have its headquarters?",
                                      "{s} is headquartered in which country?"], "headquarters", "city_country"),
    "birthplace_country": ("persons", ["In which country was {s} born?",
                                       "{s} was born in which country?"], "birthplace", "city_country"),
    "capital_year": ("countries", ["When was the capital of {s} founded?",
                                   "In what year was the capital of {s} founded?"], "capital", "city_year"),
}
_COMPARE = {
    "earlier_birth": ("persons", ["Who was born earlier, {a} or {b}? Answer with that birth year.",
                                  "Of {a} and {b}, who was born first? Answer with the year."], "birth_year"),
    "earlier_org": ("orgs", ["Which was founded earlier, {a} or {b}? Answer with that founding year.",
                             "Of {a} and {b}, which is older? Answer with its founding year."], "org_year"),
}


def _hop(w: World, relation: str, subject: str) -> Hop:
    _, _, suffix, evidence, value, _ = _SINGLE[relation]
    return Hop(subject, relation, f"{subject} {suffix}", evidence(subject, w), value(subject, w))


def _single(w: World, rng: random.Random, relation: str) -> tuple[str, list[str], list[Hop]]:
    table, templates, _, _, _, vkind = _SINGLE[relation]
    s = rng.choice(list(getattr(w, table)))
    hop = _hop(w, relation, s)
    return rng.choice(templates).format(s=s, k=s), _aliases(vkind, hop.value), [hop]


def _bridge(w: World, rng: random.Random, relation: str):
    table, templates, r1, r2 = _BRIDGE[relation]
    s = rng.choice(list(getattr(w, table)))
    h1 = _hop(w, r1, s)
    h2 = _hop(w, r2, h1.value)
    return rng.choice(templates).format(s=s), _aliases(_SINGLE[r2][5], h2.value), [h1, h2]


def _compare(w: World, rng: random.Random, relation: str):
    table, templates, r = _COMPARE[relation]
    pool = list(getattr(w, table))
    while True:
        a, b = rng.sample(pool, 2)
        ha, hb = _hop(w, r, a), _hop(w, r, b)
        if ha.value != hb.value:
            break
    return rng.choice(templates).format(a=a, b=b), [min(ha.value, hb.value)], [ha, hb]


KIND_MIX = {"single_hop": 0.4, "bridge": 0.35, "comparison": 0.25}


def make_questions(w: World, n: int, seed: int, prefix: str, exclude_texts: set[str] | None = None) -> list[Question]:
    rng = random.Random(seed)
    seen = set(exclude_texts or ())
    out: list[Question] = []
    kinds = list(KIND_MIX)
    weights = [KIND_MIX[k] for k in kinds]
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        if kind == "single_hop":
            rel = rng.choice(list(_SINGLE))
            text, answers, hops = _single(w, rng, rel)
        elif kind == "bridge":
            rel = rng.choice(list(_BRIDGE))
            text, answers, hops = _bridge(w, rng, rel)
        else:
            rel = rng.choice(list(_COMPARE))
            text, answers, hops = _compare(w, rng, rel)
        if text in seen:
            continue
        seen.add(text)
        out.append(Question(f"{prefix}-{len(out)}", text, answers, kind, rel, hops))
    return out


@dataclass
class Bundle:
    """The embedded default: a training world (train + dev questions), a separate test world, and the
    world whose text the project tokenizer was trained on (used for nothing else)."""
    train_world: World
    test_world: World
    train: list[Question]
    dev: list[Question]
    test: list[Question]
    tokenizer_world: World | None = None
    tokenizer_questions: list[Question] | None = None


# The tokenizer world comes first and no other world uses its names: BPE merges whole names it saw
# often (they become 1-2 tokens where any other name takes 3-4), and a model trained on other worlds
# copies such merged names poorly. Before this separation the training world *was* the tokenizer
# world, and the warm-started model scored 0.02 greedy EM on it against 0.17 on the test world.
TOKENIZER_SEED, TRAIN_SEED, TEST_SEED = 1234, 4321, 98765


def build_bundle(n_train: int = 6000, n_dev: int = 200, n_test: int = 300,
                 train_seed: int = TRAIN_SEED, test_seed: int = TEST_SEED,
                 tokenizer_seed: int = TOKENIZER_SEED) -> Bundle:
    tokenizer_world = build_world(tokenizer_seed)
    test_world = build_world(test_seed, exclude_names=tokenizer_world.names)
    train_world = build_world(train_seed, exclude_names=tokenizer_world.names | test_world.names)
    tokenizer_questions = make_questions(tokenizer_world, n_train, tokenizer_seed + 1, "tok")
    train = make_questions(train_world, n_train, train_seed + 1, "train")
    dev = make_questions(train_world, n_dev, train_seed + 2, "dev", exclude_texts={q.question for q in train})
    test = make_questions(test_world, n_test, test_seed + 1, "test")
    return Bundle(train_world, test_world, train, dev, test, tokenizer_world, tokenizer_questions)
