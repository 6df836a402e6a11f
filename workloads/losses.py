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
* Chunked paths never materialize full ``(B, T, V)`` temporaries: a custom autograd Function
  gathers ``chunk_size`` selected rows at a time in forward and recomputes them in backward
  (the divergence's closed-form gradients; autograd on the chunk for a divergence that
  registered none), so the only full-size allocation is the logits' own gradient.
  ``torch.utils.checkpoint`` per chunk was measured and rejected: each chunk's gather backward
  allocates a full-size zero gradient (about 3x the memory and 1.6x the time). See
  ``benchmarks/kd_loss_memory.py``. These Functions are once-differentiable (no double
  backward).
* ``tau`` and ``tau**2`` apply to the divergences (L_res, L_vis, top-k); L_rel has no
  temperature.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from workloads.divergences import Divergence, DivergenceSpec, resolve_divergence
from workloads.kernels.fused_divergence import compute_dtype as _compute_dtype
from workloads.kernels.fused_divergence import tempered_rows

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "align_vocab",
    "kd_divergence",
    "kd_divergence_reference",
    "response_kd_loss",
    "response_mask",
    "visual_kd_loss",
    "relation_kd_loss",
    "relation_kd_loss_reference",
    "topk_kd_divergence",
    "kd_objective",
]

# A registered divergence: its name ("fkl", "rkl", "jsd", "skew_kl", ...: see
# workloads/divergences/), a mapping {"name": "skew_kl", "alpha": 0.1}, or a DivergenceSpec.
KindLike = Union[str, Mapping[str, Any], DivergenceSpec]
Reduction = Literal["mean", "sum"]
# "auto": fused when the divergence has a pointwise form (Triton on CUDA), else chunked;
# "fused" / "chunked" force one (benchmarks and tests compare them)
Kernel = Literal["auto", "fused", "chunked"]
# Rows per chunk: at V=32k one fp32 (C, V) temporary is 16 MB; at V=152k, 78 MB.
DEFAULT_CHUNK_SIZE = 128
DEFAULT_VOCAB_CHUNK = 4096


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


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        hint = (
            " (only the vocab dim differs: call align_vocab(student, teacher, len(tokenizer)) "
            "first)" if student.shape[:-1] == teacher.shape[:-1] else ""
        )
        raise ValueError(
            f"{what}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} must have the same shape{hint}"
        )
    if student.dim() not in (2, 3):
        raise ValueError(f"{what}: logits must be (B, T, V) or (N, V), got {tuple(student.shape)}")


def _check_kind(kind: KindLike, temperature: float, reduction: str
                ) -> tuple[Divergence, dict[str, Any]]:
    """The registered divergence ``kind`` names and its parameters; errors for bad arguments."""
    resolved = resolve_divergence(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return resolved


def _rows(logits: torch.Tensor, mask: torch.Tensor | None, what: str):
    """Flatten ``(B, T, V)`` to ``(B*T, V)`` (a view) and return the selected row indices."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat, torch.arange(flat.shape[0], device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"{what}: mask shape {tuple(mask.shape)} must equal the logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    return flat, mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)


# ------------------------------------------------------------------------- the divergence


def _divergence_rows(s: torch.Tensor, t: torch.Tensor, div: Divergence | KindLike,
                     params: dict[str, Any] | None = None) -> torch.Tensor:
    """Per-row divergence of already-tempered logits ``(C, V)`` -> ``(C,)``; autograd-safe.
    (``div`` may also be a name: ``benchmarks/kd_loss_memory.py`` calls it with ``"fkl"``.)"""
    if not isinstance(div, Divergence):
        div, params = resolve_divergence(div)
    return div.rows(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), **params)


def _chunk_value_and_grads(s, t, div, params, need_s, need_t):
    """``(D (C,), dD/ds, dD/dt)`` of one chunk of tempered logits (buffers the caller gives
    away): the divergence's closed form when it registered one, else autograd of its ``rows``
    on this chunk only (so memory stays bounded by the chunk either way)."""
    if div.grads is not None:
        return div.grads(s, t, need_s, need_t, **params)
    if not (need_s or need_t):
        with torch.no_grad():
            return _divergence_rows(s, t, div, params), None, None
    with torch.enable_grad():
        s, t = s.requires_grad_(need_s), t.requires_grad_(need_t)
        value = _divergence_rows(s, t, div, params)
        wrt = [x for x, need in ((s, need_s), (t, need_t)) if need]
        grads = iter(torch.autograd.grad(value.sum(), wrt))
    return (value.detach(), next(grads) if need_s else None, next(grads) if need_t else None)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over selected rows of D(rows), computed ``chunk`` rows at a time in both passes."""

    @staticmethod
    def forward(ctx, s_flat, t_flat, idx, div, params, temperature, chunk):
        total = torch.zeros((), dtype=_compute_dtype(s_flat), device=s_flat.device)
        for i in range(0, idx.numel(), chunk):
            s, t = _tempered_chunk(s_flat, t_flat, idx[i : i + chunk], temperature)
            total += _chunk_value_and_grads(s, t, div, params, False, False)[0].sum()
        ctx.save_for_backward(s_flat, t_flat, idx)
        ctx.div, ctx.params, ctx.temperature, ctx.chunk = div, params, temperature, chunk
        return total * temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        s_flat, t_flat, idx = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(tau^2 * D(x / tau)) / dx = tau * dD/ds
        scale = grad_out.to(_compute_dtype(s_flat)) * ctx.temperature
        contiguous = torch.contiguous_format
        gs_full = torch.zeros_like(s_flat, memory_format=contiguous) if need_s else None
        gt_full = torch.zeros_like(t_flat, memory_format=contiguous) if need_t else None
        for i in range(0, idx.numel(), ctx.chunk):
            rows = idx[i : i + ctx.chunk]
            s, t = _tempered_chunk(s_flat, t_flat, rows, ctx.temperature)
            _, gs, gt = _chunk_value_and_grads(s, t, ctx.div, ctx.params, need_s, need_t)
            if need_s:
                gs_full.index_copy_(0, rows, gs.mul_(scale).to(gs_full.dtype))
            if need_t:
                gt_full.index_copy_(0, rows, gt.mul_(scale).to(gt_full.dtype))
        return gs_full, gt_full, None, None, None, None, None


def _tempered_chunk(s_flat, t_flat, rows, temperature):
    """Fresh ``(C, V)`` copies of the selected rows in the compute dtype, divided by tau."""
    return [tempered_rows(flat, rows, temperature) for flat in (s_flat, t_flat)]


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    reduction: Reduction = "mean",
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """Divergence between teacher and student next-token distributions at masked positions.

    With p_s = softmax(student / tau), p_t = softmax(teacher / tau) at one position, e.g.:

    * ``"fkl"`` (default): KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)  (mode covering)
    * ``"rkl"``: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)            (mode seeking)
    * ``"jsd"``: with m = (p_s + p_t) / 2 (beta = 0.5),
      JSD = KL(p_t || m) / 2 + KL(p_s || m) / 2, in nats, bounded by log 2.
    * ``{"name": "skew_kl", "alpha": a}``: KL(p_t || a p_t + (1 - a) p_s) (DistiLLM);
      ``"skew_rkl"`` the reverse. ``workloads.divergences.list_divergences()`` has them all.

    All are exactly 0 when the logits are equal (unlike torchtune's ``ForwardKLLoss``,
    which is a cross-entropy). The per-position value is multiplied by ``tau**2``.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        teacher_logits: same shape as ``student_logits`` (usually detached).
        mask: bool ``(B, T)`` / ``(N,)``, True = position counts; None = all positions.
        kind: a registered divergence's name, or ``{"name": ..., **its params}``, or a
            ``DivergenceSpec``.
        temperature: tau > 0, applied to both logits.
        chunk_size: selected positions processed per chunk (forward and backward) on the
            torch paths; None runs :func:`kd_divergence_reference` (plain autograd, full-size
            temporaries).
        reduction: ``"mean"`` over selected positions (0 if none) or ``"sum"``.
        kernel: ``"auto"`` runs the fused kernel (``workloads/kernels/``) where it is the
            faster one: Triton on CUDA for the built-ins; elsewhere the chunked kernel for a
            divergence with closed-form gradients and the fused torch path for one with only
            a pointwise form. ``"fused"`` / ``"chunked"`` choose.

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).
    """
    div, params = _check_kind(kind, temperature, reduction)
    _check_pair(student_logits, teacher_logits, "kd_divergence")
    if chunk_size is None:
        return kd_divergence_reference(
            student_logits, teacher_logits, mask, kind, temperature, reduction
        )
    if chunk_size <= 0:
        raise ValueError(f"kd_divergence: chunk_size must be positive or None, got {chunk_size}")
    if kernel not in ("auto", "fused", "chunked"):
        raise ValueError(f"kd_divergence: kernel must be auto, fused or chunked, got {kernel!r}")
    s_flat, idx = _rows(student_logits, mask, "kd_divergence")
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    backend = None
    if kernel != "chunked":
        from workloads.kernels import fused_backend

        backend = fused_backend(div, s_flat.device, s_flat.dtype,
                                prefer_closed_form=kernel == "auto")
        if backend is None and kernel == "fused":
            raise ValueError(f"kd_divergence: divergence {div.name!r} has no pointwise form, so "
                             "it has no fused kernel; use kernel='auto' or 'chunked'")
    if backend is not None:
        from workloads.kernels import FusedDivergence

        if s_flat.stride(-1) != 1 or t_flat.stride(-1) != 1:
            s_flat, t_flat = s_flat.contiguous(), t_flat.contiguous()
        total = FusedDivergence.apply(s_flat, t_flat, idx, div, params, float(temperature),
                                      chunk_size, backend)
    else:
        total = _ChunkedDivergence.apply(s_flat, t_flat, idx, div, params, float(temperature),
                                         chunk_size)
    return total / max(idx.numel(), 1) if reduction == "mean" else total


def kd_divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Unchunked definition of :func:`kd_divergence` (same args, same result): select the
    masked rows, then log-softmax them all at once. Simple to read, full-size memory."""
    div, params = _check_kind(kind, temperature, reduction)
    _check_pair(student_logits, teacher_logits, "kd_divergence_reference")
    s_flat, idx = _rows(student_logits, mask, "kd_divergence_reference")
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    cdt = _compute_dtype(student_logits)
    s = s_flat[idx].to(cdt) / temperature
    t = t_flat[idx].to(cdt) / temperature
    total = _divergence_rows(s, t, div, params).sum() * temperature**2
    return total / max(idx.numel(), 1) if reduction == "mean" else total


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


# -------------------------------------------------------------------------------- L_rel


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
        _check_pair(student_visual_logits, teacher_visual_logits, "relation_kd_loss")
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


# ------------------------------------------------------------------- offline top-k teacher


def topk_kd_divergence(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: KindLike = "fkl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`kd_divergence` against a teacher stored offline as its top-k logits.

    Both distributions live on the teacher's top-k support S (per position):
    p_t = softmax(teacher_topk_values / tau) and p_s = softmax(student_logits[S] / tau), i.e.
    the student is *renormalized over S*. This keeps a true divergence (0 when the student's
    logits on S equal the teacher's up to a constant) and matches the full-vocabulary value
    exactly when k = V. It does not penalize student mass outside S; the un-renormalized
    alternative (student log-probs over the full V) would, but is not 0 at the optimum.
    Only ``(N, k)`` tensors are built, so no chunking is needed for k << V.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        teacher_topk_values: ``(B, T, k)`` / ``(N, k)`` teacher logits (finite), any order.
        teacher_topk_indices: same shape, int64 vocab ids, distinct per position (torch.topk).
        mask: bool ``(B, T)`` / ``(N,)`` as in :func:`kd_divergence`.
    """
    div, params = _check_kind(kind, temperature, reduction)
    V = student_logits.shape[-1]
    if teacher_topk_values.shape != teacher_topk_indices.shape or (
        teacher_topk_values.shape[:-1] != student_logits.shape[:-1]
    ):
        raise ValueError(
            f"topk_kd_divergence: top-k values {tuple(teacher_topk_values.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must both be (*student leading dims, k); student "
            f"logits are {tuple(student_logits.shape)}"
        )
    k = teacher_topk_values.shape[-1]
    if k > V:
        raise ValueError(f"topk_kd_divergence: k={k} exceeds the student's vocabulary {V}")
    s_flat, idx = _rows(student_logits, mask, "topk_kd_divergence")
    ind = teacher_topk_indices.reshape(-1, k)[idx].long()
    if ind.numel() and (int(ind.max()) >= V or int(ind.min()) < 0):
        raise ValueError(
            f"topk_kd_divergence: teacher top-k indices must lie in [0, {V}); align the "
            "vocabularies before storing the teacher"
        )
    cdt = _compute_dtype(student_logits)
    s = s_flat[idx[:, None], ind].to(cdt) / temperature  # (N, k), no (N, V) copy
    t = teacher_topk_values.reshape(-1, k)[idx].to(cdt) / temperature
    total = _divergence_rows(s, t, div, params).sum() * temperature**2
    return total / max(idx.numel(), 1) if reduction == "mean" else total


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
