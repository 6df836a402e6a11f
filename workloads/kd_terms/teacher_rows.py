"""The teacher's side of a micro-batch, one class per form the teacher's outputs come in; a KD
term reads all of them through the same three calls (``KDBatch``):

- ``DenseRows``: the teacher's full logits on the student's own batch (``teacher: online``);
- ``PairedRows``: the teacher's full logits at the response positions of its *own* encoding of
  each row, paired in order with the student's (``teacher_inputs: own``; response terms only);
- ``StoredRows``: top-k logits at the response and image positions and the image tokens' Gram
  matrices, as a ``teacher_logits`` stage stores them and the teacher service sends them
  (``teacher: offline`` / ``service``).

- ``CrossRows``: the full logits of a teacher with *another tokenizer* (any family into any
  other) on its own encoding of each row, with both sides' reply tokens grouped into aligned
  text spans (``data/alignment.py``; ``teacher_inputs: cross``): the ``replies`` terms only.

``divergence(s, where, kind, temperature, chunk_size)`` is the stage's divergence averaged over
the ``where`` positions; ``relation(s)`` LLaVA-KD's relation loss; ``rows(s, where, term)`` the
paired ``(N, V)`` student and teacher logit rows; ``replies(s, term)`` both models' reply rows
with their alignment (``Replies``), whatever the two vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DenseRows", "PairedRows", "StoredRows", "CrossRows", "Replies", "reply_rows",
           "reply_index", "group_index"]

CROSS_TERMS = "uld, span"  # what a cross-tokenizer pair can use (messages)


@dataclass
class Replies:
    """Both models' logit rows at their reply positions (each row predicts one reply token).

    ``s``/``t``: ``(N_s, V_s)`` / ``(N_t, V_t)``; ``s_row``/``t_row``: each row's batch row;
    ``s_group``/``t_group``: each row's aligned-group key, unique over the batch (``-1``: not
    aligned) — the rows of one key on each side predict the same text; ``s_token``/``t_token``:
    the token each row predicts (``None`` where the vocabularies are one: every group is one
    token each side); ``shared``: ``None`` for one vocabulary, else ``(student_ids,
    teacher_ids)`` of the tokens both vocabularies spell alike."""

    s: Any
    t: Any
    s_row: Any
    t_row: Any
    s_group: Any
    t_group: Any
    s_token: Any = None
    t_token: Any = None
    shared: Any = None


def reply_index(labels: Any, groups: Any = None) -> tuple[Any, Any, Any, Any]:
    """``(mask, tokens, keys, batch_row)`` of the positions whose next token is a reply token:
    their ``(B, T)`` mask, the token each predicts, its group key (``groups``: the per-position
    group numbers of ``collate``'s ``reply_group``; none: every row its own group) and batch
    row, in row-major order (the order of ``logits[mask]``)."""
    import torch

    def after(x: Any, fill: int) -> Any:  # x[:, t + 1] at position t
        return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)

    nxt = after(labels, -100)
    mask = nxt != -100
    batch_row = mask.nonzero()[:, 0]
    if groups is None:
        keys = torch.arange(len(batch_row), device=labels.device)
    else:
        g = after(groups, -1)[mask]
        # the same key for a group on both sides, whatever each side's padded length
        keys = torch.where(g >= 0, batch_row * 2**32 + g, torch.full_like(g, -1))
    return mask, nxt[mask], keys, batch_row


def reply_rows(logits: Any, labels: Any, groups: Any = None) -> tuple[Any, Any, Any, Any]:
    """``(rows, tokens, keys, batch_row)``: ``reply_index`` with the logit rows it selects."""
    mask, tokens, keys, batch_row = reply_index(labels, groups)
    return logits[mask], tokens, keys, batch_row


def group_index(keys: Any) -> tuple[Any, Any, Any, Any]:
    """For the rows with a group key >= 0 (a group's rows contiguous, keys ascending): their
    indices, each one's group number (0..G-1), the index of each group's first row and the G
    keys."""
    import torch

    valid = (keys >= 0).nonzero().squeeze(1)
    k = keys[valid]
    uniq, inverse = torch.unique_consecutive(k, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(k), device=keys.device), "amin",
                          include_self=False)
    return valid, inverse, valid[first], uniq


class DenseRows:
    def __init__(self, teacher: Any, labels: Any, image_mask: Any):
        from workloads.losses import response_mask

        self.teacher, self.image_mask, self.labels = teacher, image_mask, labels
        self.masks = {"response": response_mask(labels), "image": image_mask}

    def replies(self, s: Any, term: str = "") -> Replies:
        s_rows, _, keys, row = reply_rows(s, self.labels)
        t_rows = self.teacher[self.masks["response"]]
        return Replies(s_rows, t_rows, row, row, keys, keys)

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

    def replies(self, s: Any, term: str = "") -> Replies:
        import torch

        row = self.mask.nonzero()[:, 0]
        keys = torch.arange(len(row), device=row.device)
        return Replies(s[self.mask], self.teacher, row, row, keys, keys)

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

    def replies(self, s: Any, term: str = "") -> Replies:
        from workloads.kd_terms import KDTermError

        raise KDTermError(f"KD term {term!r} reads both models' reply rows, which {self.what} "
                          f"does not keep; use `teacher: online`")


class CrossRows:
    """A teacher with another tokenizer on its own encoding: ``teacher``/``t_labels``/
    ``t_groups`` its ``(B, T_t, V_t)`` logits, labels and per-position group numbers;
    ``s_labels``/``s_groups`` the student's; ``shared`` as in ``Replies``. A stored or served
    teacher gives its reply rows instead of logits: ``t_rows``, ``(N_t, V_t)`` in
    ``reply_index`` order (``teacher/payload.cross_rows``)."""

    def __init__(self, teacher: Any, t_labels: Any, t_groups: Any, s_labels: Any,
                 s_groups: Any, shared: Any, what: str, t_rows: Any = None):
        self.teacher, self.t_labels, self.t_groups = teacher, t_labels, t_groups
        self.s_labels, self.s_groups, self.shared, self.what = s_labels, s_groups, shared, what
        self.t_rows = t_rows

    def replies(self, s: Any, term: str = "") -> Replies:
        s_rows, s_tok, s_key, s_row = reply_rows(s, self.s_labels, self.s_groups)
        if self.t_rows is None:
            t_rows, t_tok, t_key, t_row = reply_rows(self.teacher, self.t_labels, self.t_groups)
        else:
            _, t_tok, t_key, t_row = reply_index(self.t_labels, self.t_groups)
            t_rows = self.t_rows
        return Replies(s_rows, t_rows, s_row, t_row, s_key, t_key, s_tok, t_tok, self.shared)

    def divergence(self, s: Any, where: str, kind: Any, temperature: float,
                   chunk_size: int | None) -> Any:
        self._refuse(f"the divergence at {where} positions")

    def relation(self, s: Any) -> Any:
        self._refuse("the image tokens' relation")

    def rows(self, s: Any, where: str, term: str = "") -> tuple[Any, Any]:
        self._refuse(f"KD term {term!r}" if term else "logit rows")

    def _refuse(self, what: str) -> None:
        from workloads.kd_terms import KDTermError

        raise KDTermError(f"{what} compares the two models token by token in one vocabulary, "
                          f"but {self.what} has another tokenizer; across tokenizers use the "
                          f"terms that align replies by text ({CROSS_TERMS})")
