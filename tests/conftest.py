import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundle():
    from nemo_sdsearch.world.generator import build_bundle

    return build_bundle(n_train=300, n_dev=20, n_test=60)


@pytest.fixture(scope="session")
def tokenizer(bundle):
    """A project tokenizer trained on the small bundle (tags are single tokens)."""
    from nemo_sdsearch.core.prompts import INSTRUCTION
    from nemo_sdsearch.world.tokenizer import train_tokenizer

    texts = [p["contents"] for p in bundle.train_world.passages] + [q.question for q in bundle.train] + [INSTRUCTION] * 20
    return train_tokenizer(texts, vocab_size=768)


# Session fixtures that hold a model are shared by every test after the one that first asks for them: they are
# read-only (a test that trains one trains a copy: copy.deepcopy(micro_model)). Each registers a check here, and
# `_shared_models_unchanged` runs the checks after every test: a test that changed one fails (at teardown, named),
# and the fixture is put back as it was where it can be (weights, flags, files), so the tests after it see what
# they expect; where it cannot (modules replaced in place), every later test that uses it fails naming the culprit.
_SHARED_CHECKS: dict = {}  # fixture name -> check(): (the changes found, whether they were put right)
_SHARED_BROKEN: dict = {}  # fixture name -> the test that changed it beyond repair


@pytest.fixture(autouse=True)
def _shared_models_unchanged(request):
    yield
    found = []
    for name, check in list(_SHARED_CHECKS.items()):
        if name in _SHARED_BROKEN:
            if name in request.fixturenames:
                found.append(f"`{name}` was changed beyond repair by {_SHARED_BROKEN[name]}")
            continue
        problems, repaired = check()
        if problems:
            found.append(f"this test changed the session fixture `{name}` in place ({'; '.join(problems)})")
            if not repaired:
                _SHARED_BROKEN[name] = request.node.nodeid
    if found:
        pytest.fail("; ".join(found) + ": every later test shares it, change a copy (copy.deepcopy) instead",
                    pytrace=False)


@pytest.fixture(scope="session")
def micro_model(tokenizer):
    """A tiny random Qwen2 (eval mode), shared by the session: read-only (see `_SHARED_CHECKS`)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.world.model_config import qwen2_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config("micro", len(tokenizer), tokenizer.eos_token_id,
                                          tokenizer.pad_token_id)).eval()
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def check() -> tuple[list[str], bool]:
        state = model.state_dict()
        if set(state) != set(pristine):
            return [f"its modules were replaced ({sorted(set(state) ^ set(pristine))[0]} ...)"], False
        problems = []
        if changed := [k for k, v in state.items() if not torch.equal(v, pristine[k])]:
            problems.append(f"{len(changed)} weights changed ({changed[0]} ...)")
        if model.training:
            problems.append("left in train mode")
        if {n: p.requires_grad for n, p in model.named_parameters()} != flags:
            problems.append("requires_grad changed")
        if any(p.grad is not None for p in model.parameters()):
            problems.append("left holding gradients")
        if problems:  # put it back for the tests after this one
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(pristine[k])
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
            model.eval()
        return problems, True

    _SHARED_CHECKS["micro_model"] = check
    return model


class CharTokenizer:
    """A tokenizer with one token per character: lets tests split tags at any point."""

    eos_token_id = 0
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """A micro model saved by the real warm-start trainer (3 steps), with its project tokenizer; read-only (see
    `_SHARED_CHECKS`): a run writes to its own trainer.out_dir, never here."""
    from nemo_sdsearch.world.warmstart import WarmstartConfig, run_warmstart

    out = tmp_path_factory.mktemp("ws") / "model"
    cfg = WarmstartConfig(out=str(out), model="micro", vocab_size=768, max_steps=3, batch_size=4,
                          max_questions=48, warmup_steps=1, threads=1)
    record = run_warmstart(cfg, progress=False)
    stats = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}
    pristine, contents = stats(), {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def check() -> tuple[list[str], bool]:
        now = stats()
        changed = sorted(str(p.relative_to(out)) for p in set(now) | set(pristine) if now.get(p) != pristine.get(p))
        if not changed:
            return [], True
        for p in set(now) - set(contents):  # put it back: its own files, nothing else
            p.unlink()
        for p, data in contents.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        pristine.clear()
        pristine.update(stats())
        return [f"files written in it: {', '.join(changed)}"], True

    _SHARED_CHECKS["micro_model_dir"] = check
    return out, record, cfg
