"""``span`` — span-aligned logit distillation across tokenizers (after GOLD, TRL's
``GOLDTrainer``): both tokenizations of a reply are cut into the text spans they agree on
(``data/alignment.py``, from character offsets kept at preprocessing), and each span compared:

- a span of one token on each side whose tokens spell the same text in both vocabularies: the
  stage's divergence (``divergence``, ``temperature``) between the two next-token distributions
  restricted to the tokens both vocabularies share (``alignment.vocabulary_map``), each
  renormalised over them;
- any other span (split differently, or a token one vocabulary lacks): each side's merged
  distribution — the first token's next-token distribution times the probabilities the model
  gives the span's later tokens (GOLD's "observed" merge) — compared by ULD's sorted L1.

The loss is the mean over spans. With one tokenizer every span is one mapped token, so
``span`` equals ``res`` (L_res) exactly.

    terms: {span: 1.0}                     # alpha: 0, beta: 0, gamma: 0 across tokenizers
"""

from __future__ import annotations

from typing import Any

from workloads.kd_terms import KDBatch, register_kd_term
from workloads.kd_terms.teacher_rows import group_index
from workloads.kd_terms.uld import sorted_l1

__all__ = ["span", "merged_log_probs"]


def merged_log_probs(logp: Any, tokens: Any, members: Any, group: Any, first: Any) -> Any:
    """Per group: ``log p_first(y) + sum over its later rows j of log p_j(token_j)``.

    ``logp``: ``(N, V)`` log-probabilities; ``members``/``group``: the grouped rows and their
    group numbers; ``first``: each group's first row."""
    import torch

    tok_lp = logp[members, tokens[members]]
    later = torch.ones_like(members, dtype=torch.bool)
    later[torch.searchsorted(members, first)] = False
    rest = torch.zeros(len(first), dtype=logp.dtype, device=logp.device)
    rest.index_add_(0, group[later], tok_lp[later])
    return logp[first] + rest[:, None]


def span(x: KDBatch) -> Any:
    import torch

    from workloads.losses import kd_divergence

    r = x.replies()
    s_rows, s_group, s_first, s_keys = group_index(r.s_group)
    t_rows, t_group, t_first, t_keys = group_index(r.t_group)
    if not torch.equal(s_keys, t_keys):  # the alignment gives both sides the same spans
        raise ValueError("span: the student's and the teacher's aligned spans differ")
    n = len(s_keys)
    if n == 0:
        return r.s.sum() * 0.0
    s_size = torch.bincount(s_group, minlength=n)
    t_size = torch.bincount(t_group, minlength=n)
    one_one = (s_size == 1) & (t_size == 1)
    if r.shared is None:  # one vocabulary: a one-token span is that token on both sides
        token_level = one_one
        s_cols = t_cols = None
    else:
        s_cols, t_cols = (torch.as_tensor(c, device=r.s.device) for c in r.shared)
        to_student = torch.full((r.t.shape[-1],), -1, dtype=torch.long, device=r.s.device)
        to_student[t_cols] = s_cols
        token_level = one_one & (to_student[r.t_token[t_first]] == r.s_token[s_first])
    dtype = torch.promote_types(r.s.dtype, torch.float32)  # float64 stays float64
    total = r.s.new_zeros((), dtype=dtype)
    if bool(token_level.any()):
        s_tok, t_tok = r.s[s_first[token_level]], r.t[t_first[token_level]]
        if s_cols is not None:
            s_tok, t_tok = s_tok[:, s_cols], t_tok[:, t_cols]
        total = total + kd_divergence(s_tok, t_tok, None, x.divergence, x.temperature,
                                      x.chunk_size, reduction="sum").to(dtype)
    rest = ~token_level
    if bool(rest.any()):
        tau = x.temperature
        s_lp = (r.s.to(dtype) / tau).log_softmax(-1)
        t_lp = (r.t.to(dtype) / tau).log_softmax(-1)
        s_m = merged_log_probs(s_lp, r.s_token, s_rows, s_group, s_first)[rest]
        t_m = merged_log_probs(t_lp, r.t_token, t_rows, t_group, t_first)[rest]
        total = total + sorted_l1(s_m.exp(), t_m.exp()).sum()
    return total / n


register_kd_term("span", span, needs=("replies",),
                 description="span-aligned KD: the stage's divergence on one-token spans that "
                             "map between vocabularies, ULD on merged spans (any two "
                             "tokenizers)")
