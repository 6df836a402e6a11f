"""``uld`` — the Universal Logit Distillation loss (Boizard et al. 2024, "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"): at each reply
position, both models' next-token probabilities sorted in decreasing order, the shorter vector
padded with zeros to the longer vocabulary, and their L1 distance (the Wasserstein-1 distance
under ULD's closed form); averaged over positions. It needs no vocabulary mapping, so it
distils a teacher of any tokenizer. Positions pair as in the paper: the i-th reply token of a
row on each side, up to the shorter reply (``align: index``); ``align: span`` pairs the first
token of each text span both tokenizations agree on (``data/alignment.py``) instead.

    terms: {uld: 1.0}                      # alpha: 0, beta: 0, gamma: 0 across tokenizers
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from workloads.kd_terms import KDBatch, register_kd_term

__all__ = ["uld", "sorted_l1", "index_pairs"]


class ULDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    align: Literal["index", "span"] = "index"


def sorted_l1(p: Any, q: Any) -> Any:
    """Per row, ``sum_i |sort(p)_i - sort(q)_i|`` with both sorted in decreasing order and the
    narrower one padded with zeros: ``(N, V_p)``, ``(N, V_q)`` probabilities -> ``(N,)``."""
    import torch.nn.functional as F

    p = p.sort(dim=-1, descending=True).values
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def index_pairs(s_row: Any, t_row: Any) -> tuple[Any, Any]:
    """Indices pairing the i-th student row of each batch row with its i-th teacher row, up
    to the shorter side's count in that batch row (rows are in batch-row order)."""
    import torch

    def rank(rows: Any) -> Any:  # position of each entry within its batch row
        first = torch.searchsorted(rows, rows)
        return torch.arange(len(rows), device=rows.device) - first

    n = int(max(int(s_row.max()) if len(s_row) else -1, int(t_row.max()) if len(t_row) else -1))
    count_s = torch.bincount(s_row, minlength=n + 1)
    count_t = torch.bincount(t_row, minlength=n + 1)
    both = torch.minimum(count_s, count_t)
    s_keep = rank(s_row) < both[s_row]
    t_keep = rank(t_row) < both[t_row]
    return s_keep.nonzero().squeeze(1), t_keep.nonzero().squeeze(1)


def uld(x: KDBatch, align: str = "index") -> Any:
    r = x.replies()
    if align == "span":  # the first row of each span, on both sides
        import torch

        from workloads.kd_terms.teacher_rows import group_index

        *_, s_idx, s_keys = group_index(r.s_group)
        *_, t_idx, t_keys = group_index(r.t_group)
        s_idx = s_idx[torch.isin(s_keys, t_keys)]
        t_idx = t_idx[torch.isin(t_keys, s_keys)]
    else:
        s_idx, t_idx = index_pairs(r.s_row, r.t_row)
    if not len(s_idx):
        return r.s.sum() * 0.0
    tau = x.temperature
    p_s = (r.s[s_idx].float() / tau).softmax(-1)
    p_t = (r.t[t_idx].float() / tau).softmax(-1)
    return sorted_l1(p_s, p_t).mean()


register_kd_term("uld", uld, needs=("replies",), params=ULDParams,
                 description="ULD: sorted-probability L1 between the two models at each reply "
                             "position (any two tokenizers)")
