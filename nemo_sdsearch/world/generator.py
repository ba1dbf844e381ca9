"""Deterministic synthetic world: entities, relations, one passage per aspect of an entity, and questions.

Entities: persons, organizations, cities, countries (>= 1,000 in all), with 8 relation types that
questions ask about (birthplace, birth year, founder, founding year, headquarters, city country, city
founding year, capital) plus four that only passages state (occupation, a country's founding year, the
population of a city or country).
Passages follow the Search-R1 corpus format `{"id", "contents"}` with contents `"Title"\\ntext`; questions
follow FlashRAG `{"id", "question", "golden_answers", "metadata"}` in three kinds: single-hop, two-hop
bridge (two searches) and comparison (two searches; the answer is the earlier year, so it cannot be
guessed from the two names in the question).

Which words a query uses decides whether it finds the evidence (`sdsearch world --audit` measures it):
- An entity's facts are spread over several passages, titled like Wikipedia sections after what they state
  ("Rebun Works (founding year)"): one *aspect* passage per relation, whose title carries the relation's
  keyword, and two *filler* sections (overview, ...) that state nothing asked about. Fillers are one
  token shorter than the entity's shortest aspect, so BM25 ranks them first for the name alone: the name
  alone, or the name with the wrong relation keyword, mostly leaves the evidence outside the top 3; the
  name with the right keyword puts it first.
- Names share tokens with distractors: persons share family names, organizations share a first word
  ("Rebun Works" / "Rebun Bank"), some cities and first names are near-homonyms of others ("Gonvun" /
  "Gonvan"), and other entities' passages mention a name (a founder, a birthplace, a capital).
- A question's own words ("born", "founded") appear in several aspects of its entity, not in its title:
  the question text is a fair query, not an ideal one.

Every hop of a question records the ideal query (entity + relation keyword), the *evidence sentence* and
the id of the *evidence passage* that holds it (FlashRAG `metadata.evidence`: one passage id per hop);
the warm-start demonstrations and the query-level metrics (`world/evidence.py`) are built from these.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

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
    query: str  # the ideal query: the entity's name and the relation's keyword
    evidence: str  # the exact passage sentence that holds the answer of this hop
    value: str
    evidence_id: str = ""  # id of the passage holding `evidence`


@dataclass
class Question:
    id: str
    question: str
    golden_answers: list[str]
    kind: str
    relation: str
    hops: list[Hop]
    template: int = 0  # which of the relation's question templates phrased it

    def to_flashrag(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "golden_answers": self.golden_answers,
            "metadata": {"kind": self.kind, "relation": self.relation, "template": self.template,
                         "hops": [asdict(h) for h in self.hops],
                         "evidence": [h.evidence_id for h in self.hops]},
        }


@dataclass
class World:
    seed: int
    persons: dict[str, dict] = field(default_factory=dict)
    orgs: dict[str, dict] = field(default_factory=dict)
    cities: dict[str, dict] = field(default_factory=dict)
    countries: dict[str, dict] = field(default_factory=dict)
    passages: list[dict] = field(default_factory=list)
    # (entity, relation) -> id of the passage stating that fact
    evidence_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    # every word drawn for a name of this world (renamed ones included, organization kinds not): other
    # worlds avoid them
    words: set[str] = field(default_factory=set)

    @property
    def names(self) -> set[str]:
        return set(self.persons) | set(self.orgs) | set(self.cities) | set(self.countries)

    @property
    def num_entities(self) -> int:
        return len(self.names)


class _Names:
    """Unique names whose words avoid `exclude_words` (another world's)."""

    def __init__(self, rng: random.Random, exclude_words: set[str]):
        self.rng, self.used, self.exclude = rng, set(), set(exclude_words)

    def word(self, syllables: int = 2) -> str:
        return "".join(self.rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()

    def unique(self, make) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.used and not (set(name.split()) & self.exclude):
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted")


# Relations: keyword (what an ideal query names), the section title of the evidence passage (it carries the
# keyword), the evidence sentence, the value. The evidence sentences are the ones of the first version of
# this world, whose copying the shipped model learned; no keyword appears in another relation's passage of
# the same entity ("founded" and "born" are not keywords: bm25s does not stem).
def _ev_birthplace(p, w): return f"{p} was born in the city of {w.persons[p]['birthplace']}."
def _ev_birth_year(p, w): return f"{p} was born in the year {w.persons[p]['year']}."
def _ev_occupation(p, w):
    occ = w.persons[p]["occupation"]
    return f"{p} worked as {'an' if occ[0] in 'aeiou' else 'a'} {occ}."
def _ev_founder(o, w): return f"{o} was founded by {w.orgs[o]['founder']}."
def _ev_org_year(o, w): return f"{o} was founded in the year {w.orgs[o]['year']}."
def _ev_headquarters(o, w): return f"{o} has its headquarters in {w.orgs[o]['headquarters']}."
def _ev_city_country(c, w): return f"{c} is a city in {w.cities[c]['country']}."
def _ev_city_year(c, w): return f"{c} was founded in the year {w.cities[c]['year']}."
def _ev_city_population(c, w): return f"{c} has a population of {w.cities[c]['population']}."
def _ev_capital(k, w): return f"The capital of {k} is {w.countries[k]['capital']}."
def _ev_country_year(k, w): return f"{k} was founded in the year {w.countries[k]['year']}."
def _ev_country_population(k, w): return f"{k} has a population of {w.countries[k]['population']}."


# relation -> (subject table, keyword, section title, evidence sentence, value getter)
RELATIONS = {
    "birthplace": ("persons", "birthplace", "birthplace", _ev_birthplace,
                   lambda s, w: w.persons[s]["birthplace"]),
    "birth_year": ("persons", "birth year", "birth year", _ev_birth_year, lambda s, w: str(w.persons[s]["year"])),
    "occupation": ("persons", "occupation", "occupation", _ev_occupation, lambda s, w: w.persons[s]["occupation"]),
    "founder": ("orgs", "founder", "founder", _ev_founder, lambda s, w: w.orgs[s]["founder"]),
    "org_year": ("orgs", "founding year", "founding year", _ev_org_year, lambda s, w: str(w.orgs[s]["year"])),
    "headquarters": ("orgs", "headquarters", "headquarters", _ev_headquarters,
                     lambda s, w: w.orgs[s]["headquarters"]),
    "city_country": ("cities", "country", "country", _ev_city_country, lambda s, w: w.cities[s]["country"]),
    "city_year": ("cities", "founding year", "founding year", _ev_city_year, lambda s, w: str(w.cities[s]["year"])),
    "city_population": ("cities", "population", "population", _ev_city_population,
                        lambda s, w: str(w.cities[s]["population"])),
    "capital": ("countries", "capital", "capital", _ev_capital, lambda s, w: w.countries[s]["capital"]),
    "country_year": ("countries", "founding year", "founding year", _ev_country_year,
                     lambda s, w: str(w.countries[s]["year"])),
    "country_population": ("countries", "population", "population", _ev_country_population,
                           lambda s, w: str(w.countries[s]["population"])),
}
# Filler sections: no fact a question asks about, no relation keyword, and one bm25s token shorter than the
# shortest aspect passage of their entity, so BM25 ranks them first for the name alone. The margin is small
# on purpose: the name plus the right keyword still puts the evidence first.
FILLERS = {
    "persons": [("overview", "{e} is fondly remembered."), ("legacy", "{e} is widely admired.")],
    "orgs": [("overview", "{e} is widely renowned."), ("products", "{e} is still thriving.")],
    "cities": [("overview", "{e} is old."), ("culture", "{e} is famous.")],
    "countries": [("overview", "{e} is vast."), ("economy", "{e} is rich.")],
}
TYPE_RELATIONS = {t: [r for r, spec in RELATIONS.items() if spec[0] == t] for t in FILLERS}


def keyword(relation: str) -> str:
    return RELATIONS[relation][1]


def section_title(entity: str, section: str) -> str:
    return f"{entity} ({section})"


def _base_world(seed: int, n_persons: int, n_orgs: int, n_cities: int, n_countries: int,
                exclude_words: set[str]) -> tuple[World, _Names]:
    """Entities and attributes, drawn exactly as the first version of this generator drew them (the names
    of the tokenizer world, which has nothing to exclude, are the ones the shipped tokenizer saw)."""
    rng = random.Random(seed)
    names = _Names(rng, exclude_words)
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
    return w, names


def _near_homonym(word: str, rng: random.Random) -> str:
    """The word with one syllable's vowel (or final n) changed: 'Gonvun' -> 'Gonvan'."""
    sylls = _syllables(word)
    i = rng.randrange(len(sylls))
    sylls[i] = rng.choice([c for c in SYLLABLES if c[0] == sylls[i][0] and c != sylls[i]])
    return "".join(sylls).capitalize()


def _syllables(word: str) -> list[str]:
    """Split a name word back into its syllables (consonant + vowel, optionally + n)."""
    w, out, i = word.lower(), [], 0
    while i < len(w):
        s = w[i:i + 2]
        i += 2
        if i < len(w) and w[i] == "n" and (i + 1 == len(w) or w[i + 1] not in "aeiou"):
            s += "n"
            i += 1
        out.append(s)
    return out


def _rename(w: World, kind: str, old: str, new: str, born_in: dict | None = None,
            based_in: dict | None = None) -> None:
    """Rename an entity everywhere it is referred to. Cities need `born_in` / `based_in` (city -> the names
    of the persons born / organizations based there), which are kept up to date."""
    table = getattr(w, kind)
    table[new] = table.pop(old)
    if kind == "persons" and table[new]["founded"]:
        w.orgs[table[new]["founded"]]["founder"] = new
    elif kind == "orgs":
        w.persons[table[new]["founder"]]["founded"] = new
    elif kind == "cities":
        born_in[new], based_in[new] = born_in.pop(old, []), based_in.pop(old, [])
        for p in born_in[new]:
            w.persons[p]["birthplace"] = new
        for o in based_in[new]:
            w.orgs[o]["headquarters"] = new
        country = w.countries[table[new]["country"]]
        if country["capital"] == old:
            country["capital"] = new


def _distractors(w: World, names: _Names, rng: random.Random, family_share: float = 0.7,
                 sibling_share: float = 0.4, homonym_share: float = 0.15) -> None:
    """Names that share tokens: family names, organizations sharing a first word, near-homonyms."""
    taken = set(names.used)  # every name ever used in this world (a renamed entity's old name included)
    forbidden = names.exclude
    persons = list(w.persons)
    families = sorted({p.split()[1] for p in persons[:max(1, len(persons) // 4)]})
    for p in persons[len(persons) // 4:]:
        if rng.random() < family_share:
            new = f"{p.split()[0]} {rng.choice(families)}"
            founded = w.persons[p]["founded"]
            # never a founder whose family name is the first word of their organization (the answer would be
            # in the question)
            if new not in taken and not (founded and founded.split()[0] == new.split()[1]):
                _rename(w, "persons", p, new)
                taken.add(new)
    surnames = {p.split()[1] for p in w.persons}
    orgs = list(w.orgs)
    for i, o in enumerate(orgs[1:], 1):
        if rng.random() < sibling_share:
            first = orgs[rng.randrange(i)].split()[0]
            new = f"{first} {rng.choice(ORG_KINDS)}"
            if new not in taken and first not in surnames:
                _rename(w, "orgs", o, new)
                taken.add(new)
    born_in, based_in = defaultdict(list), defaultdict(list)
    for p, a in w.persons.items():
        born_in[a["birthplace"]].append(p)
    for o, a in w.orgs.items():
        based_in[a["headquarters"]].append(o)
    words_in_use = {x for n in w.names for x in n.split()}
    for kind, pick in (("cities", lambda n: n), ("persons", lambda n: n.split()[0])):
        pool = list(getattr(w, kind))
        current = Counter(pick(x) for x in pool)
        for n in pool:
            if rng.random() >= homonym_share:
                continue
            source = pick(rng.choice(pool))
            if not current[source]:
                continue  # renamed meanwhile
            twin = _near_homonym(source, rng)
            new = twin if kind == "cities" else f"{twin} {n.split()[1]}"
            if twin in words_in_use or twin in forbidden or new in taken:
                continue
            _rename(w, kind, n, new, born_in, based_in)
            taken.add(new)
            current[pick(n)] -= 1
            current[pick(new)] += 1
            words_in_use.add(twin)


def build_world(seed: int, n_persons: int = 500, n_orgs: int = 250, n_cities: int = 250,
                n_countries: int = 30, exclude_names: set[str] | None = None) -> World:
    """Build a world. No word of a name in `exclude_names` (e.g. another world's names, or its `words`)
    is used in a name of this one."""
    exclude_words = {x for n in (exclude_names or ()) for x in n.split()} - set(ORG_KINDS)
    w, names = _base_world(seed, n_persons, n_orgs, n_cities, n_countries, exclude_words)
    w.words = {x for n in names.used for x in n.split()} - set(ORG_KINDS)
    rng = random.Random(f"world-v2-{seed}")  # the draws below never shift the base world's
    for k in w.countries.values():
        k["year"], k["population"] = rng.randint(300, 1499), rng.randint(100, 999) * 10_000
    for c in w.cities.values():
        c["population"] = rng.randint(10, 999) * 100
    _distractors(w, names, rng)
    w.words |= {x for n in w.names for x in n.split()} - set(ORG_KINDS)
    w.passages = _passages(w, rng)
    return w


def _passages(w: World, rng: random.Random) -> list[dict]:
    rows = []  # (title, text, (entity, relation) or None)
    for kind in ("persons", "orgs", "cities", "countries"):
        for e in getattr(w, kind):
            for section, text in FILLERS[kind]:
                rows.append((section_title(e, section), text.format(e=e), None))
            for r in TYPE_RELATIONS[kind]:
                _, _, section, evidence, _ = RELATIONS[r]
                rows.append((section_title(e, section), evidence(e, w), (e, r)))
    rng.shuffle(rows)
    out = []
    for i, (title, text, fact) in enumerate(rows):
        out.append({"id": str(i), "contents": f'"{title}"\n{text}'})
        if fact is not None:
            w.evidence_ids[fact] = str(i)
    return out


def _aliases(kind: str, value: str) -> list[str]:
    if kind == "person":
        return [value, value.split()[-1]]
    if kind == "city":
        return [value, f"{value} City"]
    if kind == "country":
        return [value, f"Republic of {value}"]
    return [value]


# relation -> (subject table, question templates, query keyword, evidence, value getter, value kind)
def _single_spec(relation, templates, vkind):
    table, kw, _, evidence, value = RELATIONS[relation]
    return table, templates, kw, evidence, value, vkind


_SINGLE = {
    "birthplace": _single_spec("birthplace", ["Where was {s} born?", "In which city was {s} born?"], "city"),
    "birth_year": _single_spec("birth_year", ["In what year was {s} born?", "When was {s} born?"], "year"),
    "founder": _single_spec("founder", ["Who founded {s}?", "Who is the founder of {s}?"], "person"),
    "org_year": _single_spec("org_year", ["In what year was {s} founded?", "When was {s} founded?"], "year"),
    "headquarters": _single_spec("headquarters", ["Where does {s} have its headquarters?",
                                                  "In which city is {s} headquartered?"], "city"),
    "city_country": _single_spec("city_country", ["In which country is {s}?", "{s} is a city in which country?"],
                                 "country"),
    "city_year": _single_spec("city_year", ["When was the city of {s} founded?", "In what year was {s} founded?"],
                              "year"),
    "capital": _single_spec("capital", ["What is the capital of {k}?", "Which city is the capital of {k}?"], "city"),
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
    _, kw, _, evidence, value = RELATIONS[relation]
    return Hop(subject, relation, f"{subject} {kw}", evidence(subject, w), value(subject, w),
               w.evidence_ids[(subject, relation)])


def _single(w: World, rng: random.Random, relation: str):
    table, templates, _, _, _, vkind = _SINGLE[relation]
    s = rng.choice(list(getattr(w, table)))
    hop = _hop(w, relation, s)
    t = rng.randrange(len(templates))
    return templates[t].format(s=s, k=s), _aliases(vkind, hop.value), [hop], t


def _bridge(w: World, rng: random.Random, relation: str):
    table, templates, r1, r2 = _BRIDGE[relation]
    s = rng.choice(list(getattr(w, table)))
    h1 = _hop(w, r1, s)
    h2 = _hop(w, r2, h1.value)
    t = rng.randrange(len(templates))
    return templates[t].format(s=s), _aliases(_SINGLE[r2][5], h2.value), [h1, h2], t


def _compare(w: World, rng: random.Random, relation: str):
    table, templates, r = _COMPARE[relation]
    pool = list(getattr(w, table))
    while True:
        a, b = rng.sample(pool, 2)
        ha, hb = _hop(w, r, a), _hop(w, r, b)
        if ha.value != hb.value:
            break
    t = rng.randrange(len(templates))
    return templates[t].format(a=a, b=b), [min(ha.value, hb.value)], [ha, hb], t


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
            text, answers, hops, t = _single(w, rng, rel)
        elif kind == "bridge":
            rel = rng.choice(list(_BRIDGE))
            text, answers, hops, t = _bridge(w, rng, rel)
        else:
            rel = rng.choice(list(_COMPARE))
            text, answers, hops, t = _compare(w, rng, rel)
        if text in seen:
            continue
        seen.add(text)
        out.append(Question(f"{prefix}-{len(out)}", text, answers, kind, rel, hops, t))
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

    def more_test(self, n: int) -> list[Question]:
        """`n` test questions of the test world: the same generator and seed as `test`, drawn on, so the first
        len(test) are `test` itself (a larger test set for a study that needs the power)."""
        out = make_questions(self.test_world, n, self.test_world.seed + 1, "test")
        assert [q.question for q in out[:len(self.test)]] == [q.question for q in self.test[:n]]
        return out


# The tokenizer world comes first and no other world uses its name words: BPE merges whole names it saw
# often (they become 1-2 tokens where any other name takes 3-4), and a model trained on other worlds
# copies such merged names poorly. Before this separation the training world *was* the tokenizer
# world, and the warm-started model scored 0.02 greedy EM on it against 0.17 on the test world.
TOKENIZER_SEED, TRAIN_SEED, TEST_SEED = 1234, 4321, 98765


def build_bundle(n_train: int = 6000, n_dev: int = 200, n_test: int = 300,
                 train_seed: int = TRAIN_SEED, test_seed: int = TEST_SEED,
                 tokenizer_seed: int = TOKENIZER_SEED) -> Bundle:
    tokenizer_world = build_world(tokenizer_seed)
    test_world = build_world(test_seed, exclude_names=tokenizer_world.words)
    train_world = build_world(train_seed, exclude_names=tokenizer_world.words | test_world.words)
    tokenizer_questions = make_questions(tokenizer_world, n_train, tokenizer_seed + 1, "tok")
    train = make_questions(train_world, n_train, train_seed + 1, "train")
    dev = make_questions(train_world, n_dev, train_seed + 2, "dev", exclude_texts={q.question for q in train})
    test = make_questions(test_world, n_test, test_seed + 1, "test")
    return Bundle(train_world, test_world, train, dev, test, tokenizer_world, tokenizer_questions)
