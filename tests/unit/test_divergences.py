"""The KD divergence registry: skew-KL against a direct computation, every registered divergence
chunked == its unchunked autograd reference, the autograd fallback of the chunked kernel, and
the `divergence:` config shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workloads.divergences import (DIVERGENCES, DivergenceSpec, UnknownDivergenceError,
                                   list_divergences, register_divergence, resolve_divergence)
from workloads.losses import (kd_divergence, kd_divergence_reference, response_kd_loss,
                              topk_kd_divergence)

f64 = torch.float64
# every registered divergence, with non-default parameters where it has any
SPECS = [{"name": d.name, "alpha": 0.3} if d.name.startswith("skew") else d.name
         for d in list_divergences()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rand(*shape, seed=0, scale=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=f64)).requires_grad_(grad)


def rand_mask(*shape, seed=0, p=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def skew_by_hand(s, t, mask, alpha, tau, reverse=False):
    """Mean over masked positions of tau² · KL(p || a p + (1 − a) q), from probabilities:
    p = p_t, q = p_s for skew_kl; p = p_s, q = p_t for skew_rkl."""
    ps = _softmax(s.detach().numpy()[mask.numpy()] / tau)
    pt = _softmax(t.detach().numpy()[mask.numpy()] / tau)
    p, q = (ps, pt) if reverse else (pt, ps)
    m = alpha * p + (1 - alpha) * q
    return tau**2 * np.mean(np.sum(p * np.log(p / m), axis=-1))


# ---- the registry --------------------------------------------------------------------------

def test_registry_holds_the_builtins_and_skew():
    assert {"fkl", "rkl", "jsd", "skew_kl", "skew_rkl"} <= set(DIVERGENCES)
    closed = {d.name for d in list_divergences() if d.grads is not None}
    assert {"fkl", "rkl", "jsd"} <= closed and "skew_kl" not in closed  # skew: autograd


@pytest.mark.parametrize("call", [
    lambda s, kind: kd_divergence(s, s.clone(), kind=kind),
    lambda s, kind: kd_divergence(s, s.clone(), kind=kind, chunk_size=None),
    lambda s, kind: topk_kd_divergence(s, s[:, :2].clone(), torch.tensor([[0, 1]] * 3),
                                       kind=kind),
])
def test_unknown_kind_is_an_error_listing_the_registered_ones(call):
    s = rand(3, 5)
    for kind in ("kl", {"name": "kl"}):
        with pytest.raises(UnknownDivergenceError, match=r"unknown divergence kind 'kl'; "
                                                         r"registered: fkl, jsd, rkl, skew_kl"):
            call(s, kind)
    with pytest.raises(UnknownDivergenceError, match="needs `name`"):
        call(s, {"alpha": 0.1})


# ---- skew-KL golden values -----------------------------------------------------------------

def test_skew_kl_two_classes_by_hand():
    # p_s = (1/2, 1/2), p_t = (3/4, 1/4), a = 0.1:
    #   skew_kl  m = .1 p_t + .9 p_s = (.525, .475);  skew_rkl  m' = .1 p_s + .9 p_t = (.725, .275)
    s = torch.tensor([[0.0, 0.0]], dtype=f64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=f64)
    skl = 0.75 * math.log(0.75 / 0.525) + 0.25 * math.log(0.25 / 0.475)
    srkl = 0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.5 / 0.275)
    for chunk_size in (None, 1):
        assert kd_divergence(s, t, kind="skew_kl", chunk_size=chunk_size).item() == \
            pytest.approx(skl, rel=1e-12)  # alpha defaults to DistiLLM's 0.1
        assert kd_divergence(s, t, kind="skew_rkl", chunk_size=chunk_size).item() == \
            pytest.approx(srkl, rel=1e-12)


@pytest.mark.parametrize("name,reverse", [("skew_kl", False), ("skew_rkl", True)])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_skew_matches_a_direct_computation(name, reverse, alpha, tau):
    s, t, mask = rand(2, 9, 17, seed=1), rand(2, 9, 17, seed=2), rand_mask(2, 9, seed=3)
    want = skew_by_hand(s, t, mask, alpha, tau, reverse)
    kind = {"name": name, "alpha": alpha}
    for chunk_size in (None, 1, 4):
        got = kd_divergence(s, t, mask, kind, tau, chunk_size=chunk_size)
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_skew_at_alpha_zero_is_plain_kl():
    s, t, mask = rand(3, 7, 11, seed=4), rand(3, 7, 11, seed=5), rand_mask(3, 7, seed=6)
    for skew, plain in (("skew_kl", "fkl"), ("skew_rkl", "rkl")):
        got = kd_divergence(s, t, mask, {"name": skew, "alpha": 0.0}, 1.5)
        assert torch.allclose(got, kd_divergence(s, t, mask, plain, 1.5), rtol=1e-12)


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_zero_for_equal_logits(kind):
    x = rand(2, 6, 9, seed=7)
    for chunk_size in (None, 4):
        assert kd_divergence(x, x.clone(), kind=kind, chunk_size=chunk_size).abs().item() < 1e-12
        shifted = x + 3.0  # softmax is shift invariant
        assert kd_divergence(x, shifted, kind=kind, chunk_size=chunk_size).abs().item() < 1e-12


# ---- chunked kernel == unchunked autograd reference, for every registered divergence ------

def _check_chunked_equals_reference(kind):
    mask = rand_mask(3, 11, seed=3)  # N is not a multiple of most chunk sizes
    for tau in (1.0, 2.5):
        s_ref, t_ref = rand(3, 11, 13, seed=1, grad=True), rand(3, 11, 13, seed=2, grad=True)
        ref = kd_divergence_reference(s_ref, t_ref, mask, kind, tau)
        ref.backward()
        for chunk_size in (1, 3, int(mask.sum()), 1000):
            s, t = s_ref.detach().clone().requires_grad_(), t_ref.detach().clone().requires_grad_()
            got = kd_divergence(s, t, mask, kind, tau, chunk_size=chunk_size)
            got.backward()
            assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
            assert torch.allclose(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)
            assert torch.allclose(t.grad, t_ref.grad, rtol=1e-10, atol=1e-14)
        # only one side needs a gradient (the teacher is detached in training)
        s = s_ref.detach().clone().requires_grad_()
        kd_divergence(s, t_ref.detach(), mask, kind, tau, chunk_size=4).backward()
        assert torch.allclose(s.grad, s_ref.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", SPECS, ids=str)
def test_chunked_equals_reference_for_every_registered_divergence(kind):
    _check_chunked_equals_reference(kind)


@pytest.fixture
def autograd_twins():
    """fkl/rkl/jsd registered again without their closed forms: the chunked kernel then takes
    the autograd path on the same ``rows``."""
    names = []
    for name in ("fkl", "rkl", "jsd"):
        div = DIVERGENCES[name]
        register_divergence(f"test_{name}_autograd", div.rows, None, div.params)
        names.append(name)
    yield names
    for name in names:
        DIVERGENCES.pop(f"test_{name}_autograd")


def test_autograd_fallback_equals_the_closed_forms(autograd_twins):
    mask = rand_mask(2, 8, seed=9)
    for name in autograd_twins:
        _check_chunked_equals_reference(f"test_{name}_autograd")
        s1, t1 = rand(2, 8, 10, seed=10, grad=True), rand(2, 8, 10, seed=11, grad=True)
        s2, t2 = (x.detach().clone().requires_grad_() for x in (s1, t1))
        a = kd_divergence(s1, t1, mask, name, 1.7, chunk_size=3)
        b = kd_divergence(s2, t2, mask, f"test_{name}_autograd", 1.7, chunk_size=3)
        a.backward(), b.backward()
        assert torch.allclose(a, b, rtol=1e-12)
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(t1.grad, t2.grad, rtol=1e-10, atol=1e-14)


def test_gradcheck_skew_through_the_chunked_kernel():
    s, t, mask = rand(2, 4, 5, seed=12, grad=True), rand(2, 4, 5, seed=13, grad=True), \
        rand_mask(2, 4, seed=14)
    for name in ("skew_kl", "skew_rkl"):
        kind = {"name": name, "alpha": 0.2}
        assert torch.autograd.gradcheck(lambda a, b: kd_divergence(a, b, mask, kind, 1.3, 2),
                                        (s, t))


def test_half_precision_skew_computes_in_float32_and_returns_input_grads():
    s = rand(2, 5, 7, seed=15).to(torch.bfloat16).requires_grad_()
    t = rand(2, 5, 7, seed=16).to(torch.bfloat16)
    got = kd_divergence(s, t, kind="skew_kl", chunk_size=3)
    assert got.dtype == torch.float32
    got.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


# ---- the config shape: `divergence: fkl` or `divergence: {name: skew_kl, alpha: 0.1}` -----

def test_spec_accepts_a_name_or_a_mapping_and_fills_defaults():
    assert DivergenceSpec.model_validate("skew_kl").model_dump() == {"name": "skew_kl",
                                                                    "alpha": 0.1}
    spec = DivergenceSpec.model_validate({"name": "skew_rkl", "alpha": 0.25})
    assert spec.params == {"alpha": 0.25} and spec.divergence is DIVERGENCES["skew_rkl"]
    assert DivergenceSpec.model_validate("fkl").model_dump() == {"name": "fkl"}
    div, params = resolve_divergence(spec)
    assert div.name == "skew_rkl" and params == {"alpha": 0.25}
    s, t, labels = rand(2, 6, 9, seed=17), rand(2, 6, 9, seed=18), torch.full((2, 6), 1)
    assert torch.equal(response_kd_loss(s, t, labels, kind=spec),
                       response_kd_loss(s, t, labels, kind={"name": "skew_rkl", "alpha": 0.25}))


@pytest.mark.parametrize("data,loc,message", [
    ({"name": "skew_kl", "alpha": 1.0}, ("alpha",), "divergence 'skew_kl': Input should be less "
                                                    "than 1"),
    ({"name": "fkl", "alpha": 0.1}, ("alpha",), "divergence 'fkl' has no parameter 'alpha' "
                                                "(its parameters: none)"),
    ({"name": "skew_kl", "beta": 0.1}, ("beta",), "divergence 'skew_kl' has no parameter 'beta' "
                                                  "(its parameters: alpha)"),
    ({"name": "kl"}, ("name",), "unknown divergence kind 'kl'; registered: fkl, jsd, rkl"),
])
def test_spec_errors_name_the_divergence_and_the_field(data, loc, message):
    with pytest.raises(ValidationError) as e:
        DivergenceSpec.model_validate(data)
    (err,) = e.value.errors()
    assert err["loc"] == loc and message in err["msg"]


def test_distill_config_takes_the_divergence_and_mmkd_validate_points_at_it():
    from orchestrator.loader import load_pipeline
    from orchestrator.spec import PipelineError
    from workloads.distill import DistillConfig

    assert DistillConfig(max_steps=1).divergence.name == "fkl"
    cfg = DistillConfig(max_steps=1, divergence={"name": "skew_kl", "alpha": 0.2})
    assert DistillConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    pipe = load_pipeline("pipelines/llava_kd.yaml",
                         ["stages.student_dft.params.divergence={name: skew_kl, alpha: 0.2}"])
    assert pipe.stages["student_dft"].params["divergence"] == {"name": "skew_kl", "alpha": 0.2}
    with pytest.raises(PipelineError) as e:
        load_pipeline("pipelines/llava_kd.yaml",
                      ["stages.student_dft.params.divergence={name: skew_kl, alpha: 2}"])
    text = str(e.value)
    assert "stage 'student_dft'" in text
    assert "'stages.student_dft.params.divergence.alpha'" in text and "'skew_kl'" in text

