"""LLaVA-KD distillation losses (Cai et al. 2024) as pure torch functions.

    total = ce + alpha * L_res + beta * L_vis + gamma * L_rel        (paper: 1, 1, 0.5; tau = 1)

Conventions used everywhere in this file:

* Logits are ``(B, T, V)`` (or ``(N, V)``), masks ``(B, T)`` (or ``(N,)``) bool. Teacher and
  student see the same ``input_ids`` and share a tokenizer; padded vocabulary rows are cut
  off with :func:`align_vocab` first — shapes are never broadcast.
* Divergences are between next-token distributions ``softmax(logits / tau)`` at one position,
  named by ``kind``: a divergence of the registry in ``workloads/divergences/`` (``fkl``,
  ``rkl``, ``jsd``, ``skew_kl``, ...; one file each), optionally with its parameters
  (``{"name": "skew_kl", "alpha": 0.1}``); an unknown name is an error listing them. Every
  KD term is scaled by ``tau**2`` (Hinton et al.) so its gradient scale does not depend on tau.
  ``reduction="mean"`` averages over *selected positions of the whole batch* (token level, like
  HF's CE); ``"sum"`` lets the caller normalize across micro-batches. Nothing selected gives
  exactly 0 with a graph (zero gradients), never NaN.
* Math runs in float32 for half-precision inputs (float64 stays float64); gradients come
  back in the input's dtype.
* The machinery lives in ``workloads/kernels/``: ``chunked.py`` (a divergence over selected
  rows, chunk by chunk, never a full ``(B, T, V)`` temporary; the top-k divergence),
  ``fused_divergence.py`` (one fused pass where the divergence has a pointwise form; Triton on
  CUDA), ``relation.py`` (Gram matrices a vocabulary chunk at a time). This file holds what the
  KD terms call: the vocabulary cut, the response mask, L_res, L_vis, and the objective.
* ``tau`` and ``tau**2`` apply to the divergences (L_res, L_vis, top-k); L_rel has no
  temperature.
"""

from __future__ import annotations

import torch

from workloads.kernels.chunked import (DEFAULT_CHUNK_SIZE, Kernel, KindLike, Reduction,
                                       kd_divergence, kd_divergence_reference,
                                       topk_kd_divergence)
from workloads.kernels.relation import (DEFAULT_VOCAB_CHUNK, GroupGrams, relation_from_grams,
                                        relation_kd_loss, relation_kd_loss_reference)

# the kernels' entry points are re-exported: callers name the losses from one place
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_VOCAB_CHUNK",
    "align_vocab",
    "kd_divergence",
    "kd_divergence_reference",
    "response_kd_loss",
    "response_mask",
    "visual_kd_loss",
    "relation_kd_loss",
    "relation_kd_loss_reference",
    "relation_from_grams",
    "GroupGrams",
    "topk_kd_divergence",
    "kd_objective",
]


# ----------------------------------------------------------------------------- validation


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice both logits to the shared real vocabulary ``[..., :vocab_size]`` (views, no copy).

    HF checkpoints often pad the LM head (e.g. 152064 rows for a 151936-token tokenizer); the
    padded rows are not tokens and must not enter a softmax that is compared across models.

    Args:
        student_logits: ``(..., V_s)`` with ``V_s >= vocab_size``.
        teacher_logits: ``(..., V_t)`` with ``V_t >= vocab_size`` and the same leading dims.
        vocab_size: the tokenizer's length (``len(tokenizer)``).

    Raises:
        ValueError: leading dims differ, or a logit dim is smaller than ``vocab_size``.
    """
    if vocab_size <= 0:
        raise ValueError(f"align_vocab: vocab_size must be positive, got {vocab_size}")
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s[:-1] != t[:-1]:
        raise ValueError(
            f"align_vocab: student logits {s} and teacher logits {t} differ outside the vocab "
            "dim; teacher and student must be run on the same batch (same input_ids, same "
            "number of image tokens) — slicing the vocabulary cannot fix this"
        )
    for name, shape in (("student", s), ("teacher", t)):
        if shape[-1] < vocab_size:
            raise ValueError(
                f"align_vocab: {name} logits have {shape[-1]} vocab entries but vocab_size is "
                f"{vocab_size}; the models do not share this tokenizer (check that both were "
                "resized to len(tokenizer))"
            )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


# ------------------------------------------------------------------- L_res and L_vis


def response_mask(
    labels: torch.Tensor, ignore_index: int = -100, labels_shifted: bool = False
) -> torch.Tensor:
    """Bool ``(B, T)`` mask over *logit* positions whose next token is a response token.

    HF causal LMs (and ``LlavaForConditionalGeneration``) compare ``logits[:, :-1]`` with
    ``labels[:, 1:]``: the logits at position t predict token t+1. So logit position t counts
    iff ``labels[:, t + 1] != ignore_index``, and the last position never counts. With
    ``labels_shifted=True`` the labels are already aligned with the logits (HF's
    ``shift_labels``) and the mask is simply ``labels != ignore_index``.
    """
    if labels_shifted:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


def response_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    labels_shifted: bool = False,
    reduction: Reduction = "mean",
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """L_res: :func:`kd_divergence` at the positions HF's CE loss trains on.

    Args:
        student_logits, teacher_logits: ``(B, T, V)``, unshifted model outputs.
        labels: ``(B, T)`` int, the same labels given to the model (``ignore_index`` on prompt,
            image and padding tokens); see :func:`response_mask` for the shift.

    Returns:
        Scalar: mean over response positions of the batch (0 if there are none).
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"response_kd_loss: labels {tuple(labels.shape)} must match the logits' leading "
            f"dims {tuple(student_logits.shape[:-1])}"
        )
    mask = response_mask(labels, ignore_index, labels_shifted)
    return kd_divergence(
        student_logits, teacher_logits, mask, kind, temperature, chunk_size, reduction, kernel
    )


def visual_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    image_token_mask: torch.Tensor,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    reduction: Reduction = "mean",
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """L_vis: :func:`kd_divergence` over the logits *at* image-token positions (no shift: the
    distributions the two models output while reading the visual tokens are compared).

    Args:
        student_logits, teacher_logits: ``(B, T, V)``.
        image_token_mask: ``(B, T)``, ``input_ids == image_token_id`` (bool); an integer
            image-id mask (see :func:`relation_kd_loss`) is accepted too, ``>= 0`` = image.
            Any number of image tokens per sample; samples without an image add nothing.

    Returns:
        Scalar: mean over all image-token positions of the batch (0 if there are none).
    """
    mask = image_token_mask if image_token_mask.dtype == torch.bool else image_token_mask >= 0
    return kd_divergence(
        student_logits, teacher_logits, mask, kind, temperature, chunk_size, reduction, kernel
    )


# ------------------------------------------------------------------------ the objective


def kd_objective(
    ce: torch.Tensor,
    l_res: torch.Tensor | None = None,
    l_vis: torch.Tensor | None = None,
    l_rel: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``total = ce + alpha * l_res + beta * l_vis + gamma * l_rel`` (LLaVA-KD: 1, 1, 0.5).

    A term given as None (e.g. the SFT stage, or no KD term configured) is left out.
    Returns the total (with graph) and ``{"loss", "ce", "l_res", "l_vis", "l_rel"}`` detached,
    for logging — only the terms that were given.
    """
    from workloads.kd_terms import objective

    given = {n: v for n, v in (("res", l_res), ("vis", l_vis), ("rel", l_rel)) if v is not None}
    return objective(ce, given, {"res": alpha, "vis": beta, "rel": gamma})
