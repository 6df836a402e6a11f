"""``fkl``: forward KL, KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) — mode covering; the
LLaVA-KD default. With p = softmax(s), q = softmax(t) (student, teacher logits):

    dD/ds = p - q,    dD/dt = q (log q - log p - D)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a divergence runs, not where one is named
    import torch

from workloads.divergences import register_divergence

__all__ = ["fkl_rows", "fkl_grads", "fkl_pointwise"]


def fkl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """``(C, V)`` student and teacher log-probabilities -> ``(C,)`` KL(p_t || p_s)."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def fkl_grads(s: torch.Tensor, t: torch.Tensor, need_s: bool, need_t: bool):
    """Closed form on logit buffers ``s``, ``t`` ``(C, V)`` (overwritten): every step is in
    place where it can be, so a chunk needs about five (C, V) buffers (measured in
    ``benchmarks/kd_loss_memory.py``). Returns ``(D, dD/ds or None, dD/dt or None)``."""
    import torch

    ls = s.sub_(s.logsumexp(-1, keepdim=True))
    lt = t.sub_(t.logsumexp(-1, keepdim=True))
    q = lt.exp()
    p = ls.exp() if need_s else None
    d = lt.sub_(ls)  # log q - log p
    del ls
    div = torch.linalg.vecdot(q, d)
    g_s = p.sub_(q) if need_s else None
    g_t = q.mul_(d.sub_(div[:, None])) if need_t else None
    return div, g_s, g_t


def fkl_pointwise(ls: torch.Tensor, lt: torch.Tensor):
    """Elementwise ``f = q (lt - ls)`` and its partials w.r.t. ``ls`` and ``lt`` (the fused
    kernel's form; ``D = sum_v f``)."""
    q = lt.exp()
    f = q * (lt - ls)
    return f, -q, f + q


register_divergence("fkl", fkl_rows, fkl_grads, pointwise=fkl_pointwise,
                    description="forward KL(p_t || p_s), mode covering (LLaVA-KD default)")
