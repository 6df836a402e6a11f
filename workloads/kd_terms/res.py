"""``res`` — LLaVA-KD's L_res: the divergence between the teacher's and the student's
next-token distributions at the response positions (where CE trains). Weight: ``alpha``."""

from __future__ import annotations

from workloads.kd_terms import KDBatch, register_kd_term


def l_res(x: KDBatch):
    return x.divergence_at("response")


register_kd_term("res", l_res, needs=("response",),
                 description="L_res: divergence at the response positions (weight alpha)")
