"""A KD term: cross-entropy of the student on the teacher's most likely token at each response
position where the teacher is at least ``min_confidence`` sure (hard-label KD). A user's own
extension, found by mmkd through its entry-point group alone."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workloads.kd_terms import register_kd_term


class ArgmaxParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_confidence: float = Field(0.0, ge=0, le=1, description="teacher probability of its top "
                                  "token below which a position is left out")


def argmax_ce(x, *, min_confidence):
    import torch.nn.functional as F

    s, t = x.rows("response")
    p_top, top = t.float().softmax(-1).max(-1)
    keep = p_top >= min_confidence
    if not bool(keep.any()):
        return s.sum() * 0.0
    return F.cross_entropy(s[keep].float(), top[keep])


register_kd_term("argmax_ce", argmax_ce, needs=("response",), params=ArgmaxParams,
                 description="CE on the teacher's top token (test plugin)")
