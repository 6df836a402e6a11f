"""The fused KD divergence: a sum over selected rows of ``D(softmax(s / tau), softmax(t / tau))``
for a divergence with a pointwise form (``D = sum_v f(log p_s, log p_t)``, see
``workloads/divergences/__init__.py``).

Forward keeps five fp32 numbers per row (D, the two log-sum-exps, the row sums of f's partials
``A_s``, ``A_t``); backward needs no second reduction over the row:

    dD/ds_v = f_s(v) - p_v * A_s          (chain rule through log_softmax)

so each row is read twice in forward (log-sum-exp, then f) and once in backward, and nothing of
size ``(rows, V)`` outlives one block. On CUDA the built-in divergences run as Triton kernels
(``triton_divergence.py``, one program per row); elsewhere, and for a registered divergence
that has a pointwise form but no Triton twin, the same math runs in torch ``chunk`` rows at a
time. A divergence without a pointwise form is left to the chunked kernel (``chunked.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["FusedDivergence", "fused_backend", "triton_available", "compute_dtype",
           "tempered_rows"]

log = logging.getLogger(__name__)
_NOTED: set[str] = set()
_TRITON: bool | None = None


def triton_available() -> bool:
    """Triton imports and can build kernels (a CUDA device is present)."""
    global _TRITON
    if _TRITON is None:
        try:
            _TRITON = torch.cuda.is_available()
            if _TRITON:
                from workloads.kernels import triton_divergence  # noqa: F401
        except Exception:  # noqa: BLE001 - no triton, or one that does not match torch
            _TRITON = False
    return _TRITON


def fused_backend(div: Any, device: torch.device, dtype: torch.dtype,
                  prefer_closed_form: bool = False) -> str | None:
    """``"triton"``, ``"torch"`` or None: the caller runs the chunked kernel, because the
    divergence has no pointwise form (the log says so once per divergence) or, with
    ``prefer_closed_form`` off CUDA, because it registered closed-form ``grads``, which the
    chunked kernel runs faster on a CPU than the torch twin of the fused kernel (measured in
    ``benchmarks/kd_step_gpu.py --device cpu --small``)."""
    if div.pointwise is None:
        if div.name not in _NOTED:
            _NOTED.add(div.name)
            log.info("divergence %r has no pointwise form: it runs in the chunked kernel "
                     "(register pointwise= to fuse it)", div.name)
        return None
    on_triton = device.type == "cuda" and dtype != torch.float64 and triton_available()
    if prefer_closed_form and div.grads is not None and not on_triton:
        return None
    if on_triton:
        from workloads.kernels.triton_divergence import TRITON_KINDS

        if div.name in TRITON_KINDS:
            return "triton"
        if div.name not in _NOTED:
            _NOTED.add(div.name)
            log.info("divergence %r has no Triton kernel: it runs fused in torch", div.name)
    return "torch"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype KD math runs in: float32 for half precision and float32, float64 stays."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tempered_rows(flat: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh ``(C, V)`` copy of the selected rows in the compute dtype, divided by tau."""
    x = flat.index_select(0, rows)
    x = x.to(compute_dtype(flat)) if x.dtype != compute_dtype(flat) else x
    return x.div_(temperature) if temperature != 1.0 else x


def _torch_forward(s_flat, t_flat, idx, div, params, temperature, chunk):
    cdt = compute_dtype(s_flat)
    stats = torch.empty((idx.numel(), 5), dtype=cdt, device=s_flat.device)
    for i in range(0, idx.numel(), chunk):
        rows = idx[i : i + chunk]
        s, t = tempered_rows(s_flat, rows, temperature), tempered_rows(t_flat, rows, temperature)
        lse_s, lse_t = s.logsumexp(-1, keepdim=True), t.logsumexp(-1, keepdim=True)
        f, f_s, f_t = div.pointwise(s.sub_(lse_s), t.sub_(lse_t), **params)
        out = stats[i : i + chunk]
        out[:, 0], out[:, 1], out[:, 2] = f.sum(-1), lse_s[:, 0], lse_t[:, 0]
        out[:, 3], out[:, 4] = f_s.sum(-1), _rowsum(f_t)
    return stats


def _rowsum(x: Any) -> Any:
    return x.sum(-1) if isinstance(x, torch.Tensor) else x


def _torch_backward(s_flat, t_flat, idx, stats, div, params, temperature, chunk, scale,
                    gs_full, gt_full):
    scale = scale.to(stats.dtype) * temperature
    for i in range(0, idx.numel(), chunk):
        rows, st = idx[i : i + chunk], stats[i : i + chunk]
        ls = tempered_rows(s_flat, rows, temperature).sub_(st[:, 1:2])
        lt = tempered_rows(t_flat, rows, temperature).sub_(st[:, 2:3])
        _, f_s, f_t = div.pointwise(ls, lt, **params)
        if gs_full is not None:
            g = (f_s - ls.exp_() * st[:, 3:4]).mul_(scale)
            gs_full.index_copy_(0, rows, g.to(gs_full.dtype))
        if gt_full is not None:
            g = (f_t - lt.exp_() * st[:, 4:5]).mul_(scale)
            gt_full.index_copy_(0, rows, g.to(gt_full.dtype))


class FusedDivergence(torch.autograd.Function):
    """``tau**2 * sum over rows idx of D``; ``backend`` from :func:`fused_backend`.
    Once-differentiable (no double backward)."""

    @staticmethod
    def forward(ctx, s_flat, t_flat, idx, div, params, temperature, chunk, backend):
        if backend == "triton":
            from workloads.kernels.triton_divergence import triton_rows_forward

            stats = triton_rows_forward(s_flat, t_flat, idx, div.name, params, temperature)
        else:
            stats = _torch_forward(s_flat, t_flat, idx, div, params, temperature, chunk)
        ctx.save_for_backward(s_flat, t_flat, idx, stats)
        ctx.div, ctx.params, ctx.temperature = div, params, temperature
        ctx.chunk, ctx.backend = chunk, backend
        return stats[:, 0].sum() * temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        s_flat, t_flat, idx, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        contiguous = torch.contiguous_format
        gs_full = torch.zeros_like(s_flat, memory_format=contiguous) if need_s else None
        gt_full = torch.zeros_like(t_flat, memory_format=contiguous) if need_t else None
        if ctx.backend == "triton":
            from workloads.kernels.triton_divergence import triton_rows_backward

            triton_rows_backward(s_flat, t_flat, idx, stats, ctx.div.name, ctx.params,
                                 ctx.temperature, grad_out, gs_full, gt_full)
        else:
            _torch_backward(s_flat, t_flat, idx, stats, ctx.div, ctx.params, ctx.temperature,
                            ctx.chunk, grad_out, gs_full, gt_full)
        return gs_full, gt_full, None, None, None, None, None, None
