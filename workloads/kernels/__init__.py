"""KD kernels: how a divergence is computed over many logit rows (what is computed is defined in
``workloads/divergences/``; the KD terms in ``workloads/losses.py``).

- ``fused_divergence``: divergences with a pointwise form, fused per row block: Triton on CUDA
  (``triton_divergence``), torch elsewhere. The default.
- the chunked kernel (``losses._ChunkedDivergence``): any divergence, ``chunk`` rows at a time
  with recomputation in backward; the fallback for a divergence with no pointwise form.
- the reference (``losses.kd_divergence_reference``): plain autograd, full-size temporaries; the
  oracle every kernel is tested against.
"""

from workloads.kernels.fused_divergence import FusedDivergence, fused_backend, triton_available

__all__ = ["FusedDivergence", "fused_backend", "triton_available"]
