"""NeMo's own checkpoint formats through `sdsearch convert` (CPU, one 2-process gloo job for the fixtures).

Fixtures (tests/fixtures/nemo/, PROVENANCE.md): HF Qwen2 (untied, the project tokenizer) and Llama (tied)
models with random weights; live megatron-core GPTModels holding them (Qwen2 at TP=2, Llama at PP=2) write
the weights with megatron's own `dist_checkpointing.save` / `torch.save(state_dict())`, laid out as NeMo 1.x
`.nemo` archives (dist checkpoint and per-rank forms; Llama also unpacked) and NeMo 2.0 directories, with
the model configs NeMo's HF converters build. Every conversion to HF must give the source model's logits.

Those fixtures are filled through the project's own HF -> Megatron mapping, so a misread NeMo layout would
round-trip. The independent set (`independent.py`, same spawn) uses none of it: megatron-core GPTModels built
from NeMo 2.0 model configs as NeMo's `GPTConfig.configure_model` builds them, with megatron's own randomly set
parameters, saved by megatron's own `dist_checkpointing.save` / `state_dict()` under NeMo's prefixes; the
oracle is megatron's own forward (logits), plus a hand-written per-rank QKV / fc1 / row-parallel mapping.
"""

from __future__ import annotations

import copy
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "nemo"))

import independent as ind  # noqa: E402
import nemo_fixtures as fx  # noqa: E402
from _mp import run_workers  # noqa: E402

from nemo_sdsearch.cli import main  # noqa: E402

ATOL = 1e-5
IDS = torch.tensor([[5, 17, 300, 999, 42, 7, 123, 64, 512], [900, 3, 3, 77, 250, 8, 1, 2, 640]])


def _untar(path: Path, out: Path) -> Path:
    with tarfile.open(path) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("nemo")
    models = {"qwen2": fx.make_hf("qwen2", 1), "llama": fx.make_hf("llama", 2)}
    hf = {"qwen2": fx.save_hf(models["qwen2"], tmp / "qwen2_hf", tokenizer=True),
          "llama": fx.save_hf(models["llama"], tmp / "llama_hf", tokenizer=False)}
    # ours: `sdsearch convert --to nemo` (the CLI for Qwen2, the library for Llama)
    ours = {"qwen2": tmp / "ours_qwen2.nemo", "llama": tmp / "ours_llama.nemo"}
    assert main(["convert", str(hf["qwen2"]), "--to", "nemo", str(ours["qwen2"]), "--tp", "2", "--threads", "1"]) == 0
    from nemo_sdsearch.checkpoint.convert import convert

    convert(hf["llama"], "nemo", ours["llama"], pp=2)
    unpacked = {k: _untar(v, tmp / f"{k}_ours_tree") for k, v in ours.items()}
    # one 2-process job: the independent megatron checkpoints first, then the mapped fixtures
    ind_cfgs = {f: fx.nemo2_model_yaml(f, tied=f == "llama")["config"] for f in ("qwen2", "llama")}
    both = run_workers(ind.worker_then, 2, str(tmp / "indep"), ind_cfgs, fx.worker,
                       (str(tmp), {k: str(v) for k, v in hf.items()},
                        {k: str(v / "model_weights") for k, v in unpacked.items()}), timeout=300)
    res = [r["then"] for r in both]
    p = {}
    p["qwen2_dist"] = fx.write_nemo1(tmp / "qwen2_tp2.nemo", fx.nemo1_config("qwen2", tp=2, tokenizer_dir=hf["qwen2"]),
                                     {"model_weights": tmp / "qwen2_tp2" / "model_weights"})
    p["qwen2_legacy"] = fx.write_nemo1(
        tmp / "qwen2_tp2_legacy.nemo", fx.nemo1_config("qwen2", tp=2, tokenizer_dir=hf["qwen2"]),
        {f"mp_rank_{r:02d}/model_weights.ckpt": tmp / "qwen2_tp2_legacy" / f"mp_rank_{r:02d}" / "model_weights.ckpt"
         for r in range(2)})
    p["llama_legacy_dir"] = fx.write_nemo1(
        tmp / "llama_pp2_legacy_unpacked", fx.nemo1_config("llama", pp=2),
        {f"tp_rank_00_pp_rank_{r:03d}/model_weights.ckpt":
         tmp / "llama_pp2_legacy" / f"tp_rank_00_pp_rank_{r:03d}" / "model_weights.ckpt" for r in range(2)}, pack=False)
    p["llama_dist"] = fx.write_nemo1(tmp / "llama_pp2.nemo", fx.nemo1_config("llama", pp=2),
                                     {"model_weights": tmp / "llama_pp2" / "model_weights"})
    p["qwen2_nemo2"] = fx.write_nemo2(tmp / "qwen2_nemo2", "qwen2", False, tmp / "qwen2_tp2_nemo2" / "weights", hf["qwen2"])
    p["llama_nemo2"] = fx.write_nemo2(tmp / "llama_nemo2", "llama", True, tmp / "llama_pp2_nemo2" / "weights", None)
    print(f"\nNeMo fixtures made in {time.perf_counter() - t0:.1f}s")
    return {"tmp": tmp, "models": models, "hf": hf, "ours": ours, "unpacked": unpacked, "paths": p,
            "worker": res, "indep": _independent_sources(tmp / "indep", [r["independent"] for r in both])}


def _independent_sources(d: Path, ranks: list[dict]) -> dict:
    """The NeMo layouts around megatron's own files (`independent.worker`), and megatron's logits."""
    q, ll = d / "qwen2", d / "llama"
    src = {
        "qwen2_nemo1_dist_tp2": fx.write_nemo1(d / "q_dist.nemo", fx.nemo1_config("qwen2", tp=2),
                                               {"model_weights": q / "model_weights"}),
        "qwen2_nemo1_per_rank_tp2": fx.write_nemo1(
            d / "q_rank.nemo", fx.nemo1_config("qwen2", tp=2),
            {f"mp_rank_{r:02d}/model_weights.ckpt": q / f"mp_rank_{r:02d}" / "model_weights.ckpt" for r in range(2)}),
        "qwen2_nemo2_tp2": fx.write_nemo2(d / "q_nemo2", "qwen2", False, q / "weights", None),
        "llama_nemo1_dist_pp2": fx.write_nemo1(d / "l_dist.nemo", fx.nemo1_config("llama", pp=2),
                                               {"model_weights": ll / "model_weights"}),
        "llama_nemo1_per_rank_pp2_dir": fx.write_nemo1(
            d / "l_rank_dir", fx.nemo1_config("llama", pp=2),
            {f"tp_rank_00_pp_rank_{r:03d}/model_weights.ckpt": ll / f"tp_rank_00_pp_rank_{r:03d}" / "model_weights.ckpt"
             for r in range(2)}, pack=False),
        "llama_nemo2_pp2": fx.write_nemo2(d / "l_nemo2", "llama", True, ll / "weights", None),
    }
    return {"src": src, "dir": d,
            "logits": {"qwen2": ranks[0]["qwen2_logits"], "llama": ranks[1]["llama_logits"]},   # last PP stage: 1
            "qwen2_rank1_logits": ranks[1]["qwen2_logits"],
            "qwen2_shards": [r["qwen2_shards"] for r in ranks]}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS % model.config.vocab_size).logits.float()


def _to_hf_and_compare(made, src: Path, family: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    out = tmp / "hf"
    assert main(["convert", str(src), "--to", "hf", str(out), "--threads", "1"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = made["models"][family]
    assert loaded.config.model_type == family
    assert loaded.config.vocab_size == ref.config.vocab_size
    assert loaded.config.tie_word_embeddings == ref.config.tie_word_embeddings
    diff = (_logits(loaded) - _logits(ref)).abs().max().item()
    assert diff <= ATOL, diff
    sd, want = loaded.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in want)  # every step is a copy
    return {"dir": out, "model": loaded}


# --------------------------------------------------------------------------------------------------
# NeMo -> HF
# --------------------------------------------------------------------------------------------------
def test_nemo1_dist_checkpoint_tp2_qwen2_to_hf(made, tmp_path):
    out = _to_hf_and_compare(made, made["paths"]["qwen2_dist"], "qwen2", tmp_path)
    # the tokenizer: NeMo's HF tokenizer section names a directory (tokenizer.type), copied along
    assert (out["dir"] / "tokenizer.json").read_bytes() == (fx.ASSETS / "tokenizer.json").read_bytes()


def test_nemo1_per_rank_tp2_qwen2_to_hf(made, tmp_path):
    """mp_rank_00 / mp_rank_01 model_weights.ckpt, keys model.module.* (megatron_amp_O2 in NeMo's Qwen2
    config), local-spec norm names, _extra_state entries: merged over TP."""
    with tarfile.open(made["paths"]["qwen2_legacy"]) as tar:
        assert "./mp_rank_01/model_weights.ckpt" in tar.getnames() and "./model_config.yaml" in tar.getnames()
        rank1 = torch.load(tar.extractfile("./mp_rank_01/model_weights.ckpt"), weights_only=False)
    assert all(k.startswith(("model.module.decoder.", "model.module.embedding.", "model.module.output_layer."))
               for k in rank1)
    assert any(k.endswith("_extra_state") for k in rank1)
    assert "model.module.decoder.layers.1.input_layernorm.weight" in rank1
    _to_hf_and_compare(made, made["paths"]["qwen2_legacy"], "qwen2", tmp_path)


def test_nemo1_llama_pp2_per_rank_dir_and_dist_to_hf(made, tmp_path):
    """Llama (no qkv bias, tied embeddings) at PP=2: tp_rank_00_pp_rank_00{0,1} files in an unpacked .nemo
    directory (the last stage's copy of the tied embedding dropped), and the dist-checkpoint .nemo."""
    _to_hf_and_compare(made, made["paths"]["llama_legacy_dir"], "llama", tmp_path / "a")
    _to_hf_and_compare(made, made["paths"]["llama_dist"], "llama", tmp_path / "b")


def test_nemo2_directories_to_hf(made, tmp_path):
    out = _to_hf_and_compare(made, made["paths"]["qwen2_nemo2"], "qwen2", tmp_path / "q")
    assert (out["dir"] / "tokenizer.json").read_bytes() == (fx.ASSETS / "tokenizer.json").read_bytes()
    _to_hf_and_compare(made, made["paths"]["llama_nemo2"], "llama", tmp_path / "l")


def test_nemo1_zarr_backend_to_hf(made, tmp_path):
    """The older zarr dist-checkpoint backend (megatron-core no longer writes it: our writer follows its
    layout - one uncompressed zarr v2 array per stacked key, per-layer chunks, bf16 spelled 'bfloat16')."""
    from nemo_sdsearch.checkpoint import dist_ckpt

    src = made["paths"]["qwen2_dist"]
    tree = _untar(src, tmp_path / "tree")
    full = dist_ckpt.load_tensors(tree / "model_weights", dist_ckpt.tensor_shapes(tree / "model_weights"))
    zw = tmp_path / "zarr_weights"
    for key, value in full.items():
        chunks = (1, *value.shape[1:]) if ".layers." in key else None
        dist_ckpt.write_zarr_array(zw / key, value, chunks)
    (zw / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    torch.save({}, zw / "common.pt")
    cfg = yaml.safe_load((tree / "model_config.yaml").read_text())
    z = fx.write_nemo1(tmp_path / "zarr.nemo", cfg, {"model_weights": zw})
    _to_hf_and_compare(made, z, "qwen2", tmp_path)
    # bf16 round trip of the zarr reader itself
    x = torch.randn(3, 5).to(torch.bfloat16)
    dist_ckpt.write_zarr_array(tmp_path / "bf16", x, (2, 5))
    assert torch.equal(dist_ckpt._read_zarr(tmp_path / "bf16"), x)


# --------------------------------------------------------------------------------------------------
# NeMo -> HF against megatron itself (no project mapping in the fixture)
# --------------------------------------------------------------------------------------------------
def _indep_to_hf(made, name: str, out: Path):
    from transformers import AutoModelForCausalLM

    assert main(["convert", str(made["indep"]["src"][name]), "--to", "hf", str(out), "--threads", "1"]) == 0
    return AutoModelForCausalLM.from_pretrained(str(out)).eval()


@pytest.mark.parametrize("name", ["qwen2_nemo1_dist_tp2", "qwen2_nemo1_per_rank_tp2", "qwen2_nemo2_tp2",
                                  "llama_nemo1_dist_pp2", "llama_nemo1_per_rank_pp2_dir", "llama_nemo2_pp2"])
def test_megatron_written_checkpoint_to_hf_gives_megatron_logits(made, tmp_path, name):
    """A megatron-core GPTModel built from NeMo's config, with megatron's own random parameters, saved by
    megatron in NeMo's layout (Qwen2: TP=2, QKV bias, untied; Llama: PP=2, tied) -> `sdsearch convert --to hf`:
    the HF model's fp32 logits are megatron's forward logits on the same tokens."""
    family = name.split("_")[0]
    want = made["indep"]["logits"][family]
    model = _indep_to_hf(made, name, tmp_path / "hf")
    assert model.config.model_type == family
    assert model.config.vocab_size == want.shape[-1]                         # no padding in these configs
    assert model.config.tie_word_embeddings == (family == "llama")
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    got = _logits_of(model, torch.tensor(ind.IDS))
    assert want.std() > 0.3                                                  # logits that tell weights apart
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, diff


def _logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_megatron_per_rank_shards_map_to_hf_by_hand(made, tmp_path):
    """Hand-written oracle, from megatron's per-rank semantics (not our mapping): at TP=2 rank r holds query
    group r; its local linear_qkv rows are [q head 0 of the group, q head 1, k, v] (16 rows each: megatron's
    SelfAttention splits [ng, (np/ng + 2) * hn]); linear_fc1's local rows are [gate_r; up_r] (the SwiGLU chunk of
    the local output); linear_proj / linear_fc2 are row parallel (rank r: input columns r*n/2 ...)."""
    shards = made["indep"]["qwen2_shards"]
    hf = _indep_to_hf(made, "qwen2_nemo1_per_rank_tp2", tmp_path / "a").state_dict()
    hf_dist = _indep_to_hf(made, "qwen2_nemo2_tp2", tmp_path / "b").state_dict()
    assert all(torch.equal(hf[k], hf_dist[k]) for k in hf)                  # per-rank and dist forms agree
    d, per_group, ffn_local = 16, 2, 64
    L = "model.layers.0."
    pre = "decoder.layers.0."
    for r in range(2):
        w = shards[r][pre + "self_attention.linear_qkv.weight"]
        b = shards[r][pre + "self_attention.linear_qkv.bias"]
        assert w.shape == (4 * d, 64) and b.shape == (4 * d,)
        for j in range(per_group):
            head = r * per_group + j
            assert torch.equal(hf[L + "self_attn.q_proj.weight"][head * d:(head + 1) * d], w[j * d:(j + 1) * d])
            assert torch.equal(hf[L + "self_attn.q_proj.bias"][head * d:(head + 1) * d], b[j * d:(j + 1) * d])
        for name, at in (("k_proj", 2), ("v_proj", 3)):
            assert torch.equal(hf[L + f"self_attn.{name}.weight"][r * d:(r + 1) * d], w[at * d:(at + 1) * d])
            assert torch.equal(hf[L + f"self_attn.{name}.bias"][r * d:(r + 1) * d], b[at * d:(at + 1) * d])
        fc1 = shards[r][pre + "mlp.linear_fc1.weight"]
        assert fc1.shape == (2 * ffn_local, 64)
        assert torch.equal(hf[L + "mlp.gate_proj.weight"][r * ffn_local:(r + 1) * ffn_local], fc1[:ffn_local])
        assert torch.equal(hf[L + "mlp.up_proj.weight"][r * ffn_local:(r + 1) * ffn_local], fc1[ffn_local:])
        proj = shards[r][pre + "self_attention.linear_proj.weight"]
        assert torch.equal(hf[L + "self_attn.o_proj.weight"][:, r * 32:(r + 1) * 32], proj)
        fc2 = shards[r][pre + "mlp.linear_fc2.weight"]
        assert torch.equal(hf[L + "mlp.down_proj.weight"][:, r * ffn_local:(r + 1) * ffn_local], fc2)
    # and both TP ranks computed the same (gathered) logits
    assert torch.equal(made["indep"]["logits"]["qwen2"], made["indep"]["qwen2_rank1_logits"])


def test_to_nemo_of_megatron_checkpoint_is_megatron_save(made, tmp_path):
    """megatron's own TP=2 / PP=2 saves -> HF -> our `--to nemo`: the dist checkpoint holds the same keys, and
    every tensor equal to the one megatron wrote (read with torch's DCP converter, not our reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def dcp(directory: Path) -> dict:
        f = directory.parent / (directory.name + ".pt")
        dcp_to_torch_save(str(directory), str(f))
        return torch.load(f, weights_only=False)

    for family, src, tp_pp in (("qwen2", "qwen2_nemo2_tp2", ["--tp", "2"]),
                               ("llama", "llama_nemo1_per_rank_pp2_dir", ["--pp", "2"])):
        hf_dir, nemo = tmp_path / f"{family}_hf", tmp_path / f"{family}.nemo"
        assert main(["convert", str(made["indep"]["src"][src]), "--to", "hf", str(hf_dir), "--threads", "1"]) == 0
        assert main(["convert", str(hf_dir), "--to", "nemo", str(nemo), *tp_pp, "--threads", "1"]) == 0
        tree = _untar(nemo, tmp_path / f"{family}_tree")
        mine, real = dcp(tree / "model_weights"), dcp(made["indep"]["dir"] / family / "model_weights")
        assert sorted(mine) == sorted(real)
        tensors = [k for k, v in real.items() if isinstance(v, torch.Tensor)]
        assert len(tensors) == {"qwen2": 10, "llama": 8}[family]   # llama: no QKV bias, tied (no output layer)
        for k in tensors:
            assert mine[k].dtype == real[k].dtype and torch.equal(mine[k], real[k]), k


# --------------------------------------------------------------------------------------------------
# HF -> NeMo (`--to nemo`)
# --------------------------------------------------------------------------------------------------
def test_to_nemo_reads_back_and_loads_into_megatron(made):
    from nemo_sdsearch.checkpoint import nemo_format

    for family in ("qwen2", "llama"):
        ckpt = nemo_format.read_nemo(made["ours"][family])
        want = made["models"][family].state_dict()
        if made["models"][family].config.tie_word_embeddings:
            want = {k: v for k, v in want.items() if k != "lm_head.weight"}
        assert sorted(ckpt.hf_state) == sorted(want)
        assert all(torch.equal(ckpt.hf_state[k], want[k]) for k in want)
        assert ckpt.hf_config.to_dict()["eos_token_id"] == made["models"][family].config.eos_token_id
    # megatron-core's own dist_checkpointing.load of the live models' sharded state dicts (what NeMo's
    # restore_from does) read our files into a TP=2 Qwen2 and a PP=2 Llama: every weight identical
    for name in ("qwen2_ours_into_tp2", "llama_ours_into_pp2"):
        for rank_res in made["worker"]:
            assert rank_res[name] and max(rank_res[name].values()) == 0.0, (name, rank_res[name])


def test_to_nemo_layout_matches_nemo_and_megatron(made):
    """Our archive holds what NeMo's save_to writes: `./model_config.yaml` and `./model_weights/` (torch_dist
    metadata.json, common.pt, .metadata, .distcp), the same dist-checkpoint keys, shapes and dtypes as
    megatron-core's save of the live model (extra-state objects included), and the architecture keys of
    NeMo's converter config with the same values."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def entries(d: Path) -> dict:
        md = FileSystemReader(str(d)).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), v.properties.dtype) if isinstance(v, TensorStorageMetadata) else "bytes"
                for k, v in md.items()}

    tmp = made["tmp"]
    for family, real in (("qwen2", tmp / "qwen2_tp2" / "model_weights"), ("llama", tmp / "llama_pp2" / "model_weights")):
        with tarfile.open(made["ours"][family]) as tar:
            names = tar.getnames()
        assert {"./model_config.yaml", "./model_weights/metadata.json", "./model_weights/common.pt",
                "./model_weights/.metadata", "./model_weights/__0_0.distcp"} <= set(names)
        mine = made["unpacked"][family] / "model_weights"
        assert json.loads((mine / "metadata.json").read_text()) == json.loads((real / "metadata.json").read_text())
        assert entries(mine) == entries(real)
        ours_cfg = yaml.safe_load((made["unpacked"][family] / "model_config.yaml").read_text())
        conv = yaml.safe_load((fx.HERE / f"model_config_{family}.yaml").read_text())
        for key in ("mcore_gpt", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "kv_channels", "normalization", "layernorm_epsilon", "bias", "activation",
                    "position_embedding_type", "rotary_percentage", "rotary_base", "max_position_embeddings",
                    "encoder_seq_length", "transformer_engine", "make_vocab_size_divisible_by"):
            assert ours_cfg.get(key) == conv.get(key), key
        assert bool(ours_cfg.get("qkv_bias")) == bool(conv.get("qkv_bias"))
        assert ours_cfg["override_vocab_size"] == made["models"][family].config.vocab_size
        assert ours_cfg["share_embeddings_and_output_weights"] == made["models"][family].config.tie_word_embeddings
    # the qwen2 archive carries the tokenizer as NeMo artifacts (<32 hex>_<name>, nemo: references)
    tok = yaml.safe_load((made["unpacked"]["qwen2"] / "model_config.yaml").read_text())["tokenizer"]
    ref = tok["sdsearch_files"]["tokenizer.json"]
    assert ref.startswith("nemo:") and len(ref.split(":")[1].split("_")[0]) == 32
    assert (made["unpacked"]["qwen2"] / ref[5:]).read_bytes() == (fx.ASSETS / "tokenizer.json").read_bytes()
    assert tok["library"] == "huggingface"


def test_convert_chain_hf_nemo_sdsearch_archive_megatron_hf(made, tmp_path):
    """Our .nemo -> the project's sdsearch training archive (its honest name; a file written under the old
    `.nemo` name still reads as one) -> Megatron weight directory -> HF: bit-exact, tokenizer kept."""
    from nemo_sdsearch.checkpoint.formats import load_sdsearch_archive
    from nemo_sdsearch.checkpoint.convert import detect_format

    arc, mdir = tmp_path / "run.sdsearch.tar", tmp_path / "mg"
    assert main(["convert", str(made["ours"]["qwen2"]), "--to", "sdsearch-archive", str(arc), "--tp", "2"]) == 0
    assert detect_format(arc) == "sdsearch-archive" and detect_format(made["ours"]["qwen2"]) == "nemo"
    _, states, layout = load_sdsearch_archive(arc)
    assert layout.tp == 2 and len(states) == 2
    assert main(["convert", str(arc), "--to", "megatron", str(mdir)]) == 0
    out = _to_hf_and_compare(made, mdir, "qwen2", tmp_path)
    assert (out["dir"] / "tokenizer.json").read_bytes() == (fx.ASSETS / "tokenizer.json").read_bytes()
    # Llama has a Megatron-actor layout too (models.families): .nemo -> Megatron TP=2 directory -> HF, bit-exact
    assert main(["convert", str(made["ours"]["llama"]), "--to", "megatron", str(tmp_path / "x"), "--tp", "2"]) == 0
    _to_hf_and_compare(made, tmp_path / "x", "llama", tmp_path / "llama")


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
def test_split_merge_round_trip_and_shapes(made):
    """split_global (megatron's per-rank layout) and merge_ranks (the per-rank reader) are inverse at
    TP=2 x PP=2, local-spec names, tied and untied."""
    from nemo_sdsearch.checkpoint import nemo_format as nf

    for family in ("qwen2", "llama"):
        model = made["models"][family]
        spec = nf.spec_from_hf(model.config)
        full = nf.hf_to_global(model.state_dict(), spec)
        ranks = nf.split_global(full, spec, tp=2, pp=2, local_names=True)
        assert "decoder.layers.0.input_layernorm.weight" in ranks[3]          # local names, stage-local index
        assert (nf.OUTPUT in ranks[2]) and (nf.EMBED not in ranks[2])         # last stage: output layer (tied: copy)
        back = nf.merge_ranks({(i % 2, i // 2): r for i, r in enumerate(ranks)})
        nf.check_global(back, spec, "round trip")
        if spec.tied:
            back.pop(nf.OUTPUT)
        assert sorted(back) == sorted(full) and all(torch.equal(back[k], full[k]) for k in full)
        hf = nf.global_to_hf(back, spec)
        assert all(torch.equal(hf[k], v) for k, v in model.state_dict().items() if k in hf)


def test_unsupported_nemo_checkpoints_fail_clearly(made, tmp_path, capsys):
    cfg = fx.nemo1_config("qwen2", tp=2)
    cfg["activation"] = "gelu"
    bad = fx.write_nemo1(tmp_path / "gelu.nemo", cfg, {"model_weights": made["tmp"] / "qwen2_tp2" / "model_weights"})
    assert main(["convert", str(bad), "--to", "hf", str(tmp_path / "o1")]) == 2
    assert "activation 'gelu'" in capsys.readouterr().err
    # a pre-megatron-core (model.language_model.*) per-rank checkpoint
    f = tmp_path / "old.ckpt"
    torch.save({"model.language_model.embedding.word_embeddings.weight": torch.zeros(4, 2)}, f)
    old = fx.write_nemo1(tmp_path / "old.nemo", fx.nemo1_config("llama"), {"model_weights.ckpt": f})
    assert main(["convert", str(old), "--to", "hf", str(tmp_path / "o2")]) == 2
    assert "convert_gpt_nemo_to_mcore" in capsys.readouterr().err
    # weights that do not fit the config (a Llama config over Qwen2 weights)
    mismatch = fx.write_nemo1(tmp_path / "mix.nemo", fx.nemo1_config("llama", pp=1),
                              {"model_weights": made["tmp"] / "qwen2_tp2" / "model_weights"})
    assert main(["convert", str(mismatch), "--to", "hf", str(tmp_path / "o3")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_bf16_round_trip_keeps_dtype(made, tmp_path):
    """NeMo checkpoints are usually bf16: the dtype travels as is (precision: bf16 in model_config.yaml)."""
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(made["models"]["llama"]).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    assert main(["convert", str(tmp_path / "bf16"), "--to", "nemo", str(tmp_path / "b.nemo")]) == 0
    with tarfile.open(tmp_path / "b.nemo") as tar:
        assert yaml.safe_load(tar.extractfile("./model_config.yaml"))["precision"] == "bf16"
    assert main(["convert", str(tmp_path / "b.nemo"), "--to", "hf", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype="auto")
    sd = back.state_dict()
    assert all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_nemo1_single_rank_file(made, tmp_path):
    """TP=PP=1 per-rank form: one `model_weights.ckpt` at the archive root (also as a Lightning-style
    {"state_dict": ...} dict)."""
    from nemo_sdsearch.checkpoint import nemo_format as nf

    model = made["models"]["llama"]
    spec = nf.spec_from_hf(model.config)
    rank = nf.split_global(nf.hf_to_global(model.state_dict(), spec), spec, local_names=True)[0]
    for i, wrap in enumerate((False, True)):
        state = {"model." + k: v for k, v in rank.items()}
        f = tmp_path / f"w{i}.ckpt"
        torch.save({"state_dict": state} if wrap else state, f)
        src = fx.write_nemo1(tmp_path / f"one{i}.nemo", fx.nemo1_config("llama"), {"model_weights.ckpt": f})
        _to_hf_and_compare(made, src, "llama", tmp_path / str(i))
