"""What `mmkd` prints: tables that never cut a stage name, user errors as one paragraph, and
Ray's own output kept out of the way of the stage events.

A run on a terminal shows a live table; elsewhere (CI logs, `mmkd logs JOB`) it prints one line
per stage event. Either way Ray's, Ray Data's and MLflow's own output (progress bars, worker
stdout/stderr, start-up notices) goes to ``output.log`` in the run's folder unless ``--verbose``:
without a TTY, Ray Data alone prints its progress bars as thousands of lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


# Set by `mmkd run` (not --verbose): the file that receives Ray's output. `ensure_ray` reads it.
RAY_OUTPUT_ENV = "MMKD_RAY_OUTPUT"
# Loggers whose records are Ray's or MLflow's business, not a stage event.
_QUIET_LOGGERS = ("ray", "mlflow", "alembic", "sqlalchemy.engine", "huey", "urllib3", "filelock",
                  "py.warnings", "torch", "deepspeed", "transformers")


# -- tables ---------------------------------------------------------------------------------
def print_table(table: Table, console: Console, keep: tuple[str, ...] = ("stage",)) -> None:
    """Print ``table`` without ever cutting the columns named in ``keep``.

    On a terminal the kept columns get the width of their longest cell and the others wrap;
    elsewhere (a pipe, a file) the table is printed as wide as its content needs.
    """
    for col in table.columns:
        if col.header in keep:
            cells = [str(c) for c in col.cells] + [str(col.header)]
            col.no_wrap = True
            col.min_width = max(len(c) for c in cells)
        else:
            col.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    wide = Console(width=10_000, file=console.file, force_terminal=False, color_system=None)
    need = Measurement.get(wide, wide.options, table).maximum
    Console(width=max(need, 20), file=console.file, color_system=None).print(table)


# -- user errors ----------------------------------------------------------------------------
_S3_REGION = re.compile(r"resolving region for bucket '([^']+)'")
_S3_DETAIL = re.compile(r"Details:\s*(.+)")
_S3_ERROR = re.compile(r"AWS Error (\w+)")


def explain_store_error(e: BaseException, where: str | None = None) -> str | None:
    """One sentence for an object-store error raised by pyarrow (no network, no credentials,
    unknown bucket), or None when ``e`` is not one; ``where`` names the URI when known."""
    text = str(e)
    if not isinstance(e, OSError) or not any(
            s in text for s in ("AWS Error", "resolving region", "S3", "GCS", "gs://", "s3://")):
        return None
    bucket = _S3_REGION.search(text)
    where = (f"s3://{bucket.group(1)}" if bucket else first_uri(text) or where
             or "the object store")
    m = _S3_DETAIL.search(text) or _S3_ERROR.search(text)
    reason = m.group(1).strip() if m else text.splitlines()[0][:200]
    return (f"could not reach {where}: {reason}; check the network and your credentials "
            f"(AWS_PROFILE, ~/.aws/credentials or an instance role), or use --offline to check "
            f"the pipeline without opening its data")


def first_uri(text: str) -> str | None:
    """The first object-store URI in ``text``, without its query (endpoint options)."""
    m = re.search(r"\b(?:s3|gs|gcs|hdfs)://[^\s'\"?,}]+", text)
    return m.group(0) if m else None


def internal_error(e: BaseException, log_dir: Path) -> str:
    """Write ``e``'s traceback to a file and return the one paragraph to print instead."""
    path = None
    for folder in (log_dir, Path("/tmp")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"mmkd-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(f"mmkd {' '.join(sys.argv[1:])}\n\n"
                            + "".join(traceback.format_exception(e)))
            break
        except OSError:
            path = None
    where = f"the full traceback is in {path}" if path else "the traceback could not be saved"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"internal error: {type(e).__name__}{': ' + first[:300] if first else ''}. This is "
            f"a bug in mmkd, not in your pipeline; {where} (attach it to a bug report), and "
            f"`--verbose` shows Ray's own output.")


# -- Ray's own output -----------------------------------------------------------------------
class QuietOutput:
    """Route Ray's, Ray Data's and MLflow's output of this process (and of the stage tasks it
    starts) to a file; the "mmkd" logger and the stage events stay on the console. Records are
    held in memory until the run has a folder (``to_file``).

    The routing happens at the root logger, by logger name: ``ray.init(configure_logging=False)``
    clears the "ray" logger's handlers, so a handler put there would not last."""

    def __init__(self):
        global _QUIET
        _QUIET = True
        # read where Ray Data is imported: here and in every stage task (`forwarded_env`)
        os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        logging.captureWarnings(True)
        root = logging.getLogger()
        for handler in root.handlers:
            handler.addFilter(_ByName(keep=False))
        _route_quiet_loggers()  # again after MLflow or Ray is imported (after_import)
        self._handler: logging.Handler = logging.handlers.MemoryHandler(
            10_000, flushLevel=logging.CRITICAL + 1)
        self._handler.addFilter(_ByName(keep=True))
        root.addHandler(self._handler)
        if "ray.data" in sys.modules:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False

    def to_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_ByName(keep=True))
        memory, self._handler = self._handler, handler
        memory.setTarget(handler)
        memory.flush()
        root = logging.getLogger()
        root.removeHandler(memory)
        root.addHandler(handler)
        os.environ[RAY_OUTPUT_ENV] = str(path)  # `ensure_ray` diverts the workers' output there
        return path


_QUIET = False  # a QuietOutput is routing the quiet loggers


def after_import() -> None:
    """Call after the first import of MLflow or Ray: their imports give their loggers console
    handlers of their own, which would bypass the routing to the run's output.log."""
    if _QUIET:
        _route_quiet_loggers()


def _route_quiet_loggers() -> None:
    """The quiet loggers hand their records to the root logger's (filtered) handlers."""
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [], True


class _ByName(logging.Filter):
    """Passes the records of the quiet loggers (``keep=True``) or all the others."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = any(record.name == n or record.name.startswith(n + ".") for n in _QUIET_LOGGERS)
        return quiet == self.keep


def divert_worker_output() -> str | None:
    """After ``ray.init``: write what Ray forwards from the workers (their stdout/stderr, Ray
    Data's and Ray Train's chatter) to the file named by MMKD_RAY_OUTPUT instead of the
    console. Returns that path, or None when the output stays on the console."""
    target = os.environ.get(RAY_OUTPUT_ENV)
    if not target:
        return None
    after_import()  # importing Ray gave its loggers console handlers of their own
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays on the console
        return None
    stream = open(target, "a", buffering=1)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("mmkd_output_log", lambda data: _write_worker_lines(data, stream))
    if "ray.data" in sys.modules:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    return target


def _write_worker_lines(data: dict, stream: IO[str]) -> None:
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its periodic status report: only the events, as Ray
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        if "__ray_tqdm_magic_token__" not in line:  # progress-bar state updates
            stream.write(f"{prefix} {line}\n")
