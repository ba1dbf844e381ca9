"""Fidelity at Qwen scale, checked on CPU: fp32 master weights, runs that never reuse an old run's files,
chat-templated prompts whose teacher/student positions line up, and Search-E1's teacher context and loss
normalisation as the paper has them."""

import copy

import pytest
import torch

from nemo_sdsearch.config import ConfigError, load_config
from nemo_sdsearch.core.prompts import PromptFormat, prompt_format
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.core.trajectory import Trajectory

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------------
# 1. fp32 master weights
# ---------------------------------------------------------------------------------------------------
def test_training_load_for_cuda_keeps_fp32_parameters(monkeypatch):
    """The CUDA load path, run on CPU: the device move is the only thing not executed (no GPU here);
    the dtype decision and the actor are the real ones."""
    from nemo_sdsearch.models.hf import HFActor, default_dtype, load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_model_dir

    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            moved.append(str(args[0]))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    model, _ = load_model_and_tokenizer(default_model_dir(), device="cuda", training=True)
    assert moved == ["cuda"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    actor = HFActor(model, lr=1e-6, device="cuda")
    assert actor.autocast  # bf16 speed through autocast, not through bf16 weights
    assert all(g["params"][0].dtype == torch.float32 for g in actor.optimizer.param_groups)
    # an inference-only copy on CUDA is bf16, and an actor refuses to train it
    assert default_dtype("cuda", training=False) == torch.bfloat16
    inference, _ = load_model_and_tokenizer(default_model_dir(), device="cuda")
    assert {p.dtype for p in inference.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="training=True"):
        HFActor(inference, lr=1e-6, device="cuda")


def test_update_at_lr_1e6_moves_every_trained_weight(micro_model):
    """At the papers' lr, AdamW's first step moves each weight by about lr * sign(grad): every fp32 weight
    with a gradient moves; the same step on bf16 weights loses almost all of them (the defect)."""
    from nemo_sdsearch.models.base import SequenceBatch
    from nemo_sdsearch.models.hf import HFActor

    model = copy.deepcopy(micro_model)
    batch = SequenceBatch.from_lists([list(range(5, 60)), list(range(70, 110))], pad_id=1)
    rows, cols = batch.attention_mask.nonzero(as_tuple=True)
    keep = cols > 0
    rows, cols = rows[keep], cols[keep]
    target = batch.input_ids[rows, cols]

    def loss_of(m):
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows, cols - 1]
        return torch.nn.functional.cross_entropy(logits.float(), target)

    probe = copy.deepcopy(model)
    loss_of(probe).backward()
    grads = {n: p.grad.clone() for n, p in probe.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    actor = HFActor(model, lr=1e-6, grad_clip=1e9)
    actor.train_step(lambda i: loss_of(model), 1)
    n_with_grad = n_moved = 0
    for n, p in model.named_parameters():
        has = grads[n].abs() > 1e-8  # above Adam's eps: the step is ~lr * sign(grad)
        moved = p.detach() != before[n]
        n_with_grad += int(has.sum())
        n_moved += int((moved & has).sum())
        assert bool(moved[has].all()), f"{n}: {int((~moved & has).sum())} weights with a gradient did not move"
    assert n_with_grad > 0.5 * sum(p.numel() for p in model.parameters())
    assert n_moved == n_with_grad

    # The same AdamW step on bf16 weights (the old CUDA path): most updates round away.
    bf16 = copy.deepcopy(micro_model).to(torch.bfloat16)
    opt = torch.optim.AdamW(bf16.parameters(), lr=1e-6, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in bf16.named_parameters()}
    loss_of(bf16).backward()
    opt.step()
    moved = sum(int((p.detach() != start[n]).sum()) for n, p in bf16.named_parameters())
    assert moved < 0.2 * n_with_grad


def test_bf16_parameters_are_refused_by_the_torch_optimizer_paths():
    from nemo_sdsearch.models.base import require_fp32_params

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 master weights.*bfloat16.*weight"):
        require_fp32_params(model.named_parameters(), "X", "load it in fp32")
    model.requires_grad_(False)  # frozen copies (the reference, a generator) may be bf16
    require_fp32_params(model.named_parameters(), "X", "load it in fp32")


def test_merged_lora_keeps_a_small_delta_in_fp32(micro_model):
    """Search-E1 merges its adapter into fp32 weights: a delta far below a bf16 ulp survives."""
    from nemo_sdsearch.algorithms.search_e1 import add_lora

    base = copy.deepcopy(micro_model)
    peft_model = add_lora(copy.deepcopy(micro_model), load_config("tiny_cpu", ["search_e1.lora_r=4"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(1e-6)
    merged = peft_model.merge_and_unload()
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach()
    w1 = merged.model.layers[0].self_attn.q_proj.weight.detach()
    assert w1.dtype == torch.float32
    delta = (w1 - w0).abs()
    assert float(delta.min()) > 0  # every element moved
    # in bf16 the same merge would keep almost nothing of it
    bf16_delta = (w1.to(torch.bfloat16).float() - w0.to(torch.bfloat16).float()).abs()
    assert float((bf16_delta > 0).float().mean()) < 0.2


# ---------------------------------------------------------------------------------------------------
# 2. A new run never reuses an old run's files
# ---------------------------------------------------------------------------------------------------
def _tiny(model_dir, out_dir, **extra):
    base = {"model.path": str(model_dir), "model.threads": 1, "trainer.steps": 1, "trainer.questions_per_step": 2,
            "rollout.group_size": 2, "rollout.max_new_tokens": 12, "rollout.max_turns": 1,
            "rollout.max_context": 512, "trainer.eval_every": 0, "trainer.save_every": 1,
            "trainer.final_test_eval": False, "trainer.out_dir": str(out_dir), "grpo.micro_batch_size": 2,
            "data.dev_questions": 2, "search_e1.cycles": 1, "search_e1.grpo_steps": 1, "search_e1.pool_questions": 2,
            "search_e1.pool_samples": 2, "search_e1.opsd_steps": 1, "search_e1.opsd_eval_every": 0}
    base.update(extra)
    return load_config("tiny_cpu", [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("algorithm", ["sd_search", "search_e1", "ablate"])
def test_a_new_run_refuses_a_directory_holding_a_run(micro_model_dir, tmp_path, algorithm):
    from nemo_sdsearch.algorithms import ablation, grpo, search_e1

    out = tmp_path / "run"
    (out / "cycle_0" / "pool").mkdir(parents=True)
    (out / "cycle_0" / "pool" / "pool.jsonl").write_text('{"question_id": "old"}\n')
    (out / "config.json").write_text("{}")
    before = sorted(str(p) for p in out.rglob("*"))
    cfg = _tiny(micro_model_dir[0], out, algorithm="search_e1" if algorithm == "ablate" else algorithm)
    call = {"sd_search": lambda: grpo.train(cfg, progress=False),
            "search_e1": lambda: search_e1.run(cfg, progress=False),
            "ablate": lambda: ablation.run_ablation(cfg, [0], out, tmp_path / "results.md", "x")}[algorithm]
    with pytest.raises(ConfigError, match=r"trainer\.resume=true.*trainer\.overwrite=true"):
        call()
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing written, nothing deleted
    assert (out / "config.json").read_text() == "{}"


def test_overwrite_starts_clean_and_resume_continues(micro_model_dir, tmp_path):
    from nemo_sdsearch.algorithms import grpo

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "old": true}\n')
    (out / "stale.txt").write_text("from an earlier run")
    grpo.train(_tiny(micro_model_dir[0], out, **{"trainer.overwrite": True}), progress=False)
    assert not (out / "stale.txt").exists()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"old"' not in rows[0]
    # resume continues the run that is there
    summary = grpo.train(_tiny(micro_model_dir[0], out, **{"trainer.steps": 2, "trainer.resume": True}), progress=False)
    assert [r["step"] for r in summary["history"]] == [1, 2]
    with pytest.raises(ConfigError, match="trainer.overwrite"):
        _tiny(micro_model_dir[0], out, **{"trainer.resume": True, "trainer.overwrite": True})


def test_cli_names_the_key_for_a_used_directory(tmp_path, capsys):
    from nemo_sdsearch.cli import main

    (tmp_path / "old.txt").write_text("x")
    assert main(["train", f"trainer.out_dir={tmp_path}", "trainer.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "trainer.resume" in err and str(tmp_path) in err


# ---------------------------------------------------------------------------------------------------
# 4. Chat templates: student and teacher prompts, positions that line up
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def _trajectory(tok, fmt, question="Who founded Velora Works?"):
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    t = Trajectory.start("q1", question, ["Talen Moravik"], enc(fmt.student(question)))
    for text in ("<think> I need the founder. </think>\n<search> Velora Works founder </search>",):
        ids = enc(text)
        t.add_policy(ids, [0.0] * len(ids), tok.decode)
    t.add_environment(enc("\n\n<information>Doc 1(Title: Velora Works) founded by Talen Moravik</information>\n\n"),
                      SpanType.INFORMATION)
    ids = enc("<think> found it </think>\n<answer> Talen Moravik </answer>")
    t.add_policy(ids, [0.0] * len(ids), tok.decode)
    t.finalize()
    return t


def test_chat_template_wraps_student_and_teacher_in_one_user_turn(chat_tokenizer):
    fmt = prompt_format(chat_tokenizer, "default", "auto")
    student = fmt.student("Who founded Velora Works?")
    teacher = fmt.teacher("Who founded Velora Works?", "Hindsight from 2 attempts at this question:\nAttempt 1")
    assert student.startswith("<|im_start|>user\n") and student.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert teacher.endswith("<|im_start|>assistant\n") and teacher.count("<|im_start|>user") == 1
    user_turn = teacher[:teacher.index("<|im_end|>")]
    assert "Hindsight from 2 attempts" in user_turn  # the block is inside the user turn
    assert PromptFormat().student("Q?") == prompt_format(chat_tokenizer, "default", "none").student("Q?")
    # the tiny tokenizer has no template: auto is raw text, so the embedded default is unchanged
    from transformers import AutoTokenizer

    from nemo_sdsearch.world.assets import default_model_dir

    assert prompt_format(AutoTokenizer.from_pretrained(default_model_dir()), "default", "auto").chat is None
    r1 = prompt_format(chat_tokenizer, "search_r1", "none").student("who wrote it")
    assert r1.startswith("Answer the given question. You must conduct reasoning") and \
        r1.endswith("For example, <answer> Beijing </answer>. Question: who wrote it?\n")


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_sd_search_teacher_positions_line_up_under_a_chat_template(chat_tokenizer, micro_model, chat_template):
    from nemo_sdsearch.algorithms.sd_search import teacher_sequences
    from nemo_sdsearch.models.base import SequenceBatch
    from nemo_sdsearch.models.hf import HFActor

    tok = chat_tokenizer
    model = copy.deepcopy(micro_model)
    model.resize_token_embeddings(len(tok))
    fmt = prompt_format(tok, "default", chat_template)
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    trajs = [_trajectory(tok, fmt), _trajectory(tok, fmt)]
    block = "Hindsight from 2 attempts at this question:\nAttempt 1 (correct, x2): search \"Velora Works founder\""
    seqs = teacher_sequences(trajs, [block] * len(trajs), lambda q, b: enc(fmt.teacher(q, b)))
    for t, s in zip(trajs, seqs):
        prompt_t = enc(fmt.teacher(t.question, block))
        assert s.shift == len(prompt_t) - t.prompt_length > 0
        if chat_template == "auto":  # both prompts end with the same assistant header
            header = enc("<|im_start|>assistant\n")
            assert t.token_ids[t.prompt_length - len(header):t.prompt_length] == header == prompt_t[-len(header):]
        query = [j for j, q in enumerate(t.query_mask()) if q]
        assert query and all(s.token_ids[j + s.shift] == t.token_ids[j] for j in query)
        # every response token up to the last query token has its twin at j + shift
        assert s.token_ids[len(prompt_t):] == t.token_ids[t.prompt_length:max(query) + 1]
    # The teacher pass at the shifted positions is the model's prediction of the same query tokens.
    actor = HFActor(model, lr=1e-6)
    rows = torch.tensor([0] * len(query))
    cols = torch.tensor(query)
    tb = SequenceBatch.from_lists([seqs[0].token_ids], tok.pad_token_id)
    t_logits = actor.teacher_logits_at(tb, rows, cols + seqs[0].shift)
    with torch.no_grad():
        full = model(torch.tensor([seqs[0].token_ids])).logits[0]
    assert torch.allclose(t_logits, full[cols + seqs[0].shift - 1], atol=1e-5)
    assert [seqs[0].token_ids[c + seqs[0].shift] for c in query] == [trajs[0].token_ids[c] for c in query]


def test_search_e1_teacher_positions_line_up_under_a_chat_template(chat_tokenizer):
    from nemo_sdsearch.algorithms.search_e1 import opsd_items
    from nemo_sdsearch.core.pairs import Pair

    tok = chat_tokenizer
    fmt = prompt_format(tok, "search_r1", "auto")
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    ref, stu = _trajectory(tok, fmt), _trajectory(tok, fmt)
    e1 = load_config("tiny_cpu").search_e1
    [(s_ids, t_ids, shift, mask)] = opsd_items([[ref, stu]], [Pair(0, 0, 1, True, 3)],
                                               lambda ids: tok.decode(ids, skip_special_tokens=False),
                                               lambda q, b: enc(fmt.teacher(q, b)), e1)
    assert s_ids == stu.token_ids and mask == stu.policy_mask()
    assert t_ids[shift + stu.prompt_length:] == stu.response_ids()
    policy = [j for j, m in enumerate(mask) if m]
    assert all(t_ids[j + shift] == s_ids[j] for j in policy)
    teacher_text = tok.decode(t_ids[:shift + stu.prompt_length], skip_special_tokens=False)
    user_turn = teacher_text[:teacher_text.index("<|im_end|>")]
    # the reference (with its passages, the paper's default) and the own-words instruction are in the user turn
    assert "A correct solution to this question" in user_turn and "founded by Talen Moravik" in user_turn
    assert "in your own words" in user_turn
    assert teacher_text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------
# 5. Search-E1's teacher context, pair-mining tie-break and loss normalisation
# ---------------------------------------------------------------------------------------------------
def test_reference_truncates_passages_first_never_the_answer(char_tokenizer):
    from nemo_sdsearch.algorithms.search_e1 import reference_text

    tok = char_tokenizer
    t = Trajectory.start("q", "Q", ["a"], tok.encode("P"))
    t.add_policy(tok.encode("<search>x</search>"), [0.0] * 18, tok.decode)
    t.add_environment(tok.encode("<information>" + "d" * 300 + "</information>"))
    t.add_policy(tok.encode("<search>y</search>"), [0.0] * 18, tok.decode)
    t.add_environment(tok.encode("<information>" + "e" * 40 + "</information>"))
    t.add_policy(tok.encode("<answer>the answer</answer>"), [0.0] * 27, tok.decode)
    full = reference_text(t, tok.decode, True, 10_000)
    assert "d" * 300 in full and "e" * 40 in full
    cut = reference_text(t, tok.decode, True, 220)  # 63 policy tokens; 157 for 327 + 67 passage tokens
    assert "<answer>the answer</answer>" in cut and "<search>x</search>" in cut and "<search>y</search>" in cut
    assert "e" * 40 in cut            # the short block keeps all it has
    assert "d" * 300 not in cut and "d" * 40 in cut  # the long one gives up what the budget lacks
    assert cut.count("</information>") == 2  # truncated blocks stay closed
    # policy tokens alone over the cap: the head of the reasoning goes, the answer stays
    tight = reference_text(t, tok.decode, True, 40)
    assert "<answer>the answer</answer>" in tight and "<search>x</search>" not in tight
    assert "<information>" not in tight and "ddd" not in tight
    without = reference_text(t, tok.decode, False, 10_000)
    assert "<information>" not in without and "ddd" not in without
    assert "<search>x</search><search>y</search><answer>the answer</answer>" in without


def test_pair_mining_tie_break_counts_policy_tokens(char_tokenizer):
    from nemo_sdsearch.algorithms.search_e1 import pool_records
    from nemo_sdsearch.core.pairs import mine_pairs

    tok = char_tokenizer

    def rollout(info_len, think_len, answer):
        t = Trajectory.start("q", "Q", ["yes"], tok.encode("P"))
        text = "<think>" + "t" * think_len + "</think><search>x</search>"
        t.add_policy(tok.encode(text), [0.0] * len(text), tok.decode)
        t.add_environment(tok.encode("<information>" + "i" * info_len + "</information>"))
        text = f"<answer>{answer}</answer>"
        t.add_policy(tok.encode(text), [0.0] * len(text), tok.decode)
        t.finalize()
        return t

    # both correct with one search; the first is longer in total (passages), shorter in its own tokens
    group = [rollout(500, 2, "yes"), rollout(10, 30, "yes"), rollout(10, 5, "no")]
    records = pool_records(group)
    assert records[0].length < records[1].length
    pairs, _ = mine_pairs([records])
    assert pairs[0].reference == 0


def test_opsd_loss_is_a_mean_over_pairs_of_per_trajectory_means():
    from nemo_sdsearch.algorithms.opsd import opsd_weights

    masks = [[False, True, True, True, True], [False, False, True]]  # 4 and 1 scored positions
    w = opsd_weights(masks, "trajectory", n_pairs=2, n_positions=5)
    assert torch.allclose(w, torch.tensor([1 / 8] * 4 + [1 / 2]))
    terms = torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0])
    assert float((terms * w).sum()) == pytest.approx((1.0 + 9.0) / 2)  # each pair counts once
    tok = opsd_weights(masks, "token", n_pairs=2, n_positions=5)
    assert float((terms * tok).sum()) == pytest.approx(13.0 / 5)
    # micro-batches of one step: weights over the step's pairs, so the sum over micro-batches is the mean
    a = opsd_weights(masks[:1], "trajectory", n_pairs=2, n_positions=5)
    b = opsd_weights(masks[1:], "trajectory", n_pairs=2, n_positions=5)
    assert torch.allclose(torch.cat([a, b]), w)


def test_every_recipe_states_its_em_and_chat_template():
    from nemo_sdsearch.config import config_dir

    e1 = load_config("tiny_cpu").search_e1
    assert e1.reference_information and e1.loss_normalization == "trajectory"
    recipes = sorted(config_dir().glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        text = path.read_text()
        assert "\n  normalization: squad" in text and "\n  chat_template: auto" in text, path.name
