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


def _group_trajs():
    """Three questions x G = 3 rollouts, every rollout with queries of its own (q<question><member>)."""
    from types import SimpleNamespace

    out = []
    for g, gold in enumerate(["alma", "tarn", "oskar"]):
        for m in range(3):
            out.append(SimpleNamespace(queries=[f"q{g}{m} first", f"q{g}{m} second"], exact_match=float(m == 1),
                                       answer=None, golden_answers=[gold], question=f"question {g}",
                                       token_ids=[0, 1, 2], prompt_length=2, query_mask=lambda: [False, False, True]))
    return out


def _sd(members="group", source="own", include_gold=False):
    from types import SimpleNamespace

    return SimpleNamespace(include_answers=False, include_gold=include_gold, max_hindsight_tokens=256,
                           hindsight_members=members, hindsight_source=source)


def _teacher_prompts(trajs, blocks):
    """The teacher prompt text of each trajectory, through teacher_sequences (a byte tokenizer)."""
    from nemo_sdsearch.algorithms.sd_search import teacher_sequences

    prompt = lambda q, b: f"{q}\n{b}\n"  # noqa: E731
    seqs = teacher_sequences(trajs, blocks, lambda q, b: list(prompt(q, b).encode()))
    return [bytes(s.token_ids[:s.shift + t.prompt_length]).decode() for s, t in zip(seqs, trajs)]


def test_hindsight_members_group_lists_every_attempt_and_others_leaves_the_rollouts_own_out():
    """sd.hindsight_members: `group` (the default) gives every rollout of a question the same block, its own
    attempt included; `others` gives rollout i the block of the other G - 1 attempts: its teacher prompt holds
    none of its own queries and every query of its siblings."""
    from nemo_sdsearch.algorithms.sd_search import group_hindsight_blocks, rollout_hindsight_blocks

    trajs = _group_trajs()
    count = lambda s: len(s.split())  # noqa: E731
    group = rollout_hindsight_blocks(trajs, 3, _sd("group"), count)
    per_group = group_hindsight_blocks(trajs, 3, _sd("group"), count)
    assert group == [per_group[i // 3] for i in range(9)]
    for i, text in enumerate(_teacher_prompts(trajs, group)):
        g = i // 3
        assert all(f'"q{g}{m} first"' in text for m in range(3)) and "Hindsight from 3 attempts" in text
    others = rollout_hindsight_blocks(trajs, 3, _sd("others", include_gold=True), count)
    for i, text in enumerate(_teacher_prompts(trajs, others)):
        g, me = divmod(i, 3)
        assert f"q{g}{me}" not in text, (i, text)                               # none of its own queries
        assert all(f'"q{g}{m} first" ; search "q{g}{m} second"' in text for m in range(3) if m != me)
        assert not any(f"q{h}" in text for h in range(3) if h != g)             # nothing of another question
        assert "Hindsight from 2 attempts" in text and text.startswith(f"question {g}\n")
        assert lines(text)[-1] == f'The correct answer is "{["alma", "tarn", "oskar"][g]}".'
        # the sibling that is correct (member 1) is listed as such, first
        if me != 1:
            assert lines(text)[2] == f'Attempt 1 (correct): search "q{g}1 first" ; search "q{g}1 second"'


def test_hindsight_source_other_question_is_the_next_questions_block():
    """sd.hindsight_source=other_question (the placebo): the teacher of a rollout reads its own question followed
    by the (whole-group) block of the next question of the batch, cyclically; nothing of its own group's
    attempts. One question alone cannot give a placebo: refused, at config time and at run time."""
    import pytest

    from nemo_sdsearch.algorithms.sd_search import group_hindsight_blocks, rollout_hindsight_blocks
    from nemo_sdsearch.config import ConfigError, load_config

    trajs = _group_trajs()
    count = lambda s: len(s.split())  # noqa: E731
    per_group = group_hindsight_blocks(trajs, 3, _sd(), count)
    for members in ("group", "others"):
        placebo = rollout_hindsight_blocks(trajs, 3, _sd(members, "other_question"), count)
        assert placebo == [per_group[(i // 3 + 1) % 3] for i in range(9)]
        for i, text in enumerate(_teacher_prompts(trajs, placebo)):
            g, other = i // 3, (i // 3 + 1) % 3
            assert text.startswith(f"question {g}\n") and f"q{g}" not in text
            assert all(f'"q{other}{m} first"' in text for m in range(3))
    with pytest.raises(ValueError, match="at least two questions"):
        rollout_hindsight_blocks(trajs[:3], 3, _sd(source="other_question"), count)
    with pytest.raises(ValueError, match="one per trajectory"):
        _teacher_prompts(trajs, per_group)
    with pytest.raises(ConfigError, match="sd.hindsight_source"):
        load_config("tiny_cpu", ["algorithm=sd_search", "sd.hindsight_source=other_question",
                                 "trainer.questions_per_step=1", "grpo.mini_batches=1"])
    with pytest.raises(ConfigError, match="sd.hindsight_members"):
        load_config("tiny_cpu", ["sd.hindsight_members=self"])
    cfg = load_config("tiny_cpu", ["sd.hindsight_members=others", "sd.hindsight_source=other_question"])
    assert (cfg.sd.hindsight_members, cfg.sd.hindsight_source) == ("others", "other_question")


def test_group_order_keeps_positions_and_the_cap_still_drops_wrong_attempts_first():
    """order="group": the attempts in group order, so a position says nothing of an outcome; the cap drops the
    last wrong attempt first, then correct ones from the end."""
    block = hindsight_block([WRONG, SILENT, RIGHT], HindsightConfig(order="group"))
    assert lines(block)[1:] == ['Attempt 1 (wrong): search "Velora Works headquarters"', "Attempt 2 (wrong): no search",
                                'Attempt 3 (correct): search "Velora Works founder"']
    count = lambda s: len(s)
    full = len(block)
    capped = hindsight_block([WRONG, SILENT, RIGHT], HindsightConfig(order="group", max_tokens=full - 1),
                             count_tokens=count)
    assert lines(capped)[1:] == ['Attempt 1 (wrong): search "Velora Works headquarters"',
                                 'Attempt 2 (correct): search "Velora Works founder"']
    only = hindsight_block([WRONG, SILENT, RIGHT], HindsightConfig(order="group", max_tokens=len(lines(capped)[0]) + 1 + 51),
                           count_tokens=count)
    assert lines(only)[1:] == ['Attempt 1 (correct): search "Velora Works founder"']
    import pytest

    with pytest.raises(ValueError, match="outcome | group"):
        hindsight_block([WRONG], HindsightConfig(order="random"))
