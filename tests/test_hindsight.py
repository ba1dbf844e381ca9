"""core/hindsight.py, rule by rule: answers hidden by default (no gold-answer leak), identical attempts merged,
correct attempts first, the cap drops whole attempts from the end (wrong ones first), never half a line."""

from nemo_sdsearch.core.hindsight import AttemptSummary, HindsightConfig, hindsight_block

GOLD = "Talen Moravik"
RIGHT = AttemptSummary(("Velora Works founder",), True, GOLD)
WRONG = AttemptSummary(("Velora Works headquarters",), False, "Oskar")
SILENT = AttemptSummary((), False, None)


def lines(block: str) -> list[str]:
    return block.splitlines()


def test_answers_and_the_gold_answer_are_hidden_by_default():
    block = hindsight_block([WRONG, RIGHT, RIGHT], gold_answer=GOLD)
    assert GOLD not in block and "Oskar" not in block and "answered" not in block
    assert lines(block) == ["Hindsight from 3 attempts at this question:",
                            'Attempt 1 (correct, x2): search "Velora Works founder"',
                            'Attempt 2 (wrong): search "Velora Works headquarters"']
    shown = hindsight_block([WRONG, RIGHT], HindsightConfig(include_answers=True), gold_answer=GOLD)
    assert f'answered "{GOLD}"' in shown and 'answered "Oskar"' in shown and "The correct answer" not in shown
    gold = hindsight_block([WRONG], HindsightConfig(include_gold=True), gold_answer=GOLD)
    assert lines(gold)[-1] == f'The correct answer is "{GOLD}".'
    assert "correct answer" not in hindsight_block([WRONG], HindsightConfig(include_gold=True))  # none given


def test_identical_attempts_merge_with_a_count_and_answers_only_split_them_when_shown():
    other_answer = AttemptSummary(WRONG.queries, False, "Brenna")
    merged = hindsight_block([WRONG, other_answer, WRONG])
    assert lines(merged)[1:] == ['Attempt 1 (wrong, x3): search "Velora Works headquarters"']
    split = hindsight_block([WRONG, other_answer, WRONG], HindsightConfig(include_answers=True))
    assert lines(split)[1:] == ['Attempt 1 (wrong, x2): search "Velora Works headquarters" ; answered "Oskar"',
                                'Attempt 2 (wrong): search "Velora Works headquarters" ; answered "Brenna"']
    # the same queries with another outcome are another attempt
    flipped = AttemptSummary(WRONG.queries, True, GOLD)
    assert len(lines(hindsight_block([WRONG, flipped]))) == 3


def test_correct_attempts_come_first_then_group_order():
    second_right = AttemptSummary(("Talen Moravik birthplace", "Velora Works founder"), True, GOLD)
    block = hindsight_block([WRONG, SILENT, RIGHT, second_right])
    assert lines(block)[1:] == ['Attempt 1 (correct): search "Velora Works founder"',
                                'Attempt 2 (correct): search "Talen Moravik birthplace" ; search "Velora Works founder"',
                                'Attempt 3 (wrong): search "Velora Works headquarters"',
                                "Attempt 4 (wrong): no search"]
    assert lines(block)[0] == "Hindsight from 4 attempts at this question:"  # every attempt counted


def test_the_cap_drops_whole_attempts_from_the_end_wrong_ones_first():
    attempts = [WRONG, SILENT, RIGHT]
    full = hindsight_block(attempts, HindsightConfig(max_tokens=10_000))
    count = lambda s: len(s)  # characters, so the cap falls between lines
    for cap in range(len(lines(full)[0]), len(full) + 1):
        block = hindsight_block(attempts, HindsightConfig(max_tokens=cap), count_tokens=count)
        assert count(block) <= cap
        assert lines(full)[:len(lines(block))] == lines(block)  # a prefix of whole lines: nothing cut in half
        if len(lines(block)) > 1:
            assert "(correct" in lines(block)[1]  # the correct attempt is the last to go
    # under the header's own length only the header is left
    assert hindsight_block(attempts, HindsightConfig(max_tokens=1)) == lines(full)[0]
    # the gold footer, when asked for, survives the cap: attempts are dropped before it
    with_gold = hindsight_block(attempts, HindsightConfig(max_tokens=12, include_gold=True), gold_answer=GOLD)
    assert lines(with_gold)[-1] == f'The correct answer is "{GOLD}".'


def test_group_blocks_one_per_question_with_its_first_gold_answer():
    """`sd_search.group_hindsight_blocks`: one block per group of G rollouts, from that group's own attempts; with
    include_gold the footer names the question's first gold answer (the others are aliases)."""
    from types import SimpleNamespace

    from nemo_sdsearch.algorithms.sd_search import group_hindsight_blocks

    def traj(queries, em, gold):
        return SimpleNamespace(queries=list(queries), exact_match=em, answer=None, golden_answers=gold)

    trajs = [traj(["a b"], 1.0, ["alma", "alma smith"]), traj(["c"], 0.0, ["alma", "alma smith"]),
             traj(["d e"], 0.0, ["tarn"]), traj(["d e"], 0.0, ["tarn"])]
    sd = SimpleNamespace(include_answers=False, include_gold=True, max_hindsight_tokens=256)
    blocks = group_hindsight_blocks(trajs, 2, sd, lambda s: len(s.split()))
    assert len(blocks) == 2
    assert lines(blocks[0])[-1] == 'The correct answer is "alma".' and "a b" in blocks[0] and "d e" not in blocks[0]
    assert lines(blocks[1])[-1] == 'The correct answer is "tarn".' and "d e" in blocks[1] and "a b" not in blocks[1]
