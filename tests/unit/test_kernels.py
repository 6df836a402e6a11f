"""The fused KD kernels against the autograd reference (``kd_divergence_reference``): values and
gradients, every divergence with a pointwise form, fp64/fp32/bf16, odd shapes, temperatures,
masks that select nothing, a vocabulary that is not a multiple of the block.

The Triton kernels run on CUDA where a GPU is present, and under Triton's interpreter on CPU
(``TRITON_INTERPRET=1``, set here before Triton is imported), so CI checks the same kernel code
on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of triton in this process
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workloads import losses  # noqa: E402
from workloads.divergences import list_divergences, resolve_divergence  # noqa: E402

KINDS = ["fkl", "rkl", "jsd", {"name": "skew_kl", "alpha": 0.1},
         {"name": "skew_rkl", "alpha": 0.3}, {"name": "skew_kl", "alpha": 0.0}]
DEVICE = "cuda" if CUDA else "cpu"


def _name(kind) -> str:
    return kind if isinstance(kind, str) else f"{kind['name']}-{kind['alpha']}"


def _value_and_grads(kind, s, t, mask, temperature, reduction, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    if kw.get("reference"):
        v = losses.kd_divergence_reference(s, t, mask, kind, temperature, reduction)
    else:
        v = losses.kd_divergence(s, t, mask, kind, temperature, reduction=reduction, **kw)
    (v * 1.7).backward()  # an upstream gradient that is not 1
    return v.detach().double(), s.grad.double(), t.grad.double()


def _assert_close(got, want, dtype):
    # bf16 inputs: the gradient is written back in bf16 (8 mantissa bits)
    rtol, atol = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-6),
                  torch.bfloat16: (2e-2, 2e-5)}[dtype]
    for g, w, what in zip(got, want, ("value", "student grad", "teacher grad")):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_every_builtin_divergence_has_a_pointwise_form():
    names = {d.name for d in list_divergences() if d.pointwise is not None}
    assert {"fkl", "rkl", "jsd", "skew_kl", "skew_rkl"} <= names


@pytest.mark.parametrize("kind", KINDS, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_fused_torch_path_equals_reference(kind, dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 7, 101, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 7, 101, generator=g) * 3).to(dtype)
    mask = torch.rand(3, 7, generator=g) > 0.4
    for temperature, reduction in ((1.0, "mean"), (2.0, "sum")):
        want = _value_and_grads(kind, s, t, mask, temperature, reduction, reference=True)
        got = _value_and_grads(kind, s, t, mask, temperature, reduction, kernel="fused",
                               chunk_size=4)
        _assert_close(got, want, dtype)


def test_fused_kernel_with_no_selected_rows_is_zero_with_zero_grads():
    s = torch.randn(2, 5, 33, requires_grad=True)
    t = torch.randn(2, 5, 33)
    v = losses.kd_divergence(s, t, torch.zeros(2, 5, dtype=torch.bool), "jsd", kernel="fused")
    v.backward()
    assert float(v) == 0.0 and torch.count_nonzero(s.grad) == 0


def test_divergence_without_pointwise_form_falls_back_to_the_chunked_kernel(caplog):
    from workloads.divergences import Divergence
    from workloads.kernels import fused_backend

    fkl = resolve_divergence("fkl")[0]
    plain = Divergence("plain_kl_test", fkl.rows)
    with caplog.at_level("INFO", logger="workloads.kernels.fused_divergence"):
        assert fused_backend(plain, torch.device("cpu"), torch.float32) is None
        assert fused_backend(plain, torch.device("cpu"), torch.float32) is None
    assert sum("no pointwise form" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------- Triton kernels


def _triton():
    try:
        from workloads.kernels import triton_divergence
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"triton is part of the test install (scripts/install.sh): {e}")
        pytest.skip(f"triton is not installed: {e}")
    return triton_divergence


@pytest.mark.parametrize("kind", KINDS, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("V", [37, 5000], ids=lambda v: f"V{v}")
def test_triton_kernel_equals_reference(kind, dtype, V):
    """Rows selected out of order, a padded (strided) vocabulary, tau = 2, and student and
    teacher gradients both requested."""
    td = _triton()
    div, params = resolve_divergence(kind)
    g = torch.Generator().manual_seed(V)
    full = (torch.randn(2, 9, V + 3, generator=g) * 3).to(dtype)
    s, t = full[0].to(DEVICE)[:, :V], full[1].to(DEVICE)[:, :V]  # stride V + 3
    idx = torch.tensor([8, 0, 3, 4], device=DEVICE)
    stats = td.triton_rows_forward(s, t, idx, div.name, params, 2.0)
    gs, gt = torch.zeros_like(s), torch.zeros_like(t)
    td.triton_rows_backward(s, t, idx, stats, div.name, params, 2.0,
                            torch.tensor(1.7, device=DEVICE), gs, gt)
    mask = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    mask[idx] = True
    want = _value_and_grads(kind, s.float(), t.float(), mask, 2.0, "sum", reference=True)
    got = ((stats[:, 0].sum() * 4.0).double(), gs.double() / 1.0, gt.double())
    # the kernel's gradient carries the upstream 1.7, the reference's too (via backward)
    _assert_close(got, want, dtype if dtype != torch.float32 else torch.float32)
    assert torch.count_nonzero(gs[1]) == 0, "rows not selected keep a zero gradient"


@pytest.mark.skipif(not CUDA, reason="the dispatch to Triton happens on CUDA tensors only")
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_kd_divergence_dispatches_to_triton_on_cuda(kind):
    _triton()
    from workloads.kernels import fused_backend

    div, _ = resolve_divergence(kind)
    assert fused_backend(div, torch.device("cuda"), torch.bfloat16) == "triton"
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 64, 3001, generator=g) * 2).to(DEVICE, torch.bfloat16)
    t = (torch.randn(4, 64, 3001, generator=g) * 2).to(DEVICE, torch.bfloat16)
    mask = (torch.rand(4, 64, generator=g) > 0.5).to(DEVICE)
    want = _value_and_grads(kind, s, t, mask, 1.0, "mean", reference=True)
    got = _value_and_grads(kind, s, t, mask, 1.0, "mean")
    _assert_close(got, want, torch.bfloat16)
