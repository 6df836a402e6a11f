"""What `mmkd run` shows while it works: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator.run_records import RunRecord, format_duration

_STYLE = {"pending": "dim", "running": "bold cyan", "cached": "blue", "done": "green",
          "failed": "bold red", "skipped": "yellow"}


def stage_table(record: RunRecord, title: str | None = None) -> Table:
    table = Table(title=title or escape(f"{record.pipeline}  {record.run_id}  [{record.status}]"))
    longest = max((len(name) for name in record.stages), default=5)
    for col in ("stage", "workload", "status", "step", "loss", "elapsed", "ETA", "key"):
        # the stage name is never cut: it gets its full width, the other columns wrap
        table.add_column(col, no_wrap=col in ("stage", "key"),
                         min_width=max(longest, 5) if col == "stage" else None,
                         overflow="ellipsis" if col in ("stage", "key") else "fold")
    now = time.time()
    for s in record.stages.values():
        step = f"{s.step}/{s.total_steps}" if s.step is not None and s.total_steps else (
            str(s.step) if s.step is not None else "")
        loss = s.last_metrics.get("loss", s.metrics.get("loss") if isinstance(s.metrics, dict) else None)
        elapsed = (s.ended or now) - s.started if s.started else None
        eta = None
        if s.status == "running" and s.step and s.total_steps and elapsed:
            eta = elapsed / s.step * (s.total_steps - s.step)
        table.add_row(s.name, s.workload, f"[{_STYLE.get(s.status, '')}]{s.status}[/]", step,
                      f"{loss:.4g}" if isinstance(loss, (int, float)) else "",
                      format_duration(elapsed), format_duration(eta), s.key[:12])
    return table


class LiveView:
    """A rich Live table when stdout is a terminal; otherwise one line per status change."""

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.live_mode = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._seen: dict[str, str] = {}

    def start(self, record: RunRecord) -> None:
        if self.live_mode:
            self._live = Live(stage_table(record), console=self.console, refresh_per_second=4)
            self._live.start()
        else:
            self.update(record)

    def update(self, record: RunRecord) -> None:
        if self._live is not None:
            self._live.update(stage_table(record))
            return
        for s in record.stages.values():
            if self._seen.get(s.name) != s.status:
                self._seen[s.name] = s.status
                if s.status == "pending" and self._seen.get("__started__"):
                    continue
                extra = ""
                if s.status in ("done", "failed") and s.started:
                    extra = f" in {format_duration((s.ended or time.time()) - s.started)}"
                if s.status == "failed":
                    extra += f": {s.error.splitlines()[0] if s.error else ''}"
                print(f"[mmkd] {s.name:<28} {s.status}{extra}", file=sys.stderr, flush=True)
        self._seen["__started__"] = "1"

    def stop(self, record: RunRecord) -> None:
        if self._live is not None:
            self._live.update(stage_table(record))
            self._live.stop()
            self._live = None
        else:
            self.update(record)
