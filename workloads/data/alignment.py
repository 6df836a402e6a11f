"""Aligning two tokenizations of the same replies, for cross-tokenizer distillation.

A teacher and a student with different tokenizers (``teacher_inputs: cross``) each encode every
row with their own chat template; their reply tokens differ in number and boundaries, but both
spell the same reply text. The preprocessor keeps, per reply (label) token, its character span
inside its turn's label text (the reply and the template's end-of-turn marker), and
``align_reply_tokens`` turns the two sides' spans into *aligned groups*:

- within a turn, the two label texts agree on a common prefix of ``L`` characters (the reply;
  the end-of-turn markers differ between templates). Every character offset in ``(0, L]``
  where *both* sides end a token closes a group: the tokens of each side between two such
  offsets spell exactly the same text. A token that starts at or after ``L`` (the end-of-turn
  marker) belongs to the turn's last group, "end of reply", present when both sides have one;
- a group is kept only when both sides hold all of its tokens (``max_length`` may cut one
  side's reply shorter): its tokens get the group's number (0, 1, ... over the row, in order),
  every other reply token ``-1``.

So a group is 1:1 (one token each side, the same text) or m:n (a span the two tokenizers split
differently). ``vocabulary_map`` pairs the ids of tokens that decode to the same text in both
vocabularies: a 1:1 group whose tokens map is where a token-level divergence applies
(``kd_terms/span.py``). Computed once per row at preprocessing, so the step pays no tokenization.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["align_reply_tokens", "common_prefix", "vocabulary_map", "token_texts", "at_labels",
           "pair_reply_labels"]

# one reply token: (turn, start, end), the character span inside its turn's label text
Span = tuple[int, int, int]


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def align_reply_tokens(s_spans: Sequence[Span], s_texts: Sequence[str],
                       t_spans: Sequence[Span], t_texts: Sequence[str]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Group numbers of the student's and the teacher's reply tokens (``-1``: not aligned).

    ``*_spans``: one ``(turn, start, end)`` per reply token, in order; ``*_texts``: each turn's
    label text. Turns are matched by number; a turn missing on one side (cut by
    ``max_length``) aligns nothing."""
    s_group = np.full(len(s_spans), -1, np.int64)
    t_group = np.full(len(t_spans), -1, np.int64)
    next_group = 0
    for turn in range(min(len(s_texts), len(t_texts))):
        s_idx = [i for i, sp in enumerate(s_spans) if sp[0] == turn]
        t_idx = [i for i, sp in enumerate(t_spans) if sp[0] == turn]
        if not s_idx or not t_idx:
            continue
        limit = common_prefix(s_texts[turn], t_texts[turn])
        # a token's end inside the common text (clipped to it); tokens past it: the tail
        s_end = {i: min(s_spans[i][2], limit) for i in s_idx if s_spans[i][1] < limit}
        t_end = {i: min(t_spans[i][2], limit) for i in t_idx if t_spans[i][1] < limit}
        cuts = sorted(c for c in set(s_end.values()) & set(t_end.values()) if c > 0)
        number = {cut: next_group + k for k, cut in enumerate(cuts)}
        next_group += len(cuts)
        for ends, out in ((s_end, s_group), (t_end, t_group)):
            for i, end in ends.items():
                # the group whose closing cut is the first at or after the token's end; none:
                # the side's last tokens stop short of a common cut (unaligned)
                k = int(np.searchsorted(cuts, end))
                if k < len(cuts):
                    out[i] = number[cuts[k]]
        # the end-of-reply group: every token past the common text, on both sides, when the
        # text before it is aligned to its end and neither side was cut short
        s_tail = [i for i in s_idx if s_spans[i][1] >= limit]
        t_tail = [i for i in t_idx if t_spans[i][1] >= limit]
        whole = (max(s_spans[i][2] for i in s_idx) >= len(s_texts[turn])
                 and max(t_spans[i][2] for i in t_idx) >= len(t_texts[turn]))
        if s_tail and t_tail and whole and (limit == 0 or (cuts and cuts[-1] == limit)):
            s_group[s_tail] = next_group
            t_group[t_tail] = next_group
            next_group += 1
    return s_group, t_group


def token_texts(tokenizer: Any) -> list[str | None]:
    """The text each id decodes to on its own (``None`` for special tokens)."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        if i not in special:
            out[i] = tokenizer.convert_tokens_to_string([token])
    return out


def vocabulary_map(student: Any, teacher: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(student_ids, teacher_ids)``: the tokens that decode to the same text in both
    tokenizers (special tokens and texts two ids share on one side left out), pair by pair,
    in the student's id order."""
    s_texts, t_texts = token_texts(student), token_texts(teacher)

    def unique(texts: list[str | None]) -> dict[str, int]:
        seen: dict[str, int] = {}
        dup: set[str] = set()
        for i, text in enumerate(texts):
            if text is None or text == "":
                continue
            if text in seen:
                dup.add(text)
            seen[text] = i
        return {k: v for k, v in seen.items() if k not in dup}

    s_ids, t_ids = unique(s_texts), unique(t_texts)
    both = sorted(set(s_ids) & set(t_ids), key=lambda text: s_ids[text])
    return (np.asarray([s_ids[x] for x in both], np.int64),
            np.asarray([t_ids[x] for x in both], np.int64))


def at_labels(labels: np.ndarray, reply_group: np.ndarray) -> np.ndarray:
    """Per position: the aligned-group number of the reply token there, -1 elsewhere."""
    out = np.full(len(labels), -1, np.int64)
    out[np.flatnonzero(labels != -100)] = reply_group
    return out


def pair_reply_labels(student: Any, teacher: Any, where: str) -> None:
    """Make the reply tokens (labels != -100) of a row's two encodings the same sequence, as
    ``L_res`` pairs them in order: one tokenizer gives the same reply tokens, and where
    ``max_length`` cut one encoding's reply shorter, the other's surplus reply tokens (the
    last ones) are unlabelled. Different reply tokens otherwise: a ValueError (the pair was
    built from different tokenizers)."""
    s_pos = np.flatnonzero(student.labels != -100)
    t_pos = np.flatnonzero(teacher.labels != -100)
    n = min(len(s_pos), len(t_pos))
    if not np.array_equal(student.labels[s_pos[:n]], teacher.labels[t_pos[:n]]):
        raise ValueError(f"{where}: the teacher's processor gives other reply tokens than the "
                         f"student's; response KD pairs them one by one, so teacher and student "
                         f"must share the tokenizer")
    for enc, pos in ((student, s_pos), (teacher, t_pos)):
        if len(pos) > n:
            enc.labels = enc.labels.copy()
            enc.labels[pos[n:]] = -100
