"""``vis`` — LLaVA-KD's L_vis: the divergence between the two models' output distributions *at*
the image-token positions (no shift: what they predict while reading the visual tokens).
Weight: ``beta``."""

from __future__ import annotations

from workloads.kd_terms import KDBatch, register_kd_term


def l_vis(x: KDBatch):
    return x.divergence_at("image")


register_kd_term("vis", l_vis, needs=("image",),
                 description="L_vis: divergence at the image-token positions (weight beta)")
