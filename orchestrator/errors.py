"""What the command line says about an error that reached it: the user's mistakes are exit 2
with one paragraph saying what to do; anything else is an internal error (exit 1) whose
traceback goes to a log file, never to the terminal."""

from __future__ import annotations

import os

from orchestrator.console import explain_store_error, internal_error
from orchestrator.spec import PipelineError

__all__ = ["explain"]


def explain(e: Exception) -> tuple[int, str]:
    """Exit code and one paragraph for an error that reached `main`: the user's mistakes are
    2 with what to do; anything else is an internal error (1) with its traceback in a file."""
    from orchestrator.submit import SubmitError
    from orchestrator.tune_spec import TuneError

    if isinstance(e, PipelineError):
        return 2, f"invalid pipeline: {e}"
    if isinstance(e, TuneError):
        return 2, f"invalid tune spec: {e}"
    if isinstance(e, SubmitError):
        return 2, f"error: {e}"
    try:
        from orchestrator.plugin import PluginError, UnknownWorkloadError
    except ImportError:
        PluginError = UnknownWorkloadError = ()  # noqa: N806
    if isinstance(e, PluginError):  # an installed workload package is broken
        return 2, f"error: {e}"
    if isinstance(e, UnknownWorkloadError):
        return 2, f"error: {e.args[0] if e.args else e}"
    store = explain_store_error(e)
    if store:
        return 2, f"error: {store}"
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                      FileExistsError)):
        return 2, f"error: {e}"
    full = disk_full(e)
    if full:
        return 2, f"error: {full}"
    if isinstance(e, ConnectionError) or type(e).__name__ == "ConnectionError":
        where = os.environ.get("RAY_ADDRESS")
        hint = (f"check RAY_ADDRESS ({where}) and that the cluster is up, or unset it to run on "
                f"a local Ray" if where else "check the address and that the service is up")
        return 2, f"error: could not connect: {e}; {hint}"
    if isinstance(e, ValueError):  # a bad --set / --force / --only / data-shapes argument
        return 2, f"error: {e}"
    from orchestrator.artifact_store import mmkd_home

    return 1, internal_error(e, mmkd_home() / "logs")


def disk_full(e: BaseException) -> str | None:
    """"disk full at PATH" for an ENOSPC (or EDQUOT) anywhere in ``e``'s chain, else None."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = e.filename or "the disk mmkd writes to (MMKD_HOME, the store, /tmp)"
            return (f"disk full at {where}: free space there and run the same command again; "
                    f"what was published before is unchanged, and finished stages are cached")
        e = e.__cause__ or e.__context__
    return None

