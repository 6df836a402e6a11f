"""LLaVA-KD's relation loss L_rel: 1 - cosine similarity between the student's and the
teacher's self-correlation (Gram) matrices of the image tokens' logits, per image, averaged.
The Grams are built ``vocab_chunk`` columns at a time (``GroupGrams``), so no ``(N, V)``
temporary beyond the logits; ``relation_kd_loss_reference`` is the plain autograd version the
tests compare against. No temperature.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from workloads.kernels.chunked import check_pair
from workloads.kernels.fused_divergence import compute_dtype as _compute_dtype

__all__ = ["DEFAULT_VOCAB_CHUNK", "GroupGrams", "relation_from_grams", "relation_kd_loss",
           "relation_kd_loss_reference"]

DEFAULT_VOCAB_CHUNK = 4096


class GroupGrams(torch.autograd.Function):
    """Gram matrices ``Z_g Z_gᵀ`` of row groups of ``flat (R, V)``, summed over V-chunks, so
    no ``(N_p, V)`` copy is ever made in forward or backward."""

    @staticmethod
    def forward(ctx, flat, v_chunk, *groups):
        cdt = _compute_dtype(flat)
        rows = torch.cat(groups)
        sizes = [g.numel() for g in groups]
        grams = [torch.zeros(n, n, dtype=cdt, device=flat.device) for n in sizes]
        for c in range(0, flat.shape[1], v_chunk):
            z = flat[rows, c : c + v_chunk].to(cdt)
            for gram, zg in zip(grams, z.split(sizes)):
                gram.addmm_(zg, zg.T)
        ctx.save_for_backward(flat, rows)
        ctx.sizes, ctx.v_chunk = sizes, v_chunk
        return tuple(grams)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_grams):
        flat, rows = ctx.saved_tensors
        cdt = _compute_dtype(flat)
        # d<dG, Z Zᵀ>/dZ = (dG + dGᵀ) Z
        sym = [
            torch.zeros(n, n, dtype=cdt, device=flat.device) if g is None else (g + g.T).to(cdt)
            for g, n in zip(grad_grams, ctx.sizes)
        ]
        grad = torch.zeros_like(flat, memory_format=torch.contiguous_format)
        for c in range(0, flat.shape[1], ctx.v_chunk):
            z = flat[rows, c : c + ctx.v_chunk].to(cdt)
            out = torch.cat([s @ zg for s, zg in zip(sym, z.split(ctx.sizes))])
            grad[rows, c : c + ctx.v_chunk] = out.to(grad.dtype)
        return (grad, None) + (None,) * len(ctx.sizes)


def _image_groups(mask: torch.Tensor, tokens_per_image: int | None) -> list[torch.Tensor]:
    """Flat row indices ``b * T + t`` of each image's visual tokens, in batch order."""
    if mask.dim() != 2:
        raise ValueError(
            f"relation_kd_loss: image_token_mask must be (B, T), got {tuple(mask.shape)}"
        )
    T = mask.shape[1]
    groups: list[torch.Tensor] = []
    for b in range(mask.shape[0]):
        if mask.dtype == torch.bool:
            pos = mask[b].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            if tokens_per_image is None:
                parts = [pos]
            elif pos.numel() % tokens_per_image:
                raise ValueError(
                    f"relation_kd_loss: sample {b} has {pos.numel()} image tokens, not a "
                    f"multiple of tokens_per_image={tokens_per_image}"
                )
            else:
                parts = list(pos.split(tokens_per_image))
        else:
            ids = mask[b]
            parts = [(ids == i).nonzero().squeeze(1) for i in ids[ids >= 0].unique().tolist()]
        groups += [p + b * T for p in parts]
    return groups


def relation_from_grams(gs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(gs.flatten(), gt.flatten(), dim=0, eps=1e-8)


def relation_kd_loss(
    student_visual_logits: torch.Tensor | Sequence[torch.Tensor],
    teacher_visual_logits: torch.Tensor | Sequence[torch.Tensor],
    image_token_mask: torch.Tensor | None = None,
    tokens_per_image: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """L_rel (RDist): for each image with visual-token logits Z ``(N_p, V)``,
    ``1 - cos(vec(Z_s Z_sᵀ), vec(Z_t Z_tᵀ))``, averaged over images.

    Z are the *raw* logits, as in LLaVA-KD ("L_rel = 1 - cos(Z_s Z_sᵀ, Z_t Z_tᵀ) on visual
    logits"): the (N_p, N_p) self-correlation of the visual tokens' output vectors. No softmax
    is taken; cosine makes the term invariant to scaling either model's logits (a student at
    c * teacher logits, c > 0, has L_rel = 0), but not to adding a per-token constant.
    Z Zᵀ is accumulated over ``vocab_chunk``-wide vocabulary slices.

    Args:
        student_visual_logits, teacher_visual_logits: either lists of per-image ``(N_p, V)``
            tensors (pairwise equal shapes), or ``(B, T, V)`` logits with ``image_token_mask``.
        image_token_mask: ``(B, T)``. Bool (``input_ids == image_token_id``): each sample's
            image tokens form one image, or consecutive groups of ``tokens_per_image`` tokens
            when several images share a sample. Integer: an image id per token, ``-1`` for
            non-image tokens; tokens with equal id in one sample form one image.
            Samples without image tokens contribute nothing.

    Returns:
        Scalar: mean (or sum) over images; 0 with a zero gradient when there are no images.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(student_visual_logits, torch.Tensor):
        check_pair(student_visual_logits, teacher_visual_logits, "relation_kd_loss")
        if image_token_mask is None:
            raise ValueError("relation_kd_loss: (B, T, V) logits need image_token_mask")
        if image_token_mask.shape != student_visual_logits.shape[:-1]:
            raise ValueError(
                f"relation_kd_loss: image_token_mask {tuple(image_token_mask.shape)} must equal "
                f"the logits' leading dims {tuple(student_visual_logits.shape[:-1])}"
            )
        groups = _image_groups(image_token_mask, tokens_per_image)
        V = student_visual_logits.shape[-1]
        s_flat = student_visual_logits.reshape(-1, V)
        t_flat = teacher_visual_logits.reshape(-1, V)
        if not groups:
            return s_flat[:0].sum().to(_compute_dtype(s_flat))
        s_grams = GroupGrams.apply(s_flat, vocab_chunk, *groups)
        t_grams = GroupGrams.apply(t_flat, vocab_chunk, *groups)
        pairs = list(zip(s_grams, t_grams))
    else:
        students, teachers = list(student_visual_logits), list(teacher_visual_logits)
        if len(students) != len(teachers):
            raise ValueError(
                f"relation_kd_loss: {len(students)} student images vs {len(teachers)} "
                "teacher images"
            )
        if not students:
            raise ValueError("relation_kd_loss: empty image list; pass (B, T, V) logits and a mask")
        pairs = []
        for zs, zt in zip(students, teachers):
            if zs.dim() != 2 or zs.shape != zt.shape:
                raise ValueError(
                    f"relation_kd_loss: per-image logits must be matching (N_p, V) tensors, got "
                    f"{tuple(zs.shape)} and {tuple(zt.shape)}"
                )
            rows = torch.arange(zs.shape[0], device=zs.device)
            pairs.append((GroupGrams.apply(zs, vocab_chunk, rows)[0],
                          GroupGrams.apply(zt, vocab_chunk, rows)[0]))
    total = torch.stack([relation_from_grams(gs, gt) for gs, gt in pairs]).sum()
    return total / len(pairs) if reduction == "mean" else total


def relation_kd_loss_reference(
    student_visual_logits: Sequence[torch.Tensor], teacher_visual_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Unchunked definition of :func:`relation_kd_loss` on per-image ``(N_p, V)`` lists."""
    losses = []
    for zs, zt in zip(student_visual_logits, teacher_visual_logits):
        cdt = _compute_dtype(zs)
        zs, zt = zs.to(cdt), zt.to(cdt)
        losses.append(relation_from_grams(zs @ zs.T, zt @ zt.T))
    return torch.stack(losses).mean()
