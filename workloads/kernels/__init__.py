"""KD kernels: how a divergence is computed over many logit rows (what is computed is defined in
``workloads/divergences/``; the KD terms in ``workloads/kd_terms/``, the functions they call in
``workloads/losses.py``).

- ``fused_divergence``: divergences with a pointwise form, fused per row block: Triton on CUDA
  (``triton_divergence``), torch elsewhere. The default.
- ``chunked``: any divergence, ``chunk`` rows at a time with recomputation in backward; the
  fallback for a divergence with no pointwise form; the top-k divergence of stored teachers.
  Its reference (``kd_divergence_reference``): plain autograd, full-size temporaries; the
  oracle every kernel is tested against.
- ``relation``: L_rel's Gram matrices, a vocabulary chunk at a time, and their reference.
"""

from workloads.kernels.fused_divergence import FusedDivergence, fused_backend, triton_available

__all__ = ["FusedDivergence", "fused_backend", "triton_available"]
