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


@pytest.fixture(scope="session")
def micro_model(tokenizer):
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.world.model_config import qwen2_config

    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen2_config("micro", len(tokenizer), tokenizer.eos_token_id,
                                         tokenizer.pad_token_id)).eval()


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
    """A micro model saved by the real warm-start trainer (3 steps), with its project tokenizer."""
    from nemo_sdsearch.world.warmstart import WarmstartConfig, run_warmstart

    out = tmp_path_factory.mktemp("ws") / "model"
    cfg = WarmstartConfig(out=str(out), model="micro", vocab_size=768, max_steps=3, batch_size=4,
                          max_questions=48, warmup_steps=1, threads=1)
    record = run_warmstart(cfg, progress=False)
    return out, record, cfg
