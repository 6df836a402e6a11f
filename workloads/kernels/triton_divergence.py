"""The fused KD divergence as Triton kernels (CUDA): one program per selected row.

Forward, per row (two passes over the row, V in ``BLOCK`` slices, fp32 accumulation over any
input dtype): (1) the online log-sum-exp of the tempered student and teacher logits; (2) the
row's divergence ``D = sum_v f`` and the row sums ``A_s = sum_v f_s``, ``A_t = sum_v f_t`` of
the pointwise form (see ``workloads/divergences/__init__.py``). Only five fp32 numbers per row
are stored. Backward, per row, one pass: ``dD/ds = tau * g * (f_s - p * A_s)`` (and the same for
the teacher when it needs a gradient), written straight into the logits' gradient at the row's
index. No ``(rows, V)`` temporary is ever allocated.

The pointwise forms here are the Triton twins of the torch ones in the divergence files; the
tests check both against the autograd definition (``kd_divergence_reference``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["TRITON_KINDS", "triton_rows_forward", "triton_rows_backward"]

# divergence name -> the kernel's KIND code (skew variants take their alpha as an argument)
TRITON_KINDS = {"fkl": 0, "rkl": 1, "jsd": 2, "skew_kl": 3, "skew_rkl": 4}
_LOG2 = math.log(2.0)


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _pointwise(ls, lt, KIND: tl.constexpr, log_a, log_1ma):
    """(f, f_s, f_t) of one block of log-probabilities; see the divergence files."""
    if KIND == 0:  # fkl: f = q (lt - ls)
        q = tl.exp(lt)
        f = q * (lt - ls)
        f_s = -q
        f_t = f + q
    elif KIND == 1:  # rkl: f = p (ls - lt)
        p = tl.exp(ls)
        f = p * (ls - lt)
        f_s = f + p
        f_t = -p
    elif KIND == 2:  # jsd
        lm = _logaddexp(ls, lt) - 0.6931471805599453
        f_s = 0.5 * tl.exp(ls) * (ls - lm)
        f_t = 0.5 * tl.exp(lt) * (lt - lm)
        f = f_s + f_t
    elif KIND == 3:  # skew_kl: f = q (lt - log(a q + (1 - a) p))
        lmix = _logaddexp(lt + log_a, ls + log_1ma)
        q = tl.exp(lt)
        f = q * (lt - lmix)
        f_s = -q * tl.exp(ls + log_1ma - lmix)
        f_t = f + q - q * tl.exp(lt + log_a - lmix)
    else:  # skew_rkl: f = p (ls - log(a p + (1 - a) q))
        lmix = _logaddexp(ls + log_a, lt + log_1ma)
        p = tl.exp(ls)
        f = p * (ls - lmix)
        f_t = -p * tl.exp(lt + log_1ma - lmix)
        f_s = f + p - p * tl.exp(ls + log_a - lmix)
    return f, f_s, f_t


@triton.jit
def _forward_kernel(s_ptr, t_ptr, idx_ptr, stats_ptr, stride_s, stride_t, V, inv_tau,
                    log_a, log_1ma, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(idx_ptr + pid).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    # pass 1: online log-sum-exp of both rows (per lane, combined at the end)
    m_s = tl.full([BLOCK], -1e30, tl.float32)
    d_s = tl.zeros([BLOCK], tl.float32)
    m_t = tl.full([BLOCK], -1e30, tl.float32)
    d_t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        s = tl.load(s_row + cols, mask=ok, other=-float("inf")).to(tl.float32) * inv_tau
        t = tl.load(t_row + cols, mask=ok, other=-float("inf")).to(tl.float32) * inv_tau
        new_s = tl.maximum(m_s, s)
        d_s = d_s * tl.exp(m_s - new_s) + tl.exp(s - new_s)
        m_s = new_s
        new_t = tl.maximum(m_t, t)
        d_t = d_t * tl.exp(m_t - new_t) + tl.exp(t - new_t)
        m_t = new_t
    big_s = tl.max(m_s, 0)
    lse_s = big_s + tl.log(tl.sum(d_s * tl.exp(m_s - big_s), 0))
    big_t = tl.max(m_t, 0)
    lse_t = big_t + tl.log(tl.sum(d_t * tl.exp(m_t - big_t), 0))
    # pass 2: D and the row sums of the partials
    acc_f = tl.zeros([BLOCK], tl.float32)
    acc_s = tl.zeros([BLOCK], tl.float32)
    acc_t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        ls = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_s
        lt = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_t
        f, f_s, f_t = _pointwise(ls, lt, KIND, log_a, log_1ma)
        acc_f += tl.where(ok, f, 0.0)
        acc_s += tl.where(ok, f_s, 0.0)
        acc_t += tl.where(ok, f_t, 0.0)
    out = stats_ptr + pid * 5
    tl.store(out, tl.sum(acc_f, 0))
    tl.store(out + 1, lse_s)
    tl.store(out + 2, lse_t)
    tl.store(out + 3, tl.sum(acc_s, 0))
    tl.store(out + 4, tl.sum(acc_t, 0))


@triton.jit
def _backward_kernel(s_ptr, t_ptr, idx_ptr, stats_ptr, gs_ptr, gt_ptr, scale_ptr, stride_s,
                     stride_t, stride_gs, stride_gt, V, inv_tau, tau, log_a, log_1ma,
                     KIND: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(idx_ptr + pid).to(tl.int64)
    st = stats_ptr + pid * 5
    lse_s = tl.load(st + 1)
    lse_t = tl.load(st + 2)
    a_s = tl.load(st + 3)
    a_t = tl.load(st + 4)
    # d(tau^2 D(x / tau)) / dx = tau * dD/ds; the upstream gradient is read on the device
    scale = tl.load(scale_ptr).to(tl.float32) * tau
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        ls = tl.load(s_ptr + row * stride_s + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau
        lt = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau
        ls = ls - lse_s
        lt = lt - lse_t
        f, f_s, f_t = _pointwise(ls, lt, KIND, log_a, log_1ma)
        if NEED_S:
            g = scale * (f_s - tl.exp(ls) * a_s)
            tl.store(gs_ptr + row * stride_gs + cols, g.to(gs_ptr.dtype.element_ty), mask=ok)
        if NEED_T:
            g = scale * (f_t - tl.exp(lt) * a_t)
            tl.store(gt_ptr + row * stride_gt + cols, g.to(gt_ptr.dtype.element_ty), mask=ok)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


def _skew_logs(params: dict) -> tuple[float, float]:
    a = float(params.get("alpha", 0.0))
    return (math.log(a) if a > 0 else -1e30), math.log1p(-a)


def triton_rows_forward(s_flat: torch.Tensor, t_flat: torch.Tensor, idx: torch.Tensor,
                        kind: str, params: dict, temperature: float) -> torch.Tensor:
    """``(n, 5)`` fp32 stats of the selected rows: D, lse_s, lse_t, A_s, A_t."""
    n, V = idx.numel(), s_flat.shape[1]
    stats = torch.empty((n, 5), dtype=torch.float32, device=s_flat.device)
    if n:
        log_a, log_1ma = _skew_logs(params)
        _forward_kernel[(n,)](s_flat, t_flat, idx, stats, s_flat.stride(0), t_flat.stride(0), V,
                              1.0 / temperature, log_a, log_1ma, KIND=TRITON_KINDS[kind],
                              BLOCK=_block(V), num_warps=8)
    return stats


def triton_rows_backward(s_flat, t_flat, idx, stats, kind, params, temperature, scale,
                         gs_full, gt_full) -> None:
    """Write the selected rows' gradients into ``gs_full`` / ``gt_full`` (either may be None);
    ``scale`` is a 0-d tensor (the upstream gradient times the reduction's factor)."""
    n, V = idx.numel(), s_flat.shape[1]
    if not n:
        return
    log_a, log_1ma = _skew_logs(params)
    gs, gt = gs_full if gs_full is not None else s_flat, gt_full if gt_full is not None else t_flat
    _backward_kernel[(n,)](s_flat, t_flat, idx, stats, gs, gt, scale.float().reshape(1),
                           s_flat.stride(0), t_flat.stride(0), gs.stride(0), gt.stride(0), V,
                           1.0 / temperature, float(temperature), log_a, log_1ma,
                           KIND=TRITON_KINDS[kind], NEED_S=gs_full is not None,
                           NEED_T=gt_full is not None, BLOCK=_block(V), num_warps=8)
