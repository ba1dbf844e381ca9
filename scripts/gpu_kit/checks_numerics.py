"""Numerics: `logits`, HF <-> Megatron logits of the same Qwen2 model (random weights, built from a config; a
Qwen2.5-0.5B shape on the GPU, QWEN_TINY in the dry run), fp32 (TF32 off) within 2e-3 and, on the GPU,
Megatron bf16 parameters against HF bf16 autocast within 0.1."""

from __future__ import annotations

import time
from pathlib import Path

from .common import gpu_mode, qwen_config


def check_logits(mode: str, out: Path) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.models.base import SequenceBatch, positions_from_mask
    from nemo_sdsearch.models.hf import HFScorer
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import build_gpt_model, init_parallel, teardown_parallel

    cuda = gpu_mode(mode)
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison is fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = qwen_config(mode)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"Qwen2 from a config: {n_params / 1e6:.0f}M parameters, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, on {device} ({time.perf_counter() - t0:.1f} s)")
    B, T = (4, 256) if cuda else (3, 16)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, cfg.vocab_size, (T - 7 * i,), generator=g).tolist() for i in range(B)]
    batch = SequenceBatch.from_lists(seqs, pad_id=1, device=device)
    rows, cols = positions_from_mask(batch.attention_mask.bool())
    state = hf.state_dict()
    init_parallel(1)
    figures, skipped, problems = {"params_m": n_params / 1e6, "rows": int(rows.numel())}, [], []
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    if not cuda:
        skipped.append("bf16 (Megatron bf16 parameters vs HF bf16 autocast): GPU only")
    for dtype in dtypes:
        t0 = time.perf_counter()
        model = build_gpt_model(cfg, dtype=dtype)
        # as a trained actor is built: on a GPU Megatron DDP and its mixed-precision distributed optimizer
        mg = MegatronActor(model, cfg)
        mg.load_hf_weights(state)
        scorer = HFScorer(hf)
        scorer.autocast = cuda and dtype == torch.bfloat16  # fp32: no autocast on either side
        with torch.no_grad():
            ref = scorer.logits_at(batch, rows, cols).float()
            got = mg.full_logits_at(batch, rows, cols).float()
        diff = (got - ref).abs()
        lp = lambda x: torch.log_softmax(x, -1).gather(-1, batch.input_ids[rows, cols][:, None]).squeeze(-1)
        dlp = (lp(got) - lp(ref)).abs()
        name = str(dtype).replace("torch.", "")
        figures[name] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                         "max_abs_logit": float(ref.abs().max()), "max_abs_logprob_diff": float(dlp.max()),
                         "seconds": time.perf_counter() - t0}
        tol = 2e-3 if dtype == torch.float32 else 0.1
        print(f"{name}: logits [{ref.shape[0]} x {ref.shape[1]}], max |megatron - hf| {float(diff.max()):.3g} "
              f"(mean {float(diff.mean()):.3g}, max |logit| {float(ref.abs().max()):.3g}), max |log-prob diff| "
              f"{float(dlp.max()):.3g}; tolerance {tol:g}")
        if not float(diff.max()) <= tol:
            problems.append(f"{name} logits differ by {float(diff.max()):.3g} (> {tol:g})")
        del mg, model
        if cuda:
            torch.cuda.empty_cache()
    teardown_parallel()
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
            "skipped": skipped}
