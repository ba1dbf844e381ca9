"""`sdsearch convert` from the checkpoints of the trainers users train with (Megatron-LM, Megatron-Bridge,
NeMo-RL), `--tokenizer`, the `.[megatron]` error of `--to nemo`, and the source's EOS list.

Fixtures, written at test time (one in-process single-rank gloo group):

* the weights: a megatron-core `GPTModel` (Qwen2 architecture of `tests/fixtures/nemo`, fp32, QKV bias,
  untied) built and filled by `independent.py` (parameters set by megatron NAME from a seeded generator,
  never through this project's HF <-> Megatron mapping); the oracle is megatron's own forward;
* the files: megatron-core's own `dist_checkpointing.save` of the state dict the trainers save
  (`model` = `model.sharded_state_dict()` with no prefix, `optimizer` = the optimizer's sharded state, as
  Megatron-LM's / Megatron-Bridge's `generate_state_dict` build it; Megatron-LM adds `args` (an
  argparse.Namespace, with a torch dtype and a megatron enum as the real ones have), `checkpoint_version`,
  `iteration`). Megatron-LM's `save_checkpoint`, Megatron-Bridge and NeMo-RL do not install here (they
  need megatron/training, CUDA, Ray): the files around the dist checkpoint (tracker, `iter_{:07d}`,
  `run_config.yaml`, `train_state.pt`, `latest_train_state.pt`, `tokenizer/`, NeMo-RL's `step_N/` with
  `config.yaml`, `training_info.json`, `policy/weights/`) are their documented layouts (docs/nemo.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "nemo"))

import independent as ind  # noqa: E402
import nemo_fixtures as fx  # noqa: E402

from nemo_sdsearch.checkpoint.convert import MissingDependency, convert, detect_format  # noqa: E402
from nemo_sdsearch.checkpoint.megatron_lm import TokenizerRequired, load_common  # noqa: E402
from nemo_sdsearch.cli import main  # noqa: E402

ATOL = 1e-5
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"      # what real checkpoints name: not on this machine
EOS_LIST = [151645, 151643]                 # Qwen2.5-Instruct's generation_config.json


def _megatron_lm_args(cfg: dict):
    """`args` as Megatron-LM saves them (argparse.Namespace; names of megatron/training/arguments.py)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], group_query_attention=True,
        num_query_groups=cfg["num_query_groups"], kv_channels=cfg["kv_channels"], add_qkv_bias=True,
        add_bias_linear=False, qk_layernorm=False, swiglu=True, normalization="RMSNorm",
        norm_epsilon=cfg["layernorm_epsilon"], position_embedding_type="rope", rotary_base=int(cfg["rotary_base"]),
        rotary_percent=1.0, use_rope_scaling=False, untie_embeddings_and_output_weights=True,
        max_position_embeddings=cfg["seq_length"], seq_length=cfg["seq_length"], padded_vocab_size=cfg["vocab_size"],
        make_vocab_size_divisible_by=128, num_experts=None, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=HUB_ID, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        params_dtype=torch.float32, attention_backend=AttnBackend.local, ckpt_format="torch_dist",
        init_method_std=cfg["init_method_std"], iteration=7)


def _save(state: dict, out: Path) -> None:
    from megatron.core import dist_checkpointing

    out.mkdir(parents=True)
    dist_checkpointing.save(state, str(out))


def _state(model, optimizer) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    model_sd = model.sharded_state_dict()   # no prefix: Megatron-LM / Bridge `generate_state_dict`
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optim_sd = optimizer.state_dict()
    optim_state_to_sharding_state(optim_sd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",))
    return {"checkpoint_version": 3.0, "model": model_sd, "optimizer": optim_sd,
            "opt_param_scheduler": {"num_steps": 7}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    tmp = tmp_path_factory.mktemp("sources")
    tok = fx.save_hf(fx.make_hf("qwen2", 3), tmp / "tok_src", tokenizer=True)   # the tokenizer files
    tokdir = tmp / "tokenizer"
    tokdir.mkdir()
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok / n, tokdir / n)
    cfg = fx.nemo2_model_yaml("qwen2", tied=False)["config"]
    init_parallel(1)
    try:
        model = ind.build(cfg, tp=1, pp=1)
        ind.randomize(model, tied=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        model(torch.tensor(ind.IDS), torch.arange(9).expand(2, 9), None).float().square().mean().backward()
        optimizer.step()                    # the optimizer state a trainer saves (weights change: re-read them)
        model.eval()
        logits = ind.forward_logits(model)
        # Megatron-LM: root with the tracker, iter_0000007 (and an unfinished iter_0000009 without files)
        mlm = tmp / "mlm"
        _save({**_state(model, optimizer), "args": _megatron_lm_args(cfg), "iteration": 7}, mlm / "iter_0000007")
        (mlm / "iter_0000009").mkdir()
        (mlm / "latest_checkpointed_iteration.txt").write_text("7")
        # Megatron-Bridge: root with latest_train_state.pt + the tracker, iter_0000005 with run_config.yaml,
        # train_state.pt and tokenizer/
        mb = tmp / "bridge"
        it = mb / "iter_0000005"
        _save({**_state(model, optimizer), "iteration": 5}, it)
        model_section = {**cfg, "_target_": "megatron.bridge.models.qwen.qwen_provider.Qwen2ModelProvider",
                         "hf_model_id": HUB_ID}
        run_config = {"_target_": "megatron.bridge.training.config.ConfigContainer", "model": model_section,
                      "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                                    "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": HUB_ID},
                      "checkpoint": {"save": str(mb), "ckpt_format": "torch_dist"}}
        (it / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        train_state = {"step": torch.tensor(5), "consumed_train_samples": torch.tensor(40)}
        torch.save(train_state, it / "train_state.pt")
        torch.save(train_state, mb / "latest_train_state.pt")
        (mb / "latest_checkpointed_iteration.txt").write_text("5")
        shutil.copytree(tokdir, it / "tokenizer")
        # NeMo-RL: step_3/ with config.yaml, training_info.json and policy/weights/ = a Bridge root (its
        # tokenizer named by a hub id in the config, not saved)
        rl = tmp / "results" / "step_3"
        shutil.copytree(mb, rl / "policy" / "weights", ignore=shutil.ignore_patterns("tokenizer"))
        (rl / "config.yaml").write_text(yaml.safe_dump({"policy": {"model_name": HUB_ID, "tokenizer": {"name": HUB_ID},
                                                                   "megatron_cfg": {"enabled": True}}}))
        (rl / "training_info.json").write_text(json.dumps({"step": 3, "consumed_samples": 24}))
    finally:
        teardown_parallel()
    return {"tmp": tmp, "logits": logits, "tokdir": tokdir, "mlm": mlm, "bridge": mb, "rl": rl}


def _hf_logits(d: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ind.IDS)).logits.float()


def _check(made, out: Path) -> dict:
    torch.testing.assert_close(_hf_logits(out), made["logits"], atol=ATOL, rtol=0)
    return json.loads((out / "config.json").read_text())


def test_megatron_lm_root_and_iteration(made, tmp_path, capsys):
    """Megatron-LM's root (the tracker's iteration, not the unfinished newer one) and its iter_N directory
    convert to HF with megatron's logits; without a tokenizer in the checkpoint, --tokenizer is required."""
    root = made["mlm"]
    assert detect_format(root) == "megatron-lm" and detect_format(root / "iter_0000007") == "megatron-lm"
    assert main(["convert", str(root), "--to", "hf", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer DIR" in err and HUB_ID in err
    assert main(["convert", str(root), "--to", "hf", str(tmp_path / "hf"), "--tokenizer", str(made["tokdir"])]) == 0
    cfg = _check(made, tmp_path / "hf")
    assert (cfg["model_type"], cfg["eos_token_id"], cfg["pad_token_id"]) == ("qwen2", 0, 1)   # the tokenizer's
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    convert(root / "iter_0000007", "hf", tmp_path / "hf_iter", tokenizer=made["tokdir"])
    _check(made, tmp_path / "hf_iter")


def test_megatron_bridge_and_nemo_rl(made, tmp_path):
    """A Megatron-Bridge root / iter_N (config from run_config.yaml, tokenizer from iter_N/tokenizer/) and a
    NeMo-RL step directory (its config names a hub tokenizer: --tokenizer needed) convert with megatron's
    logits."""
    assert detect_format(made["bridge"]) == "megatron-bridge" and detect_format(made["rl"]) == "nemo-rl"
    info = convert(made["bridge"], "hf", tmp_path / "b")
    assert info["tokenizer"] and info["from"] == "megatron-bridge"
    assert _check(made, tmp_path / "b")["eos_token_id"] == 0
    convert(made["bridge"] / "iter_0000005", "hf", tmp_path / "b_iter")
    _check(made, tmp_path / "b_iter")
    with pytest.raises(TokenizerRequired, match="--tokenizer"):
        convert(made["rl"], "hf", tmp_path / "rl_none")
    convert(made["rl"], "hf", tmp_path / "rl", tokenizer=made["tokdir"])
    assert _check(made, tmp_path / "rl")["pad_token_id"] == 1


def test_common_pt_is_read_safely(made, tmp_path):
    """common.pt: argparse.Namespace and megatron's enums read (as inert stand-ins); any other object is
    refused with a message, never executed."""
    common = load_common(made["mlm"] / "iter_0000007" / "common.pt")
    assert common["args"].num_layers == 2 and common["iteration"] == 7
    assert "AttnBackend" in repr(common["args"].attention_backend)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    torch.save({"args": argparse.Namespace(num_layers=1), "x": Evil()}, tmp_path / "common.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_common(tmp_path / "common.pt")
    assert (tmp_path / "victim").is_dir()


def _nemo_with_absent_tokenizer(tmp: Path) -> Path:
    """A NeMo 1.x .nemo (unpacked) as NeMo writes it for a HF tokenizer: `tokenizer.type` a hub id, no
    tokenizer artifacts, no ids in the config."""
    hf = fx.save_hf(fx.make_hf("qwen2", 4), tmp / "hf_src", tokenizer=False)
    convert(hf, "nemo", tmp / "x.nemo")
    root = tmp / "x_tree"
    root.mkdir()
    import tarfile

    with tarfile.open(tmp / "x.nemo") as tar:
        tar.extractall(root, filter="data")
    cfg = yaml.safe_load((root / "model_config.yaml").read_text())
    cfg.pop("sdsearch_hf_config")
    cfg["tokenizer"] = fx.nemo1_config("qwen2")["tokenizer"] | {"type": HUB_ID}
    (root / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def test_nemo_tokenizer_flag(tmp_path):
    """A .nemo whose tokenizer is a hub id: a loud warning and no ids without --tokenizer; with it the
    tokenizer files, bos/eos/pad ids from it, and `generate` stops at its EOS."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    src = _nemo_with_absent_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="--tokenizer DIR"):
        convert(src, "hf", tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "config.json").read_text()).get("eos_token_id") is None
    tokdir = fx.save_hf(fx.make_hf("qwen2", 5), tmp_path / "tok", tokenizer=True)
    (tokdir / "generation_config.json").unlink()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["convert", str(src), "--to", "hf", str(tmp_path / "hf"), "--tokenizer", str(tokdir)]) == 0
    assert not [w for w in seen if "--tokenizer" in str(w.message)]   # no warning once the tokenizer is given
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    class ForceEosAt(LogitsProcessor):   # the model emits token 0 (the EOS) as its 3rd new token
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 4 + 2:
                scores[:] = -1e9
                scores[:, 0] = 0
            else:
                scores[:, 0] = -1e9
            return scores

    ids = torch.tensor([[5, 17, 300, 999]])
    for d, stops in (("hf", True), ("bare", False)):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / d)).eval()
        out = model.generate(ids, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([ForceEosAt()]),
                             attention_mask=torch.ones_like(ids))
        assert out.shape[1] == (4 + 3 if stops else 4 + 12), (d, out.shape)


def test_to_nemo_without_megatron_names_the_extra(tmp_path, monkeypatch, capsys):
    hf = fx.save_hf(fx.make_hf("qwen2", 6), tmp_path / "hf", tokenizer=False)
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency, match=r"pip install -c constraints.txt -e '\.\[megatron\]'"):
        convert(hf, "nemo", tmp_path / "x.nemo")
    assert main(["convert", str(hf), "--to", "nemo", str(tmp_path / "y.nemo")]) == 2
    assert "pip install -c constraints.txt -e '.[megatron]'" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists() and not (tmp_path / "y.nemo").exists()


def test_generation_config_keeps_the_eos_list(made, tmp_path):
    """An Instruct model's generation_config.json EOS list survives HF -> HF, HF -> .nemo -> HF,
    HF -> Megatron dir / sdsearch archive -> HF, Megatron-LM -> HF with --tokenizer pointing at the HF model,
    .nemo -> HF with a --tokenizer that has no generation config of its own, and the HF stream writer given
    the source's generation config."""
    from transformers import GenerationConfig

    hf = fx.save_hf(fx.make_hf("qwen2", 7), tmp_path / "hf", tokenizer=True)
    GenerationConfig(bos_token_id=151643, eos_token_id=EOS_LIST, pad_token_id=151643).save_pretrained(str(hf))

    def eos(d: Path):
        return json.loads((d / "generation_config.json").read_text())["eos_token_id"]

    convert(hf, "hf", tmp_path / "a")
    convert(hf, "nemo", tmp_path / "b.nemo")
    convert(tmp_path / "b.nemo", "hf", tmp_path / "b")
    convert(hf, "megatron", tmp_path / "c_meg")
    convert(tmp_path / "c_meg", "hf", tmp_path / "c")
    convert(made["mlm"], "hf", tmp_path / "d", tokenizer=hf)
    convert(tmp_path / "b.nemo", "hf", tmp_path / "e", tokenizer=made["tokdir"])   # a --tokenizer without one
    convert(hf, "sdsearch-archive", tmp_path / "f.tar")
    convert(tmp_path / "f.tar", "hf", tmp_path / "f")
    assert [eos(tmp_path / d) for d in "abcdef"] == [EOS_LIST] * 6
    # the stream writer itself (the trainer's HF export): the given generation config, not the model config's
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.config.eos_token_id == 0
    for i, given in enumerate((hf, {"eos_token_id": EOS_LIST}, GenerationConfig(eos_token_id=EOS_LIST))):
        out = save_hf_checkpoint_from_stream(model.state_dict(), tmp_path / f"w{i}", model.config, generation_config=given)
        assert AutoModelForCausalLM.from_pretrained(str(out)).generation_config.eos_token_id == EOS_LIST
    assert eos(save_hf_checkpoint_from_stream(model.state_dict(), tmp_path / "w", model.config)) == 0
    assert (tmp_path / "e" / "tokenizer.json").read_bytes() == (made["tokdir"] / "tokenizer.json").read_bytes()


def test_training_checkpoint_tokenizer(tmp_path):
    """`convert` of an sdsearch training checkpoint (megatron_step_*) writes the --tokenizer given."""
    from nemo_sdsearch.models.megatron.training_state import save_training_state
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    model = fx.make_hf("qwen2", 8)
    model.config.eos_token_id = model.config.pad_token_id = None   # the ids must come from --tokenizer
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    hf = fx.save_hf(model, tmp_path / "hf", tokenizer=True)
    init_parallel(1)
    try:
        actor = MegatronActor.from_hf(hf)
        save_training_state(tmp_path / "megatron_step_000001", actor, extra={"step": 1})
    finally:
        teardown_parallel()
    assert detect_format(tmp_path / "megatron_step_000001") == "training"
    info = convert(tmp_path / "megatron_step_000001", "hf", tmp_path / "out", tokenizer=hf)
    assert info["tokenizer"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 1


def test_legacy_torch_format_and_strangers_fail_clearly(tmp_path, capsys):
    """A Megatron-LM root whose iteration is in the legacy per-rank 'torch' format names the way out; a
    directory that is no checkpoint is not taken for one."""
    rank = tmp_path / "mlm" / "iter_0000002" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"iteration": 2}, rank / "model_optim_rng.pt")
    (tmp_path / "mlm" / "latest_checkpointed_iteration.txt").write_text("2")
    assert main(["convert", str(tmp_path / "mlm"), "--to", "hf", str(tmp_path / "o")]) == 2
    assert "--ckpt-convert-format torch_dist" in capsys.readouterr().err
    (tmp_path / "other" / "iter_notanumber").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Megatron-LM / Megatron-Bridge checkpoint"):
        detect_format(tmp_path / "other")
