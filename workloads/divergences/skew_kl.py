"""``skew_kl`` and ``skew_rkl`` (DistiLLM, Ko et al. 2024): KL against a mixture, so the
divergence stays finite and smooth where the student puts almost no mass:

    skew_kl   SKL_a(p_t, p_s)  = KL(p_t || a p_t + (1 - a) p_s)
    skew_rkl  SRKL_a(p_t, p_s) = KL(p_s || a p_s + (1 - a) p_t)

``alpha`` = a in [0, 1), DistiLLM's default 0.1; a = 0 gives ``fkl`` / ``rkl``. Both are 0 when
the distributions are equal. Their pointwise forms run in the fused kernel (no closed-form
``grads`` is registered: the chunked kernel differentiates ``rows`` chunk by chunk).
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a divergence runs, not where one is named
    import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.divergences import register_divergence

__all__ = ["SkewParams", "skew_kl_rows", "skew_rkl_rows", "skew_kl_pointwise",
           "skew_rkl_pointwise"]


class SkewParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(0.1, ge=0.0, lt=1.0, description="skew a: weight of the reference "
                         "distribution itself in the mixture (DistiLLM: 0.1); 0 = plain KL")


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(a p + (1 - a) q), computed in log space."""
    import torch

    log_a = math.log(alpha) if alpha > 0 else -math.inf
    return torch.logaddexp(log_p + log_a, log_q + math.log1p(-alpha))


def skew_kl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``(C, V)`` student and teacher log-probabilities -> ``(C,)`` SKL_a."""
    return (log_p_t.exp() * (log_p_t - _log_mix(log_p_t, log_p_s, alpha))).sum(-1)


def skew_rkl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``(C, V)`` student and teacher log-probabilities -> ``(C,)`` SRKL_a."""
    return (log_p_s.exp() * (log_p_s - _log_mix(log_p_s, log_p_t, alpha))).sum(-1)


def skew_kl_pointwise(ls: torch.Tensor, lt: torch.Tensor, *, alpha: float):
    """``f = q (lt - lmix)``, lmix = log(a q + (1 - a) p); with w_x = (share of x in the mix):
    ``f_s = -q w_p``, ``f_t = f + q - q w_q``."""
    lmix = _log_mix(lt, ls, alpha)
    q = lt.exp()
    f = q * (lt - lmix)
    w_p = (ls + math.log1p(-alpha) - lmix).exp()
    w_q = (lt + math.log(alpha) - lmix).exp() if alpha > 0 else 0.0
    return f, -q * w_p, f + q - q * w_q


def skew_rkl_pointwise(ls: torch.Tensor, lt: torch.Tensor, *, alpha: float):
    f, f_t, f_s = skew_kl_pointwise(lt, ls, alpha=alpha)
    return f, f_s, f_t


register_divergence("skew_kl", skew_kl_rows, params=SkewParams, pointwise=skew_kl_pointwise,
                    description="skew forward KL(p_t || a p_t + (1-a) p_s) (DistiLLM)")
register_divergence("skew_rkl", skew_rkl_rows, params=SkewParams, pointwise=skew_rkl_pointwise,
                    description="skew reverse KL(p_s || a p_s + (1-a) p_t) (DistiLLM)")
