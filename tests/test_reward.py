import pytest

from nemo_sdsearch.core.reward import exact_match, extract_answer, f1_score, normalize_answer


@pytest.mark.parametrize("raw, norm", [
    ("The  Eiffel Tower.", "eiffel tower"),
    ("an apple, a pear & THE plum!", "apple pear plum"),
    ("“Oskar”", "oskar"),                      # curly quotes are Unicode punctuation
    ("Ｐａｒｉｓ", "paris"),                      # full-width letters (NFKC)
    ("Zürich", "zürich"),                      # accents kept, as in the standard script
    ("New\u00a0York—City", "new yorkcity"),    # no-break space, em dash deleted like ASCII punctuation
    ("O'Neil", "oneil"),
    ("theory", "theory"),                      # articles only as whole words
    ("A", ""),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_any_alias():
    assert exact_match("oskar city", ["Oskar", "Oskar City"]) == 1.0
    assert exact_match("Oskar town", ["Oskar", "Oskar City"]) == 0.0
    assert exact_match(None, ["x"]) == 0.0
    assert exact_match("The Beatles", ["beatles"]) == 1.0


def test_f1():
    assert f1_score("Talen Moravik", ["Moravik"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("yes", ["no"]) == 0.0
    assert f1_score("no", ["no"]) == 1.0
    assert f1_score("x y", ["y x"]) == 1.0


def test_extract_answer_last_complete():
    assert extract_answer("<answer> a </answer> then <answer>b</answer> <answer>c") == "b"
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer>\nmulti\nline </answer>") == "multi\nline"
