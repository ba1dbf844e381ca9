"""Loss functions against fp64 references: finite differences, closed forms, chunked == dense."""

import math

import pytest
import torch

from nemo_sdsearch.losses.divergences import (clipped_forward_kl, clipped_forward_kl_dense, generalized_jsd,
                                              generalized_jsd_dense)
from nemo_sdsearch.losses.grpo_sd_loss import token_weights
from nemo_sdsearch.losses.policy import clipped_surrogate_per_token, group_advantages, k3_per_token
from nemo_sdsearch.losses.vocab_parallel import token_logprobs

D = torch.float64


def finite_difference_check(fn, x, eps=1e-6, n_probe=12, seed=0):
    """Compare autograd gradient of sum(fn(x) * w) with central differences along random coordinates."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(fn(x.detach()).shape, generator=g, dtype=D)
    x = x.detach().clone().requires_grad_()
    (fn(x) * w).sum().backward()
    flat = x.detach().view(-1)
    for idx in torch.randint(0, flat.numel(), (n_probe,), generator=g).tolist():
        plus, minus = flat.clone(), flat.clone()
        plus[idx] += eps
        minus[idx] -= eps
        num = ((fn(plus.view_as(x)) * w).sum() - (fn(minus.view_as(x)) * w).sum()) / (2 * eps)
        assert x.grad.view(-1)[idx].item() == pytest.approx(num.item(), rel=1e-5, abs=1e-8)


def rand_logits(rows=6, vocab=40, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g, dtype=D) * std, torch.randn(rows, vocab, generator=g, dtype=D) * std


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_jsd_gradient_finite_differences(beta, chunked):
    s, t = rand_logits()
    fn = (lambda x: generalized_jsd(x, t, beta, 1.5, chunk_rows=4)) if chunked else \
        (lambda x: generalized_jsd_dense(x, t, beta, 1.5))
    finite_difference_check(fn, s)


@pytest.mark.parametrize("chunked", [False, True])
def test_clipped_kl_gradient_finite_differences(chunked):
    s, t = rand_logits(std=4.0)
    fn = (lambda x: clipped_forward_kl(x, t, 0.3, chunk_rows=4)) if chunked else \
        (lambda x: clipped_forward_kl_dense(x, t, 0.3))
    # Keep probes away from the non-differentiable clip boundary.
    terms = torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))
    assert ((terms - 0.3).abs() > 1e-4).all()
    finite_difference_check(fn, s)


def closed_forms(s, t):
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    m = 0.5 * p + 0.5 * q
    return kl(p, q), kl(q, p), 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.mark.parametrize("fn", [generalized_jsd, generalized_jsd_dense])
def test_jsd_closed_forms(fn):
    s, t = rand_logits()
    fwd, rev, js = closed_forms(s, t)
    assert torch.allclose(fn(s, t, 0.0), fwd, atol=1e-12)   # forward KL(teacher || student)
    assert torch.allclose(fn(s, t, 1.0), rev, atol=1e-12)   # reverse KL(student || teacher)
    assert torch.allclose(fn(s, t, 0.5), js, atol=1e-12)    # the symmetric Jensen-Shannon divergence
    assert (js <= math.log(2) + 1e-12).all()
    assert torch.allclose(fn(s, s, 0.5), torch.zeros(6, dtype=D), atol=1e-12)


def test_temperature_scales_logits():
    s, t = rand_logits()
    assert torch.allclose(generalized_jsd(s, t, 0.5, temperature=2.0), generalized_jsd(s / 2, t / 2, 0.5), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_chunked_equals_dense_std30(beta):
    s, t = rand_logits(rows=37, vocab=300, std=30.0, seed=3)
    s.requires_grad_()
    w = torch.rand(37, dtype=D)
    (generalized_jsd_dense(s, t, beta) * w).sum().backward()
    ref_loss, ref_grad = generalized_jsd_dense(s, t, beta).detach(), s.grad.clone()
    s.grad = None
    out = generalized_jsd(s, t, beta, chunk_rows=8)
    (out * w).sum().backward()
    assert (out.detach() - ref_loss).abs().max() < 1e-6 and (s.grad - ref_grad).abs().max() < 1e-6


def test_clipped_chunked_equals_dense_std30():
    s, t = rand_logits(rows=37, vocab=300, std=30.0, seed=4)
    s.requires_grad_()
    clipped_forward_kl_dense(s, t, 10.0).sum().backward()
    ref_grad = s.grad.clone()
    s.grad = None
    out = clipped_forward_kl(s, t, 10.0, chunk_rows=5)
    out.sum().backward()
    assert (out.detach() - clipped_forward_kl_dense(s, t, 10.0)).abs().max() < 1e-6
    assert (s.grad - ref_grad).abs().max() < 1e-6


def test_clip_boundary():
    """A term above tau contributes exactly tau and no gradient; terms below are untouched."""
    t = torch.tensor([[10.0, 0.0, 0.0, 0.0]], dtype=D)
    s = torch.tensor([[-10.0, 0.0, 0.0, 0.0]], dtype=D, requires_grad=True)
    p, logq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    terms = p * (p.log() - logq)
    assert terms[0, 0] > 5 and (terms[0, 1:] < 0).all()
    for tau in (5.0, 1e9):
        for fn in (clipped_forward_kl, clipped_forward_kl_dense):
            s.grad = None
            out = fn(s, t, tau)
            expected = torch.clamp(terms, max=tau).sum()
            assert out.item() == pytest.approx(expected.item(), rel=1e-12)
            out.sum().backward()
            q = torch.softmax(s, -1).detach()
            unclipped = (terms < tau).to(D)
            expected_grad = q * (p * unclipped).sum() - p * unclipped
            assert torch.allclose(s.grad, expected_grad, atol=1e-12)
    # With no clipping the loss is the forward KL.
    assert clipped_forward_kl(s, t, 1e9).item() == pytest.approx(closed_forms(s.detach(), t)[0].item())


def test_teacher_gets_no_gradient():
    s, t = rand_logits()
    t.requires_grad_()
    s.requires_grad_()
    (generalized_jsd(s, t).sum() + clipped_forward_kl(s, t).sum() + generalized_jsd_dense(s, t).sum()).backward()
    assert t.grad is None and s.grad is not None


def test_bad_shapes_and_beta():
    s, t = rand_logits()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="rows, vocab"):
        generalized_jsd(s, t[:, :5])


def test_group_advantages():
    a = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], group_size=4)
    assert torch.allclose(a[:4], torch.tensor([1, -1, -1, 1.0]) / (torch.tensor([1, 0, 0, 1.0]).std() + 1e-6) * 0.5)
    assert torch.equal(a[4:], torch.zeros(4)) and not torch.isnan(a).any()
    assert torch.equal(group_advantages([0.0] * 5, 5), torch.zeros(5))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1, 0, 1], 4)


def surrogate(logp, old, adv, mask, reduction="token", clip_eps=0.2):
    """The training loss's surrogate over [batch, time] tensors, as GRPOSDLoss forms it: the per-token clipped
    term at the mask's positions, weighted by `token_weights` (token mean or per-sequence mean); and the clip
    flags there."""
    rows, cols = mask.nonzero(as_tuple=True)
    per_token, clipped = clipped_surrogate_per_token(logp[rows, cols], old[rows, cols], adv[rows], clip_eps)
    seq_lens = torch.bincount(rows, minlength=mask.shape[0]).clamp(min=1)
    w = token_weights(rows, seq_lens, reduction, int(rows.numel()), int((seq_lens * mask.any(1)).gt(0).sum()))
    return (per_token * w.to(per_token.dtype)).sum(), clipped


def test_grpo_surrogate_and_clip():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=D)).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.5]], dtype=D))
    adv = torch.tensor([1.0, -1.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipped = surrogate(logp, old, adv, mask)
    # Token 0: ratio 2 clipped to 1.2 for A > 0; token 1: ratio 1; row 2 token 0: ratio 1, A = -1.
    assert loss.item() == pytest.approx(-(1.2 + 1.0 - 1.0) / 3)
    assert clipped.tolist() == [True, False, False]
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-1 / 3) and logp.grad[1, 1] == 0
    seq, _ = surrogate(logp.detach(), old, adv, mask, reduction="sequence")
    assert seq.item() == pytest.approx(-((1.2 + 1.0) / 2 - 1.0) / 2)
    finite_difference_check(lambda x: surrogate(x, old, adv, mask)[0][None], logp.detach() + 0.01)


def test_k3_kl():
    logp = torch.log(torch.tensor([[0.2, 0.7]], dtype=D))
    ref = torch.log(torch.tensor([[0.4, 0.7]], dtype=D))
    r = ref - logp
    assert k3_per_token(logp, ref).mean().item() == pytest.approx(((r.exp() - r - 1).sum() / 2).item())
    assert k3_per_token(ref, ref).sum().item() == 0.0
    finite_difference_check(lambda x: k3_per_token(x, ref).mean()[None], logp)


def test_k3_clamp():
    """verl's low_var_kl: the per-token value is capped at 10 by default (zero gradient there); values inside
    are untouched; clamp=None is the plain estimator; no inf/NaN even for extreme log-ratios."""
    # token 0: pi << pi_ref (r = 15: exp(15) - 16 ~ 3.3e6), token 1: inside, token 2: pi >> pi_ref (r = -30),
    # token 3: r = +200 (exp would overflow fp32 without the log-ratio clamp)
    ref = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logp = (ref - torch.tensor([[15.0, 0.5, -30.0, 200.0]])).requires_grad_()
    r = (ref - logp).detach()
    k3 = k3_per_token(logp, ref)
    inside = torch.exp(r[0, 1]) - r[0, 1] - 1
    assert k3[0, 0].item() == 10.0 and k3[0, 2].item() == 10.0 and k3[0, 3].item() == 10.0
    assert k3[0, 1].item() == pytest.approx(inside.item(), rel=1e-6)
    k3.sum().backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 2].item() == 0.0 and logp.grad[0, 3].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-(torch.exp(r[0, 1]) - 1).item(), rel=1e-6)   # d/dlogp
    assert torch.isfinite(logp.grad).all()
    # unclamped: the plain estimator (and its gradient) everywhere
    plain = k3_per_token(logp.detach().double(), ref.double(), clamp=None)
    rd = r.double()
    assert torch.equal(plain, torch.exp(rd) - rd - 1) and plain[0, 0] > 1e6
    # another clamp value
    assert k3_per_token(logp.detach(), ref, clamp=2.0)[0, 0].item() == 2.0
    assert k3_per_token(logp.detach()[:, :2], ref[:, :2]).mean().item() == pytest.approx((10.0 + inside.item()) / 2,
                                                                                          rel=1e-6)
    with pytest.raises(ValueError, match="clamp"):
        k3_per_token(logp, ref, clamp=0.0)


@pytest.mark.parametrize("fn", [generalized_jsd, clipped_forward_kl])
def test_inplace_gradient_matches(fn):
    s, t = rand_logits(rows=9, vocab=60, std=5.0, seed=9)
    a = s.clone().requires_grad_()
    fn(a, t, chunk_rows=4).sum().backward()
    b_leaf = s.clone().requires_grad_()
    b = b_leaf * 1.0  # a private non-leaf copy, as the training loop gathers rows
    out = fn(b, t, chunk_rows=4, inplace_grad=True)
    out.sum().backward()
    assert torch.allclose(b_leaf.grad, a.grad, atol=1e-12)
    assert torch.allclose(out.detach(), fn(s, t).detach(), atol=1e-12)


def test_inplace_gradient_refuses_shared_logits():
    s, t = rand_logits()
    leaf = s.clone().requires_grad_()
    x = leaf * 1.0
    y = torch.exp(x)  # exp saves its output, not x; but x * x saves x itself
    z = (x * x).sum()
    generalized_jsd(x, t, inplace_grad=True).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    del y


@pytest.mark.slow
def test_compiled_chunks_match_eager():
    s, t = rand_logits(rows=20, vocab=300, std=30.0, seed=5)
    s, t = s.float(), t.float()
    for fn in (generalized_jsd, clipped_forward_kl):
        a = s.clone().requires_grad_()
        fn(a, t, chunk_rows=8).sum().backward()
        b = s.clone().requires_grad_()
        out = fn(b, t, chunk_rows=8, compile=True)
        out.sum().backward()
        assert torch.allclose(out, fn(s, t, chunk_rows=8), rtol=1e-5, atol=1e-4)
        assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Large logits: fp32 inputs against fp64 references of the same (fp32) values
# ---------------------------------------------------------------------------------------------------
LARGE_CASES = ("offset", "teacher_offset", "uniform")
LARGE_TEMPS = (0.7, 1.0, 1.3, 2.0)  # dividing by 2 is exact: 0.7 and 1.3 also catch `x / T - max / T`
LARGE_TOL = 2e-6  # about 30 fp32 ulps; `x / T - (M / T + log S)` is 1e-5 .. 1e-4 off at these offsets


def large_logits(case: str, rows: int = 10, vocab: int = 300, seed: int = 0):
    """fp32 (student, teacher, targets): "offset": every logit + 1e3; "teacher_offset": teacher = student +
    noise + 1e3 (a constant offset of the teacher); "uniform": logits uniform in [-1e4, 1e4]."""
    g = torch.Generator().manual_seed(seed)
    if case == "offset":
        s = torch.randn(rows, vocab, generator=g, dtype=D) * 3 + 1e3
        t = torch.randn(rows, vocab, generator=g, dtype=D) * 3 + 1e3
    elif case == "teacher_offset":
        s = torch.randn(rows, vocab, generator=g, dtype=D) * 3
        t = s + torch.randn(rows, vocab, generator=g, dtype=D) + 1e3
    else:
        s = (torch.rand(rows, vocab, generator=g, dtype=D) * 2 - 1) * 1e4
        t = (torch.rand(rows, vocab, generator=g, dtype=D) * 2 - 1) * 1e4
    return s.float(), t.float(), torch.randint(0, vocab, (rows,), generator=g)


def value_err(out, ref):
    """max over rows of |out - ref| / max(|ref|, 1)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float(((out - ref).abs() / ref.abs().clamp(min=1.0)).max())


def grad_err(grad, ref_grad, ref_loss):
    """max over rows of max_v |grad - ref| / max(max_v |ref|, |loss|, 1): per-row relative, with the row's
    loss as a floor (the reverse-KL / JSD gradient q (g - loss) cancels numbers of the size of the loss)."""
    grad, ref_grad = grad.detach().double(), ref_grad.detach().double()
    scale = torch.maximum(ref_grad.abs().amax(-1), ref_loss.detach().double().abs()).clamp(min=1.0)
    return float(((grad - ref_grad).abs().amax(-1) / scale).max())


@pytest.mark.parametrize("case", LARGE_CASES)
@pytest.mark.parametrize("temperature", LARGE_TEMPS)
@pytest.mark.parametrize("op", ["jsd0", "jsd0.5", "jsd1", "clipped"])
def test_chunked_large_logits_match_fp64(case, temperature, op):
    """The chunked divergences on fp32 logits with a large offset (or range) vs the fp64 dense reference."""
    s, t, _ = large_logits(case)
    w = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(1), dtype=D) + 0.5
    if op == "clipped":
        dense = lambda a, b: clipped_forward_kl_dense(a, b, 0.05, temperature)
        chunked = lambda a, b: clipped_forward_kl(a, b, 0.05, temperature, chunk_rows=4)
    else:
        beta = float(op[3:])
        dense = lambda a, b: generalized_jsd_dense(a, b, beta, temperature)
        chunked = lambda a, b: generalized_jsd(a, b, beta, temperature, chunk_rows=4)
    x = s.double().requires_grad_()
    ref = dense(x, t.double())
    (ref * w).sum().backward()
    y = s.clone().requires_grad_()
    out = chunked(y, t)
    (out * w.float()).sum().backward()
    assert out.dtype == torch.float32 and y.grad.dtype == torch.float32
    assert value_err(out, ref) < LARGE_TOL, value_err(out, ref)
    assert grad_err(y.grad, x.grad, ref) < LARGE_TOL, grad_err(y.grad, x.grad, ref)


@pytest.mark.parametrize("case", LARGE_CASES)
@pytest.mark.parametrize("temperature", LARGE_TEMPS)
def test_token_logprobs_large_logits_match_fp64(case, temperature):
    s, t, targets = large_logits(case)
    logits = t if case == "teacher_offset" else s   # the logits that carry the offset
    w = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(2), dtype=D) + 0.5
    x = logits.double().requires_grad_()
    ref = torch.log_softmax(x / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    y = logits.clone().requires_grad_()
    out = token_logprobs(y, targets, temperature)
    (out * w.float()).sum().backward()
    assert out.dtype == torch.float32
    assert value_err(out, ref) < LARGE_TOL, value_err(out, ref)
    assert grad_err(y.grad, x.grad, torch.zeros_like(ref)) < LARGE_TOL, grad_err(y.grad, x.grad, torch.zeros_like(ref))
    # bf16 logits are upcast exactly (no bf16 arithmetic)
    b = logits.to(torch.bfloat16)
    ref_b = torch.log_softmax(b.double() / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert value_err(token_logprobs(b, targets, temperature), ref_b) < LARGE_TOL


@pytest.mark.parametrize("fn", [generalized_jsd, clipped_forward_kl])
def test_bf16_backward_rounds_once(fn):
    """backward scales the stored bf16 gradient by the incoming per-row gradient in fp32 and rounds once:
    exactly (G.float() * w).to(bf16), not the triple-rounded bf16 product G * w.to(bf16)."""
    s, t = rand_logits(rows=16, vocab=200, std=4.0, seed=11)
    s, t = s.to(torch.bfloat16), t.to(torch.bfloat16)
    w = torch.rand(16, generator=torch.Generator().manual_seed(3)) * 3 + 0.1   # fp32, not bf16-representable
    a = s.clone().requires_grad_()
    fn(a, t, chunk_rows=5).sum().backward()       # grad_output = 1: the stored gradient G itself
    stored = a.grad
    b = s.clone().requires_grad_()
    (fn(b, t, chunk_rows=5) * w).sum().backward()
    assert b.grad.dtype == torch.bfloat16
    single = (stored.float() * w[:, None]).to(torch.bfloat16)
    triple = stored * w.to(torch.bfloat16)[:, None]
    assert torch.equal(b.grad, single)
    assert not torch.equal(single, triple)        # the case discriminates the two roundings
    # closer to the exact product of the stored gradient and the weights than the triple rounding
    exact = stored.double() * w.double()[:, None]
    err = lambda g: float((g.double() - exact).abs().sum())
    assert err(b.grad) < err(triple)
    ulp = lambda x: torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(x.abs().clamp(min=1e-30)))
    assert ((b.grad.double() - exact).abs() <= 0.5 * ulp(exact) * (1 + 1e-3)).all()   # rounded once
