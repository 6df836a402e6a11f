"""The teacher's payload, defined once: per training row, what the KD terms need of the
teacher when it does not run in the student's worker — written by a ``teacher_logits`` stage
(``offline.py``), sent by the teacher service (``service/``), and read by the loss as
``StoredRows`` (``kd_terms/teacher_rows.py``).

An entry (one row) holds, at the row's response and image-token positions (``positions``;
``is_resp`` / ``is_img`` say which): the teacher's top-k logits (``values``, fp32) and their
vocabulary ``indices``; and the Gram matrix ``Z Zᵀ`` of its image tokens' logits (``gram``),
for L_rel. ``top_k`` is capped at the vocabulary: at k = V the entries hold every logit and
every KD term equals its online value.

Rows are found by a **content digest** of the preprocessed row (token ids, labels, image pixels
rounded to bf16; for non-LLaVA families, whose pixels do not index by row, the digest
``collate`` takes of the row's image inputs before any cast), not by a sample key: the shared
training loop's collate does not carry keys, and a digest also proves the row was tokenized
exactly as the teacher saw it. Half-precision pixels are digested after rounding to bf16 (fp16
runs may double-round and miss: use fp32 or bf16 with a stored teacher).

A teacher with **another tokenizer** (``teacher_inputs: cross``) has its entries computed on its
own encoding of each row — the batch's ``teacher_`` columns (``own_batch``), which are also what
its rows are digested by — and read back at its reply positions, aligned with the student's by
text (``cross_rows``). Below k = V_t the rows hold the teacher's top-k renormalised, as the
top-k divergence does for one tokenizer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

__all__ = ["FORMAT_VERSION", "ENTRY_ARRAYS", "row_digests", "teacher_entries", "stored_rows",
           "own_batch", "cross_rows"]

FORMAT_VERSION = 1
ENTRY_ARRAYS = ("positions", "is_resp", "is_img", "values", "indices", "gram")


def row_digests(batch: dict[str, Any]) -> list[str]:
    """Content digest of each row of a collated (right-padded) batch; see the module docstring."""
    import torch

    out = []
    lengths = batch["attention_mask"].sum(1).tolist()
    image_digests = batch.get("mm_digest")  # non-LLaVA families: per-row, from collate
    for b, n in enumerate(lengths):
        h = hashlib.blake2b(digest_size=16)
        h.update(batch["input_ids"][b, :n].to(torch.int64).cpu().numpy().tobytes())
        h.update(batch["labels"][b, :n].to(torch.int64).cpu().numpy().tobytes())
        if image_digests is not None:
            if bool(batch["has_image"][b]):
                h.update(image_digests[b].cpu().numpy().tobytes())
        elif bool(batch["has_image"][b]):
            px = batch["pixel_values"][b].detach().to(torch.bfloat16).cpu().contiguous()
            h.update(px.view(torch.int16).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def teacher_entries(logits: Any, batch: dict[str, Any], vocab_size: int, image_token_id: int,
                    top_k: int) -> list[dict[str, np.ndarray]]:
    """Per-row stored teacher data from teacher logits ``(B, T, V_t)`` of a collated batch.
    The top-k and relation matrices are computed where the logits are (a GPU teacher's stay on
    its GPU, one row at a time in fp32); only the results come to the CPU."""
    import torch

    from workloads.losses import response_mask

    k = min(top_k, vocab_size)
    resp = response_mask(batch["labels"]).to(logits.device)
    img = (batch["input_ids"] == image_token_id).to(logits.device)
    out = []
    for b in range(logits.shape[0]):
        z = logits[b, :, :vocab_size].float()
        pos = (resp[b] | img[b]).nonzero().squeeze(1)
        vals, idx = torch.topk(z[pos], k, dim=-1)
        zi = z[img[b]]
        gram = (zi @ zi.T) if zi.shape[0] else z.new_zeros(0, 0)
        out.append({"positions": pos.cpu().numpy().astype(np.int32),
                    "is_resp": resp[b, pos].cpu().numpy(), "is_img": img[b, pos].cpu().numpy(),
                    "values": vals.cpu().numpy().astype(np.float32),
                    "indices": idx.cpu().numpy().astype(np.int32),
                    "gram": gram.cpu().numpy().astype(np.float32)})
    return out


def stored_rows(entries: Sequence[dict[str, Any]], student_logits: Any, batch: dict[str, Any],
                image_mask: Any, vocab_size: int, what: str) -> tuple[Any, Any]:
    """The student's logits cut to the vocabulary, and a batch's entries (one per row, in
    order) as ``StoredRows``; ``what`` names the teacher in messages. The entries' width is
    their ``top_k``: nothing else carries it to the loss."""
    import torch

    from workloads.kd_terms.teacher_rows import StoredRows
    from workloads.losses import align_vocab, response_mask

    s, _ = align_vocab(student_logits, student_logits, vocab_size)
    B, T, _V = s.shape
    top_k = int(np.asarray(entries[0]["values"]).shape[-1])
    vals = torch.zeros(B, T, top_k, dtype=torch.float32, device=s.device)
    idx = torch.zeros(B, T, top_k, dtype=torch.long, device=s.device)
    resp = torch.zeros(B, T, dtype=torch.bool, device=s.device)
    img = torch.zeros(B, T, dtype=torch.bool, device=s.device)
    grams = []
    for b, e in enumerate(entries):
        pos = torch.as_tensor(np.array(e["positions"]), dtype=torch.long, device=s.device)
        vals[b, pos] = torch.as_tensor(np.array(e["values"]), device=s.device)
        idx[b, pos] = torch.as_tensor(np.array(e["indices"]), dtype=torch.long, device=s.device)
        resp[b, pos] = torch.as_tensor(np.array(e["is_resp"]), device=s.device)
        img[b, pos] = torch.as_tensor(np.array(e["is_img"]), device=s.device)
        grams.append(torch.as_tensor(np.array(e["gram"]), device=s.device))
    if not (torch.equal(resp, response_mask(batch["labels"])) and torch.equal(img, image_mask)):
        raise ValueError(f"{what}: stored response/image positions differ from the training "
                         f"batch's; the data was tokenized differently")
    return s, StoredRows(vals, idx, resp, img, grams, vocab_size, what)


def own_batch(batch: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """The batch's ``teacher_`` columns (the teacher's own encoding of each row), unprefixed;
    float pixels cast to ``dtype`` when given."""
    import torch

    from workloads.data.preprocess import TEACHER_PREFIX

    n = len(TEACHER_PREFIX)
    t_batch = {k[n:]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
    pixels = t_batch.get("pixel_values")
    if dtype is not None and pixels is not None and torch.is_floating_point(pixels):
        t_batch["pixel_values"] = pixels.to(dtype)
    return t_batch


# a logit no softmax gives mass to (exp underflows to 0) but finite: 0 * log p stays 0
_ABSENT = -1e9


def cross_rows(entries: Sequence[dict[str, Any]], student_logits: Any, batch: dict[str, Any],
               t_batch: dict[str, Any], vocab_size: int, teacher_vocab_size: int, shared: Any,
               what: str) -> tuple[Any, Any]:
    """The student's logits cut to its vocabulary, and ``CrossRows`` from the entries of a
    teacher with another tokenizer, one per row of its own encoding ``t_batch`` in order: its
    ``(N_t, V_t)`` rows at the reply positions (the top-k scattered, the rest absent)."""
    import torch

    from workloads.data.preprocess import REPLY_GROUP
    from workloads.kd_terms.teacher_rows import CrossRows
    from workloads.losses import response_mask

    s = student_logits[..., :vocab_size]
    mask = response_mask(t_batch["labels"])
    rows = []
    for b, e in enumerate(entries):
        resp = np.asarray(e["is_resp"], dtype=bool)
        pos = np.asarray(e["positions"])[resp]
        if not np.array_equal(pos, mask[b].nonzero().squeeze(1).cpu().numpy()):
            raise ValueError(f"{what}: stored reply positions differ from the teacher's encoding "
                             f"of the training batch; the data was tokenized differently")
        vals = torch.as_tensor(np.array(e["values"])[resp], dtype=torch.float32)
        idx = torch.as_tensor(np.array(e["indices"])[resp], dtype=torch.long)
        full = torch.full((len(pos), teacher_vocab_size), _ABSENT, dtype=torch.float32)
        rows.append(full.scatter_(-1, idx, vals))
    t_rows = torch.cat(rows).to(s.device) if rows else s.new_zeros(0, teacher_vocab_size)
    if shared is not None:
        shared = tuple(np.asarray(ids, np.int64) for ids in shared)
    return s, CrossRows(None, t_batch["labels"], t_batch[REPLY_GROUP], batch["labels"],
                        batch[REPLY_GROUP], shared, what, t_rows=t_rows)
