"""Search-E1 pair mining: every rule, and the edit distance against a plain reference."""

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_sdsearch.core.pairs import RolloutRecord as R
from nemo_sdsearch.core.pairs import levenshtein, mine_pair, mine_pairs


def reference_levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def numpy_levenshtein(a: str, b: str) -> int:
    """The numpy implementation pair mining used before rapidfuzz, kept as the equality reference."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    bv = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1)
    row = idx.copy()
    for i, ch in enumerate(np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32), 1):
        tmp = np.empty_like(row)
        tmp[0] = i
        tmp[1:] = np.minimum(row[1:] + 1, row[:-1] + (bv != ch))
        row = idx + np.minimum.accumulate(tmp - idx)
    return int(row[-1])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcé ü", max_size=25), st.text(alphabet="abcé ü", max_size=25))
def test_levenshtein_matches_reference(a, b):
    assert levenshtein(a, b) == reference_levenshtein(a, b) == numpy_levenshtein(a, b) == levenshtein(b, a)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_levenshtein_any_code_points(a, b):
    """Arbitrary code points (astral, combining, NUL): distance is per code point, as before."""
    try:
        ref = numpy_levenshtein(a, b)
    except UnicodeEncodeError:  # lone surrogates: the numpy version could not encode them at all
        ref = reference_levenshtein(a, b)
    assert levenshtein(a, b) == ref == reference_levenshtein(a, b)


def test_levenshtein_equals_numpy_version_on_long_random_rollout_texts():
    """Rollout-length strings (hundreds to thousands of characters; rapidfuzz switches to its block
    algorithm past 64 characters), from near-copies to unrelated texts."""
    rng = random.Random(0)
    words = ["<search>", "</search>", "<answer>", "</answer>", "<think>", "the", "Paris", "1889",
             "é", "ü", "年", "🙂", " ", "\n", "who", "wrote"]
    for trial in range(40):
        a = "".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        if trial % 2:  # a mutated copy: small distances on long strings
            b = list(a)
            for _ in range(rng.randint(0, 30)):
                op, pos = rng.randrange(3), rng.randint(0, len(b))
                if op == 0:
                    b.insert(pos, rng.choice("xyzé🙂"))
                elif b and pos < len(b):
                    if op == 1:
                        del b[pos]
                    else:
                        b[pos] = rng.choice("xyzé🙂")
            b = "".join(b)
        else:
            b = "".join(rng.choice(words) for _ in range(rng.randint(0, 400)))
        assert levenshtein(a, b) == numpy_levenshtein(a, b) == levenshtein(b, a), trial


def test_levenshtein_examples():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("same", "same") == 0


def test_reference_is_fewest_searches():
    rs = [R("a" * 10, True, 3, 10), R("b" * 10, True, 1, 50), R("c", False, 0, 1)]
    assert mine_pair(0, rs).reference == 1


def test_reference_tie_broken_by_length_then_order():
    rs = [R("x", True, 2, 30), R("y", True, 2, 20), R("z", True, 2, 20), R("w", False, 1, 5)]
    assert mine_pair(0, rs).reference == 1


def test_student_is_the_most_different_wrong_rollout():
    ref = "<search> a b </search> <answer> x </answer>"
    rs = [R(ref, True, 1, 10),
          R(ref.replace("x", "y"), False, 1, 10),            # distance 1
          R("<search> q </search> <answer> zzzz </answer>", False, 1, 10),  # far
          R("something else entirely, much longer than the rest", True, 1, 60)]  # correct: ignored
    p = mine_pair(0, rs)
    assert (p.reference, p.student, p.student_correct) == (0, 2, False)
    assert p.distance == levenshtein(ref, rs[2].text)


def test_student_tie_goes_to_the_earlier_rollout():
    # two wrong rollouts at the same distance from the reference: the earlier one is the student
    rs = [R("abc", True, 1, 3), R("abx", False, 1, 3), R("xbc", False, 1, 3), R("ayc", False, 1, 3)]
    assert mine_pair(0, rs).student == 1
    rs = [R("abc", True, 1, 3), R("abx", False, 1, 3), R("xyc", False, 1, 3), R("xbz", False, 1, 3)]
    assert mine_pair(0, rs).student == 2


def test_fallback_to_most_different_correct_rollout():
    rs = [R("abc", True, 1, 3), R("abd", True, 2, 3), R("zzzzzz", True, 2, 6)]
    p = mine_pair(0, rs)
    assert (p.reference, p.student, p.student_correct) == (0, 2, True)


def test_dropping_and_counts():
    groups = [
        [R("a", False, 1, 1), R("b", False, 2, 2)],       # no correct: dropped
        [R("a", True, 1, 1)],                              # only the reference: dropped
        [R("a", True, 1, 1), R("bb", False, 1, 2)],        # wrong student
        [R("a", True, 2, 1), R("abc", True, 1, 3)],        # correct student (fallback)
    ]
    pairs, report = mine_pairs(groups)
    assert [p.question for p in pairs] == [2, 3]
    d = report.as_dict()
    assert (d["questions"], d["pairs"], d["dropped_no_correct"], d["dropped_single_rollout"],
            d["wrong_students"], d["correct_students"]) == (4, 2, 1, 1, 1, 1)
    assert d["mean_reference_searches"] == 1.0
