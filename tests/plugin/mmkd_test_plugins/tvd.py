"""A KD divergence: total variation distance (a user's own extension, found by mmkd through its entry-point group alone)."""

from __future__ import annotations

from workloads.divergences import register_divergence


def tvd_rows(log_p_s, log_p_t):
    """``(C, V)`` log-probabilities -> ``(C,)`` total variation 0.5 * sum |p_s - p_t|."""
    return 0.5 * (log_p_s.exp() - log_p_t.exp()).abs().sum(-1)


register_divergence("tvd", tvd_rows, description="total variation distance (test plugin)")
