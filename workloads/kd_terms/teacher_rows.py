"""The teacher's side of a micro-batch, one class per form the teacher's outputs come in; a KD
term reads all of them through the same three calls (``KDBatch``):

- ``DenseRows``: the teacher's full logits on the student's own batch (``teacher: online``);
- ``PairedRows``: the teacher's full logits at the response positions of its *own* encoding of
  each row, paired in order with the student's (``teacher_inputs: own``; response terms only);
- ``StoredRows``: top-k logits at the response and image positions and the image tokens' Gram
  matrices, as a ``teacher_logits`` stage stores them and the teacher service sends them
  (``teacher: offline`` / ``service``).

``divergence(s, where, kind, temperature, chunk_size)`` is the stage's divergence averaged over
the ``where`` positions; ``relation(s)`` LLaVA-KD's relation loss; ``rows(s, where, term)`` the
paired ``(N, V)`` student and teacher logit rows.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DenseRows", "PairedRows", "StoredRows"]


class DenseRows:
    def __init__(self, teacher: Any, labels: Any, image_mask: Any):
        from workloads.losses import response_mask

        self.teacher, self.image_mask = teacher, image_mask
        self.masks = {"response": response_mask(labels), "image": image_mask}

    def divergence(self, s: Any, where: str, kind: Any, temperature: float,
                   chunk_size: int | None) -> Any:
        from workloads.losses import kd_divergence

        return kd_divergence(s, self.teacher, self.masks[where], kind, temperature, chunk_size)

    def relation(self, s: Any) -> Any:
        from workloads.losses import relation_kd_loss

        return relation_kd_loss(s, self.teacher, self.image_mask)

    def rows(self, s: Any, where: str, term: str = "") -> tuple[Any, Any]:
        m = self.masks[where]
        return s[m], self.teacher[m]


class PairedRows:
    """``teacher``: ``(N, V)`` rows at the teacher's response positions; ``mask``: the
    student's response positions (N of them, the same reply tokens in the same order)."""

    def __init__(self, teacher: Any, mask: Any, what: str):
        self.teacher, self.mask, self.what = teacher, mask, what

    def divergence(self, s: Any, where: str, kind: Any, temperature: float,
                   chunk_size: int | None) -> Any:
        from workloads.losses import kd_divergence

        return kd_divergence(*self.rows(s, where), None, kind, temperature, chunk_size)

    def relation(self, s: Any) -> Any:
        self._response_only("image")

    def rows(self, s: Any, where: str, term: str = "") -> tuple[Any, Any]:
        if where != "response":
            self._response_only(where)
        return s[self.mask], self.teacher

    def _response_only(self, where: str) -> None:
        from workloads.kd_terms import KDTermError

        raise KDTermError(f"{self.what} runs on its own encoding of each row, which pairs the "
                          f"response positions only; a term reading {where} positions needs "
                          f"the student's batch")


class StoredRows:
    """``values``/``indices``: ``(B, T, k)`` top-k teacher logits (zero where not stored);
    ``response``/``image``: ``(B, T)`` bool; ``grams``: one ``(n_b, n_b)`` matrix per row."""

    def __init__(self, values: Any, indices: Any, response: Any, image: Any, grams: list,
                 vocab_size: int, what: str):
        self.values, self.indices, self.grams = values, indices, grams
        self.masks = {"response": response, "image": image}
        self.vocab_size, self.what = vocab_size, what

    def divergence(self, s: Any, where: str, kind: Any, temperature: float,
                   chunk_size: int | None) -> Any:
        from workloads.kernels.chunked import topk_kd_divergence

        return topk_kd_divergence(s, self.values, self.indices, self.masks[where], kind,
                                  temperature)

    def relation(self, s: Any) -> Any:
        import torch

        from workloads.kernels.relation import GroupGrams, relation_from_grams

        B, T = s.shape[:2]
        flat = s.reshape(B * T, -1)
        losses = []
        for b, gt in enumerate(self.grams):
            rows = self.masks["image"][b].nonzero().squeeze(1) + b * T
            if rows.numel():
                gs = GroupGrams.apply(flat, 4096, rows)[0]
                losses.append(relation_from_grams(gs, gt.to(gs.dtype)))
        return torch.stack(losses).mean() if losses else flat[:0].sum().float()

    def rows(self, s: Any, where: str, term: str = "") -> tuple[Any, Any]:
        """The teacher's whole rows, rebuilt from the stored top-k: only when k covers the
        vocabulary."""
        k = self.values.shape[-1]
        if k < self.vocab_size:
            from workloads.kd_terms import KDTermError

            raise KDTermError(
                f"KD term {term!r} reads the teacher's whole logit rows, but {self.what} keeps "
                f"the top {k} of {self.vocab_size} per position. Use `teacher: online`, a "
                f"service without `top_k`, or a `teacher_logits` stage with top_k >= "
                f"{self.vocab_size}")
        m = self.masks[where]
        full = self.values.new_full((int(m.sum()), k), float("-inf"))
        return s[m], full.scatter(-1, self.indices[m], self.values[m])
