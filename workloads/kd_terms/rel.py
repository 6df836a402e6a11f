"""``rel`` — LLaVA-KD's L_rel: 1 - cosine similarity of the two models' self-correlation
(Gram) matrices of the image tokens' logits, per image (``losses.relation_kd_loss``).
Weight: ``gamma``."""

from __future__ import annotations

from workloads.kd_terms import KDBatch, register_kd_term


def l_rel(x: KDBatch):
    return x.relation()


register_kd_term("rel", l_rel, needs=("relation",),
                 description="L_rel: image-token relation (Gram) matrices (weight gamma)")
