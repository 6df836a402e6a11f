"""The chunked KD kernel: a registered divergence over the selected rows of ``(B, T, V)`` logits
(``kd_divergence``), its unchunked autograd reference (``kd_divergence_reference``), and the
divergence against stored top-k teacher logits (``topk_kd_divergence``).

Conventions (``workloads/losses.py`` gives the whole list):

* Divergences are between next-token distributions ``softmax(logits / tau)`` at one position,
  named by ``kind``: a divergence of the registry in ``workloads/divergences/``, optionally
  with its parameters (``{"name": "skew_kl", "alpha": 0.1}``). Every value is scaled by
  ``tau**2`` (Hinton et al.) so its gradient scale does not depend on tau. ``reduction="mean"``
  averages over the selected positions of the whole batch; nothing selected gives exactly 0
  with a graph, never NaN.
* Math runs in float32 for half-precision inputs; gradients come back in the input's dtype.
* The chunked path never materializes full ``(B, T, V)`` temporaries: a custom autograd
  Function gathers ``chunk_size`` selected rows at a time in forward and recomputes them in
  backward (the divergence's closed-form gradients; autograd on the chunk for a divergence
  that registered none), so the only full-size allocation is the logits' own gradient.
  ``torch.utils.checkpoint`` per chunk was measured and rejected: each chunk's gather backward
  allocates a full-size zero gradient (about 3x the memory and 1.6x the time). See
  ``benchmarks/kd_loss_memory.py``. Once-differentiable (no double backward). Where the
  divergence has a pointwise form, ``kernel="auto"`` runs the fused kernel instead
  (``fused_divergence.py``).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Union

import torch
import torch.nn.functional as F

from workloads.divergences import Divergence, DivergenceSpec, resolve_divergence
from workloads.kernels.fused_divergence import compute_dtype as _compute_dtype
from workloads.kernels.fused_divergence import tempered_rows

__all__ = ["KindLike", "Reduction", "Kernel", "DEFAULT_CHUNK_SIZE", "check_pair",
           "kd_divergence", "kd_divergence_reference", "topk_kd_divergence"]

# A registered divergence: its name ("fkl", "rkl", "jsd", "skew_kl", ...: see
# workloads/divergences/), a mapping {"name": "skew_kl", "alpha": 0.1}, or a DivergenceSpec.
KindLike = Union[str, Mapping[str, Any], DivergenceSpec]
Reduction = Literal["mean", "sum"]
# "auto": fused when the divergence has a pointwise form (Triton on CUDA), else chunked;
# "fused" / "chunked" force one (benchmarks and tests compare them)
Kernel = Literal["auto", "fused", "chunked"]
# Rows per chunk: at V=32k one fp32 (C, V) temporary is 16 MB; at V=152k, 78 MB.
DEFAULT_CHUNK_SIZE = 128


def check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        hint = (
            " (only the vocab dim differs: call align_vocab(student, teacher, len(tokenizer)) "
            "first)" if student.shape[:-1] == teacher.shape[:-1] else ""
        )
        raise ValueError(
            f"{what}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} must have the same shape{hint}"
        )
    if student.dim() not in (2, 3):
        raise ValueError(f"{what}: logits must be (B, T, V) or (N, V), got {tuple(student.shape)}")


def _check_kind(kind: KindLike, temperature: float, reduction: str
                ) -> tuple[Divergence, dict[str, Any]]:
    """The registered divergence ``kind`` names and its parameters; errors for bad arguments."""
    resolved = resolve_divergence(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return resolved


def _rows(logits: torch.Tensor, mask: torch.Tensor | None, what: str):
    """Flatten ``(B, T, V)`` to ``(B*T, V)`` (a view) and return the selected row indices."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat, torch.arange(flat.shape[0], device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"{what}: mask shape {tuple(mask.shape)} must equal the logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    return flat, mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)


# ------------------------------------------------------------------------- the divergence


def _divergence_rows(s: torch.Tensor, t: torch.Tensor, div: Divergence | KindLike,
                     params: dict[str, Any] | None = None) -> torch.Tensor:
    """Per-row divergence of already-tempered logits ``(C, V)`` -> ``(C,)``; autograd-safe.
    (``div`` may also be a name: ``benchmarks/kd_loss_memory.py`` calls it with ``"fkl"``.)"""
    if not isinstance(div, Divergence):
        div, params = resolve_divergence(div)
    return div.rows(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), **params)


def _chunk_value_and_grads(s, t, div, params, need_s, need_t):
    """``(D (C,), dD/ds, dD/dt)`` of one chunk of tempered logits (buffers the caller gives
    away): the divergence's closed form when it registered one, else autograd of its ``rows``
    on this chunk only (so memory stays bounded by the chunk either way)."""
    if div.grads is not None:
        return div.grads(s, t, need_s, need_t, **params)
    if not (need_s or need_t):
        with torch.no_grad():
            return _divergence_rows(s, t, div, params), None, None
    with torch.enable_grad():
        s, t = s.requires_grad_(need_s), t.requires_grad_(need_t)
        value = _divergence_rows(s, t, div, params)
        wrt = [x for x, need in ((s, need_s), (t, need_t)) if need]
        grads = iter(torch.autograd.grad(value.sum(), wrt))
    return (value.detach(), next(grads) if need_s else None, next(grads) if need_t else None)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over selected rows of D(rows), computed ``chunk`` rows at a time in both passes."""

    @staticmethod
    def forward(ctx, s_flat, t_flat, idx, div, params, temperature, chunk):
        total = torch.zeros((), dtype=_compute_dtype(s_flat), device=s_flat.device)
        for i in range(0, idx.numel(), chunk):
            s, t = _tempered_chunk(s_flat, t_flat, idx[i : i + chunk], temperature)
            total += _chunk_value_and_grads(s, t, div, params, False, False)[0].sum()
        ctx.save_for_backward(s_flat, t_flat, idx)
        ctx.div, ctx.params, ctx.temperature, ctx.chunk = div, params, temperature, chunk
        return total * temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        s_flat, t_flat, idx = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(tau^2 * D(x / tau)) / dx = tau * dD/ds
        scale = grad_out.to(_compute_dtype(s_flat)) * ctx.temperature
        contiguous = torch.contiguous_format
        gs_full = torch.zeros_like(s_flat, memory_format=contiguous) if need_s else None
        gt_full = torch.zeros_like(t_flat, memory_format=contiguous) if need_t else None
        for i in range(0, idx.numel(), ctx.chunk):
            rows = idx[i : i + ctx.chunk]
            s, t = _tempered_chunk(s_flat, t_flat, rows, ctx.temperature)
            _, gs, gt = _chunk_value_and_grads(s, t, ctx.div, ctx.params, need_s, need_t)
            if need_s:
                gs_full.index_copy_(0, rows, gs.mul_(scale).to(gs_full.dtype))
            if need_t:
                gt_full.index_copy_(0, rows, gt.mul_(scale).to(gt_full.dtype))
        return gs_full, gt_full, None, None, None, None, None


def _tempered_chunk(s_flat, t_flat, rows, temperature):
    """Fresh ``(C, V)`` copies of the selected rows in the compute dtype, divided by tau."""
    return [tempered_rows(flat, rows, temperature) for flat in (s_flat, t_flat)]


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    reduction: Reduction = "mean",
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """Divergence between teacher and student next-token distributions at masked positions.

    With p_s = softmax(student / tau), p_t = softmax(teacher / tau) at one position, e.g.:

    * ``"fkl"`` (default): KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)  (mode covering)
    * ``"rkl"``: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)            (mode seeking)
    * ``"jsd"``: with m = (p_s + p_t) / 2 (beta = 0.5),
      JSD = KL(p_t || m) / 2 + KL(p_s || m) / 2, in nats, bounded by log 2.
    * ``{"name": "skew_kl", "alpha": a}``: KL(p_t || a p_t + (1 - a) p_s) (DistiLLM);
      ``"skew_rkl"`` the reverse. ``workloads.divergences.list_divergences()`` has them all.

    All are exactly 0 when the logits are equal (unlike torchtune's ``ForwardKLLoss``,
    which is a cross-entropy). The per-position value is multiplied by ``tau**2``.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        teacher_logits: same shape as ``student_logits`` (usually detached).
        mask: bool ``(B, T)`` / ``(N,)``, True = position counts; None = all positions.
        kind: a registered divergence's name, or ``{"name": ..., **its params}``, or a
            ``DivergenceSpec``.
        temperature: tau > 0, applied to both logits.
        chunk_size: selected positions processed per chunk (forward and backward) on the
            torch paths; None runs :func:`kd_divergence_reference` (plain autograd, full-size
            temporaries).
        reduction: ``"mean"`` over selected positions (0 if none) or ``"sum"``.
        kernel: ``"auto"`` runs the fused kernel (``workloads/kernels/``) where it is the
            faster one: Triton on CUDA for the built-ins; elsewhere the chunked kernel for a
            divergence with closed-form gradients and the fused torch path for one with only
            a pointwise form. ``"fused"`` / ``"chunked"`` choose.

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    div, params = _check_kind(kind, temperature, reduction)
    check_pair(student_logits, teacher_logits, "kd_divergence")
    if chunk_size is None:
        return kd_divergence_reference(
            student_logits, teacher_logits, mask, kind, temperature, reduction
        )
    if chunk_size <= 0:
        raise ValueError(f"kd_divergence: chunk_size must be positive or None, got {chunk_size}")
    if kernel not in ("auto", "fused", "chunked"):
        raise ValueError(f"kd_divergence: kernel must be auto, fused or chunked, got {kernel!r}")
    s_flat, idx = _rows(student_logits, mask, "kd_divergence")
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    backend = None
    if kernel != "chunked":
        from workloads.kernels import fused_backend

        backend = fused_backend(div, s_flat.device, s_flat.dtype,
                                prefer_closed_form=kernel == "auto")
        if backend is None and kernel == "fused":
            raise ValueError(f"kd_divergence: divergence {div.name!r} has no pointwise form, so "
                             "it has no fused kernel; use kernel='auto' or 'chunked'")
    if backend is not None:
        from workloads.kernels import FusedDivergence

        if s_flat.stride(-1) != 1 or t_flat.stride(-1) != 1:
            s_flat, t_flat = s_flat.contiguous(), t_flat.contiguous()
        total = FusedDivergence.apply(s_flat, t_flat, idx, div, params, float(temperature),
                                      chunk_size, backend)
    else:
        total = _ChunkedDivergence.apply(s_flat, t_flat, idx, div, params, float(temperature),
                                         chunk_size)
    return total / max(idx.numel(), 1) if reduction == "mean" else total


def kd_divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Unchunked definition of :func:`kd_divergence` (same args, same result): select the
    masked rows, then log-softmax them all at once. Simple to read, full-size memory."""
    div, params = _check_kind(kind, temperature, reduction)
    check_pair(student_logits, teacher_logits, "kd_divergence_reference")
    s_flat, idx = _rows(student_logits, mask, "kd_divergence_reference")
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    cdt = _compute_dtype(student_logits)
    s = s_flat[idx].to(cdt) / temperature
    t = t_flat[idx].to(cdt) / temperature
    total = _divergence_rows(s, t, div, params).sum() * temperature**2
    return total / max(idx.numel(), 1) if reduction == "mean" else total


# ------------------------------------------------------------------- offline top-k teacher


def topk_kd_divergence(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`kd_divergence` against a teacher stored offline as its top-k logits.

    Both distributions live on the teacher's top-k support S (per position):
    p_t = softmax(teacher_topk_values / tau) and p_s = softmax(student_logits[S] / tau), i.e.
    the student is *renormalized over S*. This keeps a true divergence (0 when the student's
    logits on S equal the teacher's up to a constant) and matches the full-vocabulary value
    exactly when k = V. It does not penalize student mass outside S; the un-renormalized
    alternative (student log-probs over the full V) would, but is not 0 at the optimum.
    Only ``(N, k)`` tensors are built, so no chunking is needed for k << V.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        teacher_topk_values: ``(B, T, k)`` / ``(N, k)`` teacher logits (finite), any order.
        teacher_topk_indices: same shape, int64 vocab ids, distinct per position (torch.topk).
        mask: bool ``(B, T)`` / ``(N,)`` as in :func:`kd_divergence`.
    """
    div, params = _check_kind(kind, temperature, reduction)
    V = student_logits.shape[-1]
    if teacher_topk_values.shape != teacher_topk_indices.shape or (
        teacher_topk_values.shape[:-1] != student_logits.shape[:-1]
    ):
        raise ValueError(
            f"topk_kd_divergence: top-k values {tuple(teacher_topk_values.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must both be (*student leading dims, k); student "
            f"logits are {tuple(student_logits.shape)}"
        )
    k = teacher_topk_values.shape[-1]
    if k > V:
        raise ValueError(f"topk_kd_divergence: k={k} exceeds the student's vocabulary {V}")
    s_flat, idx = _rows(student_logits, mask, "topk_kd_divergence")
    ind = teacher_topk_indices.reshape(-1, k)[idx].long()
    if ind.numel() and (int(ind.max()) >= V or int(ind.min()) < 0):
        raise ValueError(
            f"topk_kd_divergence: teacher top-k indices must lie in [0, {V}); align the "
            "vocabularies before storing the teacher"
        )
    cdt = _compute_dtype(student_logits)
    s = s_flat[idx[:, None], ind].to(cdt) / temperature  # (N, k), no (N, V) copy
    t = teacher_topk_values.reshape(-1, k)[idx].to(cdt) / temperature
    total = _divergence_rows(s, t, div, params).sum() * temperature**2
    return total / max(idx.numel(), 1) if reduction == "mean" else total
