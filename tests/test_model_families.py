"""Qwen3 and Llama-3.x next to Qwen2 (`checkpoint.families`): HF <-> Megatron mapping, the Megatron builder, the
streamed weights, the NeMo readers / writer and `sdsearch convert`.

The models are tiny configs built from transformers' own `Qwen3Config` / `LlamaConfig` with random weights
(scaled up from HF's 0.02 init so that a wrong mapping shows in the numbers):

* `qwen3`: q/k RMSNorm, no QKV bias, an explicit head_dim (32) that is NOT hidden / heads (16), tied
  embeddings (as Qwen3-0.6B..4B);
* `llama3`: Llama 3.1 / 3.2's llama3 RoPE scaling (factor 32; with head_dim 16 and theta 10000 the
  frequencies fall in all three of its regimes: kept, smoothed, divided), untied embeddings.

Logits are compared in fp32 against the HF model at TP=1 (in this process) and TP=2 (one 2-process gloo spawn
for both families); `sdsearch convert` round trips are bit-exact in weights and logits.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("megatron.core")

from _mp import run_workers  # noqa: E402 - tests/ is on sys.path under pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "nemo"))
import nemo_fixtures as fx  # noqa: E402

VOCAB = 300                  # padded to 384 (TP=1) / 512 (TP=2) by Megatron: the padding path is exercised
SEQS = [[5, 17, 2, 250, 33, 8, 91, 140, 7, 66, 12, 299, 45, 3, 180, 21, 9],   # right-padded batch
        [44, 1, 230, 77, 5, 5, 120], [200, 13, 150, 61, 88, 4, 19, 270, 31, 2, 58]]
ATOL = 2e-5                  # fp32, two implementations of the same arithmetic (measured ~2e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def hf_config(name: str):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  eos_token_id=0, pad_token_id=1, bos_token_id=2)
    if name == "qwen3":
        return Qwen3Config(intermediate_size=128, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6,
                           rope_theta=10000.0, max_position_embeddings=512, **common)
    if name == "llama3":
        return LlamaConfig(intermediate_size=96, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=131072, rope_scaling=dict(LLAMA3_ROPE), **common)
    raise KeyError(name)


NAMES = ("qwen3", "llama3")


def make_hf(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    return fx.fill_weights(AutoModelForCausalLM.from_config(hf_config(name)), seed)


def batch():
    from nemo_sdsearch.models.base import SequenceBatch

    return SequenceBatch.from_lists(SEQS, pad_id=1)


def targets(b):
    from nemo_sdsearch.models.base import positions_from_mask

    return positions_from_mask(b.attention_mask.bool())


def hf_logits(model):
    from nemo_sdsearch.models.hf import HFScorer

    b = batch()
    rows, cols = targets(b)
    with torch.no_grad():
        return HFScorer(model).logits_at(b, rows, cols)


def megatron_logits(actor):
    b = batch()
    rows, cols = targets(b)
    with torch.no_grad():
        return actor.full_logits_at(b, rows, cols).detach()


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want), (list(got)[:6], list(want)[:6])
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, bad[:4]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models, dirs = {}, {}
    for name in NAMES:
        m = make_hf(name)
        m.save_pretrained(root / name)
        models[name], dirs[name] = m, str(root / name)
    return models, dirs


# --------------------------------------------------------------------------------------------------
# the mapping, offline
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp,pp,te", [(1, 1, False), (2, 1, False), (2, 2, True)])
def test_hf_megatron_hf_bit_exact(hf_models, name, tp, pp, te):
    from nemo_sdsearch.models.megatron.hf_mapping import hf_to_megatron, megatron_to_hf

    model = hf_models[0][name]
    ref = model.state_dict()
    ranks = hf_to_megatron(ref, model.config, tp=tp, pp=pp, te=te)
    keys = set().union(*ranks)
    assert not any(k.endswith("linear_qkv.bias") for k in keys)       # neither family has a QKV bias
    qn = [k for k in keys if k.endswith("q_layernorm.weight") or k.endswith("k_layernorm.weight")]
    if name == "qwen3":
        assert len(qn) == 2 * 2 // pp                                 # q and k norm of every local layer
        q_norm = ref["model.layers.0.self_attn.q_norm.weight"]
        assert q_norm.shape == (32,)
        for r in range(tp):                                           # replicated on every TP rank
            assert torch.equal(ranks[r]["decoder.layers.0.self_attention.q_layernorm.weight"], q_norm)
        # head_dim 32 != 64 / 4: rank r's QKV rows are its query group's 2 query heads, key and value head
        qkv = ranks[tp - 1]["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert qkv.shape == ((4 + 2 * 2) * 32 // tp, 64)
        k = ref["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(qkv[2 * 32:3 * 32], k[(tp - 1) * (2 // tp) * 32:][:32])
    else:
        assert qn == []
    back = megatron_to_hf(ranks, model.config, pp=pp)
    assert_same_state(back, ref)


def test_builder_config_and_spec_per_family(hf_models):
    from nemo_sdsearch.models.megatron.builder import transformer_config_from_hf

    q = transformer_config_from_hf(hf_models[0]["qwen3"].config)
    assert (q.qk_layernorm, q.add_qkv_bias, q.kv_channels) == (True, False, 32)
    ll = transformer_config_from_hf(hf_models[0]["llama3"].config)
    assert (ll.qk_layernorm, ll.add_qkv_bias, ll.kv_channels) == (False, False, 16)


def test_unsupported_configs_are_refused():
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    from nemo_sdsearch.models.megatron.hf_mapping import hf_to_megatron
    from nemo_sdsearch.models.megatron.builder import check_model, transformer_config_from_hf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    # llama3 fields megatron-core 0.16's GPTModel cannot pass to its RotaryEmbedding: refused by the builder
    odd = LlamaConfig(max_position_embeddings=131072, rope_scaling={**LLAMA3_ROPE, "low_freq_factor": 2.0}, **small)
    with pytest.raises(NotImplementedError, match="only passes the factor"):
        transformer_config_from_hf(odd)
    # ... but its weights still convert (the mapping does not depend on RoPE)
    model = make_hf_from(odd)
    assert len(hf_to_megatron(model.state_dict(), odd)) == 1
    with pytest.raises(NotImplementedError, match="'yarn'"):
        check_model(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 2048}, **small))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        check_model(Qwen3Config(use_sliding_window=True, sliding_window=16, max_window_layers=0, **small))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        check_model(LlamaConfig(attention_bias=True, **small))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        check_model(Qwen3Config(attention_bias=True, **small))
    with pytest.raises(NotImplementedError, match="mlp_bias"):
        check_model(LlamaConfig(mlp_bias=True, **small))
    with pytest.raises(ValueError, match="'mistral'.*qwen2, qwen3, llama"):
        check_model(MistralConfig(**small))


def make_hf_from(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg).eval()


def test_llama3_rope_is_megatrons_and_hfs_frequencies():
    """The builder's RotaryEmbedding has HF's llama3 inverse frequencies, and they differ from the unscaled ones in
    the low-frequency dimensions (the test configuration exercises the scaling)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nemo_sdsearch.models.families import megatron_rope_kwargs

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cfg = hf_config("llama3")
    kw = megatron_rope_kwargs(cfg)
    assert kw == {"rotary_base": 10000.0, "rope_scaling": True, "rope_scaling_factor": 32.0}
    rot = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=kw["rotary_base"], rope_scaling=True,
                          rope_scaling_factor=kw["rope_scaling_factor"], use_cpu_initialization=True)
    hf_inv, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scale == 1.0 and torch.allclose(rot.inv_freq, hf_inv, rtol=1e-6, atol=0)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    wavelen = 2 * math.pi / plain
    assert (wavelen > 8192).any() and ((wavelen > 2048) & (wavelen <= 8192)).any() and (wavelen < 2048).any()
    assert not torch.allclose(rot.inv_freq, plain)


# --------------------------------------------------------------------------------------------------
# TP=1 in this process: the actor's logits and its weight stream
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp1(hf_models):
    warnings.filterwarnings("ignore")
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    init_parallel(1)
    try:
        out = {}
        for name in NAMES:
            actor = MegatronActor.from_hf(hf_models[1][name])
            out[name] = {"logits": megatron_logits(actor), "streamed": list(actor.iter_weights())}
        yield out
    finally:
        teardown_parallel()


@pytest.mark.parametrize("name", NAMES)
def test_tp1_logits_match_hf(tp1, hf_models, name):
    ref = hf_logits(hf_models[0][name])
    got = tp1[name]["logits"]
    assert got.shape == ref.shape == (sum(len(s) - 1 for s in SEQS), VOCAB)
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, diff


@pytest.mark.parametrize("name", NAMES)
def test_tp1_weight_stream_is_the_hf_state_dict(tp1, hf_models, name):
    ref = hf_models[0][name].state_dict()
    want = {k: v for k, v in ref.items() if not (name == "qwen3" and k == "lm_head.weight")}   # tied: left out
    assert_same_state(dict(tp1[name]["streamed"]), want)
    names = [n for n, _ in tp1[name]["streamed"]]
    assert ("model.layers.1.self_attn.k_norm.weight" in names) == (name == "qwen3")


# --------------------------------------------------------------------------------------------------
# TP=2: one 2-process spawn for both families
# --------------------------------------------------------------------------------------------------
def _tp2_worker(rank, world, dirs: dict, mg_dirs: dict):
    warnings.filterwarnings("ignore")
    from nemo_sdsearch.checkpoint.formats import load_megatron_dir
    from nemo_sdsearch.models.megatron.hf_mapping import load_shard, local_weights
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    init_parallel(2)
    res = {}
    for name, d in dirs.items():
        actor = MegatronActor.from_hf(d)
        r = {"logits": megatron_logits(actor), "streamed": list(actor.iter_weights())}
        # the per-rank files `sdsearch convert --to megatron --tp 2` wrote are this rank's live shard
        _, states, layout = load_megatron_dir(mg_dirs[name])
        mine = local_weights(actor.model)
        r["dir_is_live_shard"] = (layout.tp == 2 and sorted(states[rank]) == sorted(mine)
                                  and all(torch.equal(states[rank][k], mine[k]) for k in mine))
        load_shard(actor.model, states[rank])
        r["dir_logits"] = megatron_logits(actor)
        res[name] = r
    teardown_parallel()
    return res


@pytest.fixture(scope="module")
def tp2(hf_models, tmp_path_factory):
    from nemo_sdsearch.cli import main

    out = tmp_path_factory.mktemp("families_tp2")
    mg_dirs = {}
    for name, d in hf_models[1].items():
        mg_dirs[name] = str(out / f"{name}_mg_tp2")
        assert main(["convert", d, "--to", "megatron", mg_dirs[name], "--tp", "2"]) == 0
    return run_workers(_tp2_worker, 2, hf_models[1], mg_dirs, timeout=240), mg_dirs


@pytest.mark.parametrize("name", NAMES)
def test_tp2_logits_match_hf(tp2, hf_models, name):
    ref = hf_logits(hf_models[0][name])
    (r0, r1), _ = tp2
    for r in (r0, r1):
        diff = (r[name]["logits"] - ref).abs().max().item()
        assert diff < ATOL, diff
        assert r[name]["dir_is_live_shard"] and torch.equal(r[name]["dir_logits"], r[name]["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_tp2_weight_stream_is_the_hf_state_dict_on_every_rank(tp2, hf_models, name):
    ref = hf_models[0][name].state_dict()
    want = {k: v for k, v in ref.items() if not (name == "qwen3" and k == "lm_head.weight")}
    (r0, r1), _ = tp2
    for r in (r0, r1):
        assert_same_state(dict(r[name]["streamed"]), want)


# --------------------------------------------------------------------------------------------------
# sdsearch convert round trips
# --------------------------------------------------------------------------------------------------
def _load_and_compare(path, model):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(loaded) is type(model) and loaded.config.model_type == model.config.model_type
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert getattr(loaded.config, "head_dim", None) == getattr(model.config, "head_dim", None)
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert torch.equal(hf_logits(loaded), hf_logits(model))


@pytest.mark.parametrize("name", NAMES)
def test_convert_hf_megatron_tp2_hf(tp2, hf_models, name, tmp_path):
    from nemo_sdsearch.cli import main

    _, mg_dirs = tp2
    assert main(["convert", mg_dirs[name], "--to", "hf", str(tmp_path / "hf")]) == 0
    _load_and_compare(tmp_path / "hf", hf_models[0][name])


@pytest.mark.parametrize("name", NAMES)
def test_convert_hf_nemo_hf(hf_models, name, tmp_path):
    """HF -> NeMo 1.x .nemo (TP=2 recorded) -> HF, and the .nemo's model_config.yaml carries the family the way
    NeMo spells it (qk_layernorm / qkv_bias, llama3 RoPE scaling keys)."""
    import tarfile

    from nemo_sdsearch.checkpoint import nemo_format
    from nemo_sdsearch.cli import main

    nemo = tmp_path / "m.nemo"
    assert main(["convert", hf_models[1][name], "--to", "nemo", str(nemo), "--tp", "2"]) == 0
    with tarfile.open(nemo) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
    assert cfg["qkv_bias"] is False and cfg["qk_layernorm"] is (name == "qwen3") and cfg["bias"] is False
    if name == "qwen3":
        assert cfg["kv_channels"] == 32
        assert cfg.get("scale_positional_embedding") is None
    else:
        assert cfg["scale_positional_embedding"] is True and cfg["scale_factor"] == 32.0
        assert (cfg["low_freq_factor"], cfg["high_freq_factor"], cfg["old_context_len"]) == (1.0, 4.0, 8192)
    cfg.pop(nemo_format.HF_CONFIG_KEY)      # NeMo's own keys alone say which family it is
    assert nemo_format.spec_from_nemo1(cfg).family == ("qwen3" if name == "qwen3" else "llama")
    assert main(["convert", str(nemo), "--to", "hf", str(tmp_path / "hf")]) == 0
    _load_and_compare(tmp_path / "hf", hf_models[0][name])


def test_nemo_configs_keep_qwen3_head_dim_when_it_is_hidden_over_heads():
    """NeMo writes kv_channels: null when head_dim = hidden / heads; Qwen3Config's own default is 128, so the HF
    config made from the NeMo one must name head_dim."""
    from transformers import Qwen3Config

    from nemo_sdsearch.checkpoint import nemo_format

    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    spec = nemo_format.spec_from_hf(cfg)
    yml = nemo_format.nemo1_config(spec, 1, 1, torch.float32, {}, 64)
    assert yml["kv_channels"] is None and yml["qk_layernorm"] is True
    back = nemo_format.hf_config_from_spec(nemo_format.spec_from_nemo1(yml), 64)
    assert back.model_type == "qwen3" and back.head_dim == 16


def _nemo2_dir(path, model, family_target: str, **config):
    """A NeMo 2.0 checkpoint directory of a HF model: context/model.yaml as NeMo dumps a Qwen3Config /
    Llama31Config (the TransformerConfig fields + NeMo's), weights/ a megatron-core dist checkpoint under
    `module.` (NeMo 2.0 has no writer here: the weights go through our HF -> global mapping, written by
    megatron-core's dist_checkpointing)."""
    from nemo_sdsearch.checkpoint import dist_ckpt, nemo_format

    spec = nemo_format.spec_from_hf(model.config)
    yml = fx.nemo2_model_yaml("llama", tied=spec.tied)
    c = yml["config"]
    c.update(num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
             num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
             kv_channels=spec.kv_channels, layernorm_epsilon=spec.layernorm_epsilon, rotary_base=spec.rotary_base,
             vocab_size=spec.vocab_size, seq_length=spec.max_position_embeddings)
    c.update(config)
    c["_target_"] = family_target
    yml["_target_"] = family_target.replace("Config", "Model").replace("Llama31Model", "LlamaModel")
    (path / "context").mkdir(parents=True)
    (path / "context" / "model.yaml").write_text(yaml.safe_dump(yml, sort_keys=False))
    dist_ckpt.save_model(path / "weights", nemo_format.hf_to_global(model.state_dict(), spec), "module.",
                         spec.num_layers)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_nemo2_reader_recognises_the_family(hf_models, name, tmp_path):
    from nemo_sdsearch.checkpoint import nemo_format
    from nemo_sdsearch.cli import main

    model = hf_models[0][name]
    if name == "qwen3":
        src = _nemo2_dir(tmp_path / "n2", model, "nemo.collections.llm.gpt.model.qwen3.Qwen3Config",
                         add_qkv_bias=False, qk_layernorm=True, max_position_embeddings=512)
    else:
        src = _nemo2_dir(tmp_path / "n2", model, "nemo.collections.llm.gpt.model.llama.Llama31Config",
                         scale_factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192)
    ck = nemo_format.read_nemo(src)
    assert ck.info["family"] == ("qwen3" if name == "qwen3" else "llama")
    assert main(["convert", str(src), "--to", "hf", str(tmp_path / "hf")]) == 0
    _load_and_compare(tmp_path / "hf", model)
    # a Qwen3 model.yaml without its q/k norms is refused, not read as Llama
    if name == "qwen3":
        bad = yaml.safe_load((src / "context" / "model.yaml").read_text())
        bad["config"]["qk_layernorm"] = False
        with pytest.raises(NotImplementedError, match="Qwen3 model without qk_layernorm"):
            nemo_format.spec_from_nemo2(bad)
        bad["config"].update(qk_layernorm=True, add_qkv_bias=True)
        with pytest.raises(NotImplementedError, match="together"):
            nemo_format.spec_from_nemo2(bad)
