"""``rkl``: reverse KL, KL(p_s || p_t) = sum_v p_s (log p_s - log p_t) — mode seeking. It is
forward KL with the roles swapped, so its closed form is ``fkl``'s:

    dD/ds = p (log p - log q - D),    dD/dt = q - p
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a divergence runs, not where one is named
    import torch

from workloads.divergences import register_divergence
from workloads.divergences.fkl import fkl_grads, fkl_pointwise, fkl_rows

__all__ = ["rkl_rows", "rkl_grads", "rkl_pointwise"]


def rkl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """``(C, V)`` student and teacher log-probabilities -> ``(C,)`` KL(p_s || p_t)."""
    return fkl_rows(log_p_t, log_p_s)


def rkl_grads(s: torch.Tensor, t: torch.Tensor, need_s: bool, need_t: bool):
    div, g_t, g_s = fkl_grads(t, s, need_t, need_s)
    return div, g_s, g_t


def rkl_pointwise(ls: torch.Tensor, lt: torch.Tensor):
    f, f_t, f_s = fkl_pointwise(lt, ls)
    return f, f_s, f_t


register_divergence("rkl", rkl_rows, rkl_grads, pointwise=rkl_pointwise,
                    description="reverse KL(p_s || p_t), mode seeking")
