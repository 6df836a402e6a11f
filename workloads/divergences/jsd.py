"""``jsd``: Jensen-Shannon divergence with m = (p_s + p_t) / 2 (beta = 0.5),

    JSD = KL(p_t || m) / 2 + KL(p_s || m) / 2,   in nats, bounded by log 2;
    dD/ds = p (log p - log m - KL(p || m)) / 2,  the same with q for dD/dt.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a divergence runs, not where one is named
    import torch

from workloads.divergences import register_divergence

__all__ = ["jsd_rows", "jsd_grads", "jsd_pointwise"]


def jsd_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """``(C, V)`` student and teacher log-probabilities -> ``(C,)`` JSD."""
    import torch

    lm = torch.logaddexp(log_p_s, log_p_t) - math.log(2.0)  # log of m = (p_s + p_t) / 2
    return (0.5 * (log_p_t.exp() * (log_p_t - lm)).sum(-1)
            + 0.5 * (log_p_s.exp() * (log_p_s - lm)).sum(-1))


def jsd_grads(s: torch.Tensor, t: torch.Tensor, need_s: bool, need_t: bool):
    """Closed form on logit buffers ``s``, ``t`` ``(C, V)`` (overwritten, in place)."""
    import torch

    ls = s.sub_(s.logsumexp(-1, keepdim=True))
    lt = t.sub_(t.logsumexp(-1, keepdim=True))
    p, q = ls.exp(), lt.exp()
    lm = torch.logaddexp(ls, lt).sub_(math.log(2.0))
    ds, dt = ls.sub_(lm), lt.sub_(lm)  # log p - log m, log q - log m
    del lm
    kl_s, kl_t = torch.linalg.vecdot(p, ds), torch.linalg.vecdot(q, dt)
    g_s = p.mul_(ds.sub_(kl_s[:, None])).mul_(0.5) if need_s else None
    g_t = q.mul_(dt.sub_(kl_t[:, None])).mul_(0.5) if need_t else None
    return 0.5 * (kl_s + kl_t), g_s, g_t


def jsd_pointwise(ls: torch.Tensor, lt: torch.Tensor):
    """``f = q (lt - lm) / 2 + p (ls - lm) / 2``; since dlm/dls = p / (p + q), the partials
    reduce to ``p (ls - lm) / 2`` and ``q (lt - lm) / 2``."""
    import torch

    lm = torch.logaddexp(ls, lt) - math.log(2.0)
    f_s = 0.5 * ls.exp() * (ls - lm)
    f_t = 0.5 * lt.exp() * (lt - lm)
    return f_s + f_t, f_s, f_t


register_divergence("jsd", jsd_rows, jsd_grads, pointwise=jsd_pointwise,
                    description="Jensen-Shannon, m = (p_s + p_t)/2, bounded by log 2")
