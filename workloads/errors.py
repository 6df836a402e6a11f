"""Errors a stage raises when retrying cannot help, and how they cross Ray's wrappers.

A ``StageError`` (bad data beyond the budget, a non-finite loss, a teacher that does not fit its
student) fails the same way on every attempt: Ray Train must not restart the worker group for
it (``NoRetryOnStageErrors``), and the user must read its own message, not Ray's wrapping of it
(``root_stage_error``). Worker deaths and other system errors are retried as before.
"""

from __future__ import annotations

from typing import Any

from orchestrator.plugin import StageError, iter_causes, root_stage_error

__all__ = ["StageError", "NonFiniteLossError", "iter_causes", "root_stage_error",
           "no_retry_failure_policy"]


class NonFiniteLossError(StageError):
    """A loss term or the gradient norm became NaN or infinite."""


def no_retry_failure_policy(failure_config: Any) -> Any:
    """Ray Train's default failure policy, except that a worker group failing with a
    ``StageError`` (or any exception marked ``deterministic``) is raised at once instead of
    restarted ``max_failures`` times. Ray 2.60 has no public hook for this; the policy object
    is built by the trainer and shipped to its controller, so a subclass works."""
    from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                                   FailureDecision)

    class NoRetryOnStageErrors(DefaultFailurePolicy):
        def make_decision(self, training_failed_error: Any) -> Any:
            if root_stage_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return NoRetryOnStageErrors(failure_config)
