"""The weight stream (`Actor.iter_weights`) and its consumers: `iter_buckets`, the TRT-LLM generator's
bucketed refit (through the API double of tests/fake_trtllm.py) and the streaming HF checkpoint writer.

Memory is measured, not assumed: `LiveBytes` wraps a stream and records, each time a tensor is handed
out, the bytes of the stream's tensors that are still alive (a `weakref.finalize` on every tensor). A
refit or a write must never hold more than one bucket / shard plus the largest tensor.

The Megatron streams (TP 1, TP 2, PP 2) are checked inside the existing spawned workers of
tests/test_megatron.py and tests/test_megatron_pipeline.py (bit-exact against today's export, the
writer and the refit fed from them).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from types import SimpleNamespace

import pytest
import torch

from test_megatron import full_batch, hf_logits, make_hf  # noqa: E402 - tests/ is on sys.path under pytest

TOKENIZER = SimpleNamespace(eos_token_id=0, pad_token_id=1)  # the double only generates with it


class LiveBytes:
    """Wrap a weight stream; `peak`: the most bytes of its tensors alive at once (measured at each tensor
    handed out, that tensor included); `largest`, `total`: the largest tensor and the sum of all.
    Lifetimes are those of the tensors' storages (torch keeps one Python object per storage), so an
    alias a consumer makes (`detach()`, a no-op `.to()`) keeps a tensor counted as alive.

    `transport_slack=True` (streams made by gloo collectives): the previous tensor is not counted while
    it is still alive. A gloo worker thread drops its reference to a collective's tensor a moment AFTER
    the collective has returned, so the tensor a consumer has just dropped may still be alive then."""

    def __init__(self, transport_slack: bool = False):
        self.transport_slack = transport_slack
        self.alive = self.peak = self.largest = self.total = self.count = 0
        self._live: set[int] = set()

    def _free(self, i: int, n: int) -> None:
        self.alive -= n
        self._live.discard(i)

    def wrap(self, weights):
        it = iter(weights.items() if isinstance(weights, Mapping) else weights)
        prev = None
        while True:
            item = next(it, None)
            if item is None:
                return
            name, tensor = item
            del item
            n = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor.untyped_storage(), self._free, self.count, n)
            self._live.add(self.count)
            self.alive += n
            slack = prev[1] if self.transport_slack and prev is not None and prev[0] in self._live else 0
            prev = (self.count, n)
            self.count += 1
            self.total += n
            self.largest = max(self.largest, n)
            self.peak = max(self.peak, self.alive - slack)
            yield name, tensor
            del name, tensor


def fresh_stream(model):
    """A stream that makes a new tensor per weight (as the Megatron gather does), from an HF model."""
    from nemo_sdsearch.models.hf import HFActor

    for name, tensor in HFActor(model).iter_weights():
        yield name, tensor.clone()


def check_buckets(sizes: list[list[tuple[str, int]]], bucket_bytes: int) -> None:
    """Every bucket fits in `bucket_bytes` unless it is one larger tensor, and buckets are filled
    greedily (the next tensor would not have fitted)."""
    for i, bucket in enumerate(sizes):
        total = sum(n for _, n in bucket)
        assert total <= bucket_bytes or len(bucket) == 1, (i, total)
        if i + 1 < len(sizes):
            assert total + sizes[i + 1][0][1] > bucket_bytes, (i, total)


# --------------------------------------------------------------------------------------------------
# iter_buckets
# --------------------------------------------------------------------------------------------------
def test_iter_buckets_groups_consecutive_tensors_up_to_the_limit():
    from nemo_sdsearch.rollout.generator import iter_buckets

    sizes = [3, 4, 1, 10, 2, 2, 2, 2, 9, 1]      # float32 elements
    weights = [(f"w{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    buckets = list(iter_buckets(iter(weights), bucket_bytes=8 * 4))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1", "w2"], ["w3"], ["w4", "w5", "w6", "w7"],
                                                    ["w8"], ["w9"]]
    check_buckets([[(n, t.numel() * 4) for n, t in b] for b in buckets], 8 * 4)
    # a Mapping is its items; one bucket when everything fits; nothing for an empty stream
    assert [[n for n, _ in b] for b in iter_buckets(dict(weights), 1 << 20)] == [[n for n, _ in weights]]
    assert list(iter_buckets([], 10)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(weights, 0))


# --------------------------------------------------------------------------------------------------
# HFActor.iter_weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_hf_actor_streams_its_state_dict_without_copies(tied):
    from nemo_sdsearch.models.hf import HFActor

    model = make_hf(tied)
    actor = HFActor(model)
    streamed = list(actor.iter_weights())
    state = model.state_dict()
    expected = [k for k in state if not (tied and k == "lm_head.weight")]
    assert [n for n, _ in streamed] == expected       # state_dict order, a tied lm_head left out
    assert all(t.data_ptr() == state[n].data_ptr() for n, t in streamed)   # the parameters themselves
    assert list(actor.export_weights()) == list(state)  # the dict form keeps the HF state_dict keys


# --------------------------------------------------------------------------------------------------
# the TRT-LLM generator's refit (through the API double)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_trtllm_refit_streams_buckets_and_holds_the_new_weights(tied):
    from fake_trtllm import fake_generator

    source = make_hf(tied, seed=1)
    bucket_bytes = 40_000  # the micro model: 16 KiB .. 256 KiB tensors, so some are larger than a bucket
    gen = fake_generator(make_hf(tied, seed=0), TOKENIZER, refit_bucket_bytes=bucket_bytes)
    try:
        live = LiveBytes()
        gen.refit(live.wrap(fresh_stream(source)))
        assert len(gen.llm.refits) == 1
        sizes = gen.llm.refits[0]
        names = [n for b in sizes for n, _ in b]
        expected = [k for k in source.state_dict() if not (tied and k == "lm_head.weight")]
        assert names == expected                              # every tensor once, in stream order
        assert len(sizes) > 3 and any(len(b) > 1 for b in sizes) and any(len(b) == 1 and b[0][1] > bucket_bytes
                                                                          for b in sizes)
        check_buckets(sizes, bucket_bytes)
        assert [m for m, _ in gen.llm.calls].count("update_weights") == len(sizes) + 1   # + the finalize
        held, ref = gen.llm.model.state_dict(), source.state_dict()
        assert list(held) == list(ref) and all(torch.equal(held[k], ref[k]) for k in ref)
        # the trainer side never held more than one bucket plus the largest tensor
        assert live.count == len(expected) and live.peak <= bucket_bytes + live.largest < live.total
        assert live.alive == 0                                # nothing kept after the refit
        # a Mapping (today's export_weights dict) is refitted the same way
        gen.refit(make_hf(tied, seed=2).state_dict())
        check_buckets(gen.llm.refits[1], bucket_bytes)
        held, ref = gen.llm.model.state_dict(), make_hf(tied, seed=2).state_dict()
        assert all(torch.equal(held[k], ref[k]) for k in ref)
    finally:
        gen.shutdown()


def test_live_bytes_sees_a_consumer_that_keeps_everything():
    """The measurement is not vacuous: collecting the stream into a dict holds the whole model."""
    live = LiveBytes()
    kept = dict(live.wrap(fresh_stream(make_hf(False))))
    assert live.peak == live.total == sum(t.numel() * t.element_size() for t in kept.values())


# --------------------------------------------------------------------------------------------------
# the streaming HF checkpoint writer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_writer_makes_a_sharded_hf_directory_equal_to_the_source(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    source = make_hf(tied, seed=3)
    shard_bytes = 100_000
    live = LiveBytes()
    out = save_hf_checkpoint_from_stream(live.wrap(fresh_stream(source)), tmp_path / "hf", source.config,
                                         shard_bytes=shard_bytes)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors.index.json" in files and "config.json" in files and "generation_config.json" in files
    assert not any(f.endswith(".tmp") for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = [k for k in source.state_dict() if not (tied and k == "lm_head.weight")]
    assert sorted(index["weight_map"]) == sorted(expected) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == live.total
    # only the current shard was resident
    assert live.peak <= shard_bytes + live.largest < live.total and live.alive == 0
    # transformers loads it: the same state and the same logits as the source
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.config.tie_word_embeddings == tied and loaded.dtype == torch.float32
    got, ref = loaded.state_dict(), source.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    batch = full_batch()
    assert torch.equal(hf_logits(loaded, batch), hf_logits(source, batch))
    # written again with one shard: model.safetensors alone (the old shards and index are gone)
    save_hf_checkpoint_from_stream(dict(source.state_dict()), out, source.config)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    got = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_writer_records_the_weights_dtype_and_non_writers_keep_nothing(tmp_path):
    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    source = make_hf(False)
    bf16 = ((n, t.to(torch.bfloat16)) for n, t in fresh_stream(source))
    out = save_hf_checkpoint_from_stream(bf16, tmp_path / "bf16", source.config, shard_bytes=1 << 30)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    # a rank that does not write iterates the whole stream (its collectives) and keeps nothing
    live = LiveBytes()
    assert save_hf_checkpoint_from_stream(live.wrap(fresh_stream(source)), tmp_path / "no", source.config,
                                          write=False) is None
    assert not (tmp_path / "no").exists()
    assert live.count == len(source.state_dict()) and live.peak == live.largest and live.alive == 0


# --------------------------------------------------------------------------------------------------
# the writer shards as save_pretrained does
# --------------------------------------------------------------------------------------------------
def _shard_layout(out):
    """(the weight files, the index's weight map and metadata or None) of a HF directory."""
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    return files, index


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("max_shard_size", ["100KB", "150KB", "60KiB"])
def test_writer_shards_exactly_as_save_pretrained(tied, max_shard_size, tmp_path):
    """Same files, same weight map, same metadata as `save_pretrained(max_shard_size=...)` on the same
    model, the stream holding at most one shard plus one tensor; `from_pretrained` loads it to the same
    logits. "100KB" puts the 256 KiB embedding (and untied lm_head) in shards of their own between
    smaller ones, as huggingface_hub's splitter does."""
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.checkpoint.hf_writer import parse_shard_size, save_hf_checkpoint_from_stream

    source = make_hf(tied, seed=5)
    live = LiveBytes()
    ours = save_hf_checkpoint_from_stream(live.wrap(fresh_stream(source)), tmp_path / "ours", source.config,
                                          max_shard_size=max_shard_size)
    limit = parse_shard_size(max_shard_size)
    assert live.peak <= limit + live.largest < live.total and live.alive == 0
    theirs = tmp_path / "theirs"
    if max_shard_size.endswith("iB"):  # huggingface_hub's parser takes decimal units only: give it bytes
        source.save_pretrained(str(theirs), max_shard_size=limit)
    else:
        source.save_pretrained(str(theirs), max_shard_size=max_shard_size)
    files, index = _shard_layout(ours)
    assert len(files) > 2 and index is not None
    assert (files, index) == _shard_layout(theirs)
    for f in files:  # each shard holds the same tensors, bit for bit
        from safetensors.torch import load_file

        a, b = load_file(str(ours / f)), load_file(str(theirs / f))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded = AutoModelForCausalLM.from_pretrained(str(ours)).eval()
    batch = full_batch()
    assert torch.equal(hf_logits(loaded, batch), hf_logits(source, batch))


def test_writer_default_is_one_file_below_5GB_and_the_size_is_configurable(tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.checkpoint import hf_writer

    source = make_hf(False, seed=6)
    assert hf_writer.MAX_SHARD_SIZE == "5GB" and hf_writer.parse_shard_size(hf_writer.MAX_SHARD_SIZE) == 5 * 10**9
    out = hf_writer.save_hf_checkpoint_from_stream(fresh_stream(source), tmp_path / "one", source.config)
    assert _shard_layout(out) == (["model.safetensors"], None)
    # a stored size as big as the whole model still fits one file; one byte less makes two
    total = sum(t.numel() * t.element_size() for t in source.state_dict().values())
    assert _shard_layout(hf_writer.save_hf_checkpoint_from_stream(
        fresh_stream(source), tmp_path / "fits", source.config, max_shard_size=total))[0] == ["model.safetensors"]
    files, index = _shard_layout(hf_writer.save_hf_checkpoint_from_stream(
        fresh_stream(source), tmp_path / "two", source.config, max_shard_size=total - 1))
    assert len(files) == 2 and index["metadata"]["total_size"] == total
    # only the writer writes: a sharded save with write=False leaves nothing
    assert hf_writer.save_hf_checkpoint_from_stream(fresh_stream(source), tmp_path / "none", source.config,
                                                    max_shard_size="10KB", write=False) is None
    assert not (tmp_path / "none").exists()
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())


def test_parse_shard_size():
    from nemo_sdsearch.checkpoint.hf_writer import parse_shard_size

    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("5gb") == 5 * 10**9
    assert parse_shard_size("500MB") == 5 * 10**8 and parse_shard_size("1.5GB") == 15 * 10**8
    assert parse_shard_size("2GiB") == 2 * 2**30 and parse_shard_size("64KiB") == 65536
    assert parse_shard_size(" 10 KB ") == 10_000 and parse_shard_size(1234) == 1234 and parse_shard_size("77") == 77
    for bad in ["", "GB", "5XB", "-1GB", "5 G B", 0, -3, True, "0MB"]:
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_shard_size(bad)


# --------------------------------------------------------------------------------------------------
# Qwen3 and Llama-3.x: a live Megatron model's stream (q/k norms included) feeds the writer and the refit
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_streams():
    """The weight stream of a TP=1 Megatron actor of each tiny family config (tests/test_model_families.py),
    made once: `make` gives a fresh `iter_weights()` of that actor."""
    import warnings

    pytest.importorskip("megatron.core")
    from test_model_families import NAMES
    from test_model_families import make_hf as family_hf

    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    warnings.filterwarnings("ignore")
    init_parallel(1)
    try:
        sources = {name: family_hf(name, seed=4) for name in NAMES}
        actors = {name: MegatronActor.from_hf(m) for name, m in sources.items()}
        yield {name: (sources[name], actors[name].iter_weights) for name in NAMES}
    finally:
        teardown_parallel()


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_megatron_stream_of_other_families_writes_and_refits(family_streams, name, tmp_path):
    from fake_trtllm import fake_generator
    from test_model_families import hf_logits as family_logits
    from test_model_families import make_hf as family_hf
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    source, stream = family_streams[name]
    tied = source.config.tie_word_embeddings
    expected = [k for k in source.state_dict() if not (tied and k == "lm_head.weight")]
    assert ("model.layers.0.self_attn.q_norm.weight" in expected) == (name == "qwen3")
    # the streaming HF writer: the directory transformers loads is the source, same logits
    live = LiveBytes()
    out = save_hf_checkpoint_from_stream(live.wrap(stream()), tmp_path / "hf", source.config, shard_bytes=60_000)
    assert live.count == len(expected) and live.peak <= 60_000 + live.largest < live.total
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(loaded) is type(source)
    got, ref = loaded.state_dict(), source.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(family_logits(loaded), family_logits(source))
    # the TRT-LLM refit (API double) of a generator holding other weights: it then holds the source's
    gen = fake_generator(family_hf(name, seed=5), TOKENIZER, refit_bucket_bytes=40_000)
    try:
        gen.refit(stream())
        assert [n for b in gen.llm.refits[0] for n, _ in b] == expected
        held = gen.llm.model.state_dict()
        assert all(torch.equal(held[k], ref[k]) for k in ref)
    finally:
        gen.shutdown()
