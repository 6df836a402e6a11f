"""Distillation losses: hand-computed values, identities, chunked == reference, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from workloads.losses import (
    align_vocab,
    kd_divergence,
    kd_divergence_reference,
    kd_objective,
    relation_kd_loss,
    relation_kd_loss_reference,
    response_kd_loss,
    response_mask,
    topk_kd_divergence,
    visual_kd_loss,
)

KINDS = ("fkl", "rkl", "jsd")
f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead, and on a shared 2-core machine they
    # made gradcheck ~30x slower. Restored afterwards for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rand(*shape, seed=0, scale=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=f64)).requires_grad_(grad)


def rand_mask(*shape, seed=0, p=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


# ---------------------------------------------------------------- hand-computed values

# Two classes: student logits (0, 0) -> p_s = (1/2, 1/2); teacher (ln 3, 0) -> p_t = (3/4, 1/4).
S2 = torch.tensor([[0.0, 0.0]], dtype=f64)
T2 = torch.tensor([[math.log(3.0), 0.0]], dtype=f64)
FKL = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
RKL = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
# m = (5/8, 3/8)
JSD = 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)) + 0.5 * (
    0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
)
HAND = {"fkl": FKL, "rkl": RKL, "jsd": JSD}


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_two_class_values_by_hand(kind, chunk_size):
    got = kd_divergence(S2, T2, kind=kind, chunk_size=chunk_size)
    assert got.item() == pytest.approx(HAND[kind], rel=1e-12)


def test_forward_and_reverse_kl_differ_on_asymmetric_case():
    assert FKL == pytest.approx(0.1308120, abs=1e-6) and RKL == pytest.approx(0.1438410, abs=1e-6)
    fkl = kd_divergence(S2, T2, kind="fkl")
    rkl = kd_divergence(S2, T2, kind="rkl")
    assert abs(fkl.item() - rkl.item()) > 1e-2
    # Swapping the roles turns one into the other.
    assert kd_divergence(T2, S2, kind="rkl").item() == pytest.approx(fkl.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_equal_distributions(kind):
    x = rand(2, 5, 9)
    for chunk_size in (None, 3):
        assert kd_divergence(x, x.clone(), kind=kind, chunk_size=chunk_size).abs().item() < 1e-12
        # Logits that differ by a per-position constant give the same distribution.
        shifted = x + torch.arange(10, dtype=f64).reshape(2, 5, 1)
        assert kd_divergence(x, shifted, kind=kind, chunk_size=chunk_size).abs().item() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_divides_logits_and_scales_by_tau_squared(kind):
    # softmax((2 * z) / 2) == softmax(z), so the value is exactly 4x the tau=1 value on z.
    got = kd_divergence(2 * S2, 2 * T2, kind=kind, temperature=2.0)
    assert got.item() == pytest.approx(4 * HAND[kind], rel=1e-12)
    s, t = rand(3, 7, seed=1), rand(3, 7, seed=2)
    assert not torch.isclose(kd_divergence(s, t, temperature=2.0), 4 * kd_divergence(s, t))


def test_jsd_is_symmetric_and_bounded_by_log2():
    s, t = rand(4, 6, seed=1, scale=20), rand(4, 6, seed=2, scale=20)
    a, b = kd_divergence(s, t, kind="jsd"), kd_divergence(t, s, kind="jsd")
    assert torch.allclose(a, b) and 0 < a.item() <= math.log(2)


# ------------------------------------------------------------- chunked == reference


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_reference_values_and_grads(kind):
    mask = rand_mask(3, 11, seed=3)  # N = mask.sum() is not a multiple of most chunk sizes
    for tau in (1.0, 2.5):
        s_ref, t_ref = rand(3, 11, 13, seed=1, grad=True), rand(3, 11, 13, seed=2, grad=True)
        ref = kd_divergence_reference(s_ref, t_ref, mask, kind, tau)
        ref.backward()
        for chunk_size in (1, 3, 7, int(mask.sum()), 1000):
            s, t = s_ref.detach().clone().requires_grad_(), t_ref.detach().clone().requires_grad_()
            got = kd_divergence(s, t, mask, kind, tau, chunk_size=chunk_size)
            got.backward()
            assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
            assert torch.allclose(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)
            assert torch.allclose(t.grad, t_ref.grad, rtol=1e-10, atol=1e-14)


def test_sum_reduction_and_flat_inputs():
    s, t, mask = rand(2, 6, 5, seed=1), rand(2, 6, 5, seed=2), rand_mask(2, 6)
    mean = kd_divergence(s, t, mask)
    total = kd_divergence(s, t, mask, reduction="sum")
    assert torch.allclose(total, mean * mask.sum())
    flat = kd_divergence(s.reshape(12, 5), t.reshape(12, 5), mask.reshape(12))
    assert torch.allclose(flat, mean)


def test_half_precision_inputs_compute_in_float32():
    s = rand(2, 4, 10, seed=1).to(torch.bfloat16).requires_grad_()
    t = rand(2, 4, 10, seed=2).to(torch.bfloat16)
    loss = kd_divergence(s, t)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert torch.allclose(loss, kd_divergence_reference(s.float(), t.float()), rtol=1e-5)


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_divergences(kind):
    s, t = rand(2, 3, 4, seed=1, grad=True), rand(2, 3, 4, seed=2, grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda a, b: kd_divergence(a, b, mask, kind, 1.7, 2), (s, t))


def test_gradcheck_response_visual_topk():
    s, t = rand(2, 3, 4, seed=1, grad=True), rand(2, 3, 4, seed=2, grad=True)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    gradcheck = torch.autograd.gradcheck
    assert gradcheck(lambda a, b: response_kd_loss(a, b, labels, kind="rkl", chunk_size=1), (s, t))
    assert gradcheck(lambda a, b: visual_kd_loss(a, b, mask, kind="jsd", chunk_size=2), (s, t))
    values, indices = rand(2, 3, 3, seed=5, grad=True), torch.tensor([2, 0, 3]).expand(2, 3, 3)
    assert gradcheck(lambda a, v: topk_kd_divergence(a, v, indices, mask, "fkl", 1.5), (s, values))


def test_gradcheck_relation_and_objective():
    s, t = rand(2, 5, 4, seed=1, grad=True), rand(2, 5, 4, seed=2, grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:4] = mask[1, 2:5] = True
    gradcheck = torch.autograd.gradcheck
    assert gradcheck(lambda a, b: relation_kd_loss(a, b, mask, vocab_chunk=3), (s, t))
    terms = [rand(1, seed=i, grad=True).squeeze() for i in range(4)]
    assert torch.autograd.gradcheck(lambda *x: kd_objective(*x)[0], terms)


# -------------------------------------------------------------------------- masking


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_out_positions_do_not_matter(chunk_size):
    s, t, mask = rand(2, 7, 6, seed=1), rand(2, 7, 6, seed=2), rand_mask(2, 7, seed=5)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e3 * rand(int((~mask).sum()), 6, seed=9)
    t2[~mask] = -7.0
    s.requires_grad_(), s2.requires_grad_()
    a = kd_divergence(s, t, mask, chunk_size=chunk_size)
    b = kd_divergence(s2, t2, mask, chunk_size=chunk_size)
    a.backward(), b.backward()
    assert torch.allclose(a, b)
    assert torch.allclose(s.grad, s2.grad) and (s.grad[~mask] == 0).all()


def test_response_mask_follows_hf_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    # logits at t predict labels[t + 1]; the last position never counts.
    expected = torch.tensor([[False, True, True, False, False], [True, True, True, True, False]])
    assert torch.equal(response_mask(labels), expected)
    assert torch.equal(response_mask(labels, labels_shifted=True), labels != -100)


def test_response_kd_loss_matches_explicit_shift():
    s, t = rand(2, 5, 8, seed=1), rand(2, 5, 8, seed=2)
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    keep = labels[:, 1:] != -100
    explicit = kd_divergence_reference(s[:, :-1][keep], t[:, :-1][keep])
    assert torch.allclose(response_kd_loss(s, t, labels, chunk_size=2), explicit)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    assert torch.allclose(response_kd_loss(s, t, shifted, labels_shifted=True), explicit)


def test_text_only_sample_adds_nothing_to_visual_and_relation_losses():
    s, t = rand(2, 8, 10, seed=1), rand(2, 8, 10, seed=2)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 2:6] = True  # sample 1 is text-only
    s2, t2 = s.clone(), t.clone()
    s2[1], t2[1] = rand(8, 10, seed=7), rand(8, 10, seed=8)
    for loss in (visual_kd_loss, relation_kd_loss):
        full = loss(s, t, mask)
        assert torch.allclose(full, loss(s[:1], t[:1], mask[:1]))
        assert torch.allclose(full, loss(s2, t2, mask))
    assert torch.allclose(visual_kd_loss(s, t, mask), kd_divergence_reference(s[0, 2:6], t[0, 2:6]))


def test_two_images_per_sample():
    s, t = rand(2, 12, 9, seed=1), rand(2, 12, 9, seed=2)
    ids = torch.full((2, 12), -1)
    ids[0, 1:4], ids[0, 6:9], ids[1, 2:5] = 0, 1, 0
    images = [(0, slice(1, 4)), (0, slice(6, 9)), (1, slice(2, 5))]
    ref = relation_kd_loss_reference(
        [s[b, sl] for b, sl in images], [t[b, sl] for b, sl in images]
    )
    assert torch.allclose(relation_kd_loss(s, t, ids, vocab_chunk=4), ref)
    assert torch.allclose(relation_kd_loss(s, t, ids >= 0, tokens_per_image=3), ref)
    per_image = [s[b, sl] for b, sl in images], [t[b, sl] for b, sl in images]
    assert torch.allclose(relation_kd_loss(*per_image), ref)
    # One image per sample when the bool mask has no tokens_per_image: different grouping.
    assert not torch.allclose(relation_kd_loss(s, t, ids >= 0), ref)
    with pytest.raises(ValueError, match="multiple of tokens_per_image"):
        relation_kd_loss(s, t, ids >= 0, tokens_per_image=4)
    # L_vis counts every image token once, whatever the grouping.
    assert torch.allclose(visual_kd_loss(s, t, ids), visual_kd_loss(s, t, ids >= 0))


def test_all_masked_is_exactly_zero_with_zero_grads():
    s, t = rand(2, 4, 6, seed=1, grad=True), rand(2, 4, 6, seed=2)
    none = torch.zeros(2, 4, dtype=torch.bool)
    losses = [
        kd_divergence(s, t, none),
        kd_divergence(s, t, none, chunk_size=None),
        response_kd_loss(s, t, torch.full((2, 4), -100)),
        visual_kd_loss(s, t, none),
        relation_kd_loss(s, t, none),
        topk_kd_divergence(s, t[..., :3], torch.zeros(2, 4, 3, dtype=torch.long), none),
    ]
    for loss in losses:
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all() and (grad == 0).all()


# ------------------------------------------------------------------------ vocabulary


def test_align_vocab_slices_padded_rows_and_matches_unpadded():
    s, t = rand(2, 3, 10, seed=1), rand(2, 3, 12, seed=2)
    s_al, t_al = align_vocab(s, t, 8)
    assert s_al.shape == t_al.shape == (2, 3, 8)
    s.requires_grad_()
    got = kd_divergence(*align_vocab(s, t, 8), chunk_size=2)  # non-contiguous views work
    (grad,) = torch.autograd.grad(got, s)
    s8 = s.detach()[..., :8].clone().requires_grad_()
    ref = kd_divergence_reference(s8, t[..., :8].contiguous())
    (grad_ref,) = torch.autograd.grad(ref, s8)
    assert torch.allclose(got, ref) and torch.allclose(grad[..., :8], grad_ref)
    assert (grad[..., 8:] == 0).all()  # padded rows get no gradient


def test_vocab_mismatch_raises_helpful_errors():
    s, t = rand(2, 3, 10), rand(2, 3, 12)
    with pytest.raises(ValueError, match="align_vocab"):
        kd_divergence(s, t)
    with pytest.raises(ValueError, match=r"has 10 vocab entries|have 10 vocab entries"):
        align_vocab(s, t, 11)
    with pytest.raises(ValueError, match="differ outside the vocab dim"):
        align_vocab(s, rand(2, 4, 12), 10)
    with pytest.raises(ValueError, match="same shape"):
        kd_divergence(s, rand(2, 4, 10))
    with pytest.raises(ValueError, match="mask shape"):
        kd_divergence(s, s.clone(), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown divergence kind"):
        kd_divergence(s, s.clone(), kind="kl")


# -------------------------------------------------------------------------- relation


def test_relation_loss_is_scale_invariant_and_positive_otherwise():
    t, mask = rand(2, 6, 9, seed=2), torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1:5] = True
    for c in (1.0, 0.3, 7.0):
        assert relation_kd_loss(c * t, t, mask).abs().item() < 1e-12
    assert relation_kd_loss(rand(2, 6, 9, seed=1), t, mask).item() > 1e-3


def test_relation_loss_by_hand():
    # Z_s = I (Gram I), Z_t = [[1, 1], [0, 0]] (Gram [[2, 0], [0, 0]]): cos = 2 / (sqrt(2) * 2).
    zs = torch.eye(2, dtype=f64)
    zt = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=f64)
    assert relation_kd_loss([zs], [zt]).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-12)


def test_relation_chunked_over_vocab_equals_reference():
    s, t = rand(2, 9, 23, seed=1, grad=True), rand(2, 9, 23, seed=2)
    mask = rand_mask(2, 9, seed=6, p=0.7)
    images = [s[b][mask[b]] for b in range(2)], [t[b][mask[b]] for b in range(2)]
    ref = relation_kd_loss_reference(*images)
    (g_ref,) = torch.autograd.grad(ref, s)
    for vocab_chunk in (1, 5, 23, 100):
        got = relation_kd_loss(s, t, mask, vocab_chunk=vocab_chunk)
        (g,) = torch.autograd.grad(got, s)
        assert torch.allclose(got, ref, rtol=1e-12) and torch.allclose(g, g_ref, rtol=1e-10)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_vocab_is_full_divergence(kind):
    s, t, mask = rand(2, 5, 7, seed=1), rand(2, 5, 7, seed=2), rand_mask(2, 5, seed=7)
    values, indices = t.topk(7, dim=-1)  # sorted: a permutation of the vocabulary
    for tau in (1.0, 3.0):
        full = kd_divergence(s, t, mask, kind, tau)
        assert torch.allclose(topk_kd_divergence(s, values, indices, mask, kind, tau), full)


def test_topk_renormalizes_student_on_teacher_support():
    s, t = rand(3, 8, seed=1), rand(3, 8, seed=2)
    values, indices = t.topk(3, dim=-1)
    expected = kd_divergence_reference(s.gather(1, indices), values)
    assert torch.allclose(topk_kd_divergence(s, values, indices), expected)
    with pytest.raises(ValueError, match="must lie in"):
        topk_kd_divergence(s, values, indices + 8)


# ------------------------------------------------------------------------- objective


def test_kd_objective_weights_and_terms():
    ce, res, vis, rel = (torch.tensor(v) for v in (2.0, 0.5, 0.25, 0.4))
    total, terms = kd_objective(ce, res, vis, rel)  # paper defaults 1, 1, 0.5
    assert total.item() == pytest.approx(2.0 + 0.5 + 0.25 + 0.2)
    assert set(terms) == {"loss", "ce", "l_res", "l_vis", "l_rel"}
    total, terms = kd_objective(ce, res, None, rel, alpha=2.0, gamma=1.0)
    assert total.item() == pytest.approx(2.0 + 1.0 + 0.4) and "l_vis" not in terms
