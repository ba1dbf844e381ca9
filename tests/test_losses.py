"""Loss functions against fp64 references: finite differences, closed forms, chunked == dense."""

import math

import pytest
import torch

from nemo_sdsearch.losses.divergences import (clipped_forward_kl, clipped_forward_kl_dense, generalized_jsd,
                                              generalized_jsd_dense)
from nemo_sdsearch.losses.policy import group_advantages, grpo_surrogate, k3_kl

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


def test_grpo_surrogate_and_clip():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=D)).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.5]], dtype=D))
    adv = torch.tensor([1.0, -1.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_surrogate(logp, old, adv, mask, clip_eps=0.2)
    # Token 0: ratio 2 clipped to 1.2 for A > 0; token 1: ratio 1; row 2 token 0: ratio 1, A = -1.
    assert loss.item() == pytest.approx(-(1.2 + 1.0 - 1.0) / 3)
    assert stats.clip_fraction == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-1 / 3) and logp.grad[1, 1] == 0
    seq, _ = grpo_surrogate(logp.detach(), old, adv, mask, reduction="sequence")
    assert seq.item() == pytest.approx(-((1.2 + 1.0) / 2 - 1.0) / 2)
    finite_difference_check(lambda x: grpo_surrogate(x, old, adv, mask)[0][None], logp.detach() + 0.01)


def test_k3_kl():
    logp = torch.log(torch.tensor([[0.2, 0.7]], dtype=D))
    ref = torch.log(torch.tensor([[0.4, 0.7]], dtype=D))
    r = ref - logp
    assert k3_kl(logp, ref, torch.ones(1, 2)).item() == pytest.approx(((r.exp() - r - 1).sum() / 2).item())
    assert k3_kl(ref, ref, torch.ones(1, 2)).item() == 0.0
    finite_difference_check(lambda x: k3_kl(x, ref, torch.ones(1, 2))[None], logp)


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
