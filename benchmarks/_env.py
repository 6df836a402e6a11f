"""What every results file records about where its numbers came from: the machine, its load,
the library versions and the commit (with a flag for uncommitted changes).

    from benchmarks._env import environment      # or `from _env import environment` in a script
    result["environment"] = environment()

``TreeCPU`` samples the CPU seconds of this process and its descendants (a local Ray
instance's processes) by process name, for the CPU a window of a benchmark cost.

``environment`` is ``orchestrator.provenance.environment`` (evaluate's results.json records it
too): versions from the installed packages' metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from orchestrator.provenance import environment, git_state  # noqa: F401  (the one copy)


class TreeCPU:
    """CPU seconds of this process and all its descendants (the local Ray instance's GCS,
    raylet, dashboard, workers and actors) by process, sampled every 0.25 s, so that the CPU
    a window of time cost each process can be read afterwards; and the whole machine's busy
    CPU seconds from /proc/stat (other people's work included)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.names: dict[int, str] = {}
        self.samples: list[tuple[float, float, dict[int, float]]] = []
        self.stop = threading.Event()
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        procs = [self.me]
        try:
            procs += self.me.children(recursive=True)
        except psutil.Error:
            pass
        cpu = {}
        for p in procs:
            try:
                t = p.cpu_times()
                self.names[p.pid] = _process_name(p)  # a worker renames itself once it starts
            except psutil.Error:
                continue
            cpu[p.pid] = t.user + t.system
        self.samples.append((time.perf_counter(), _machine_busy(), cpu))

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self._sample()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def window(self, t0: float | None = None, t1: float | None = None) -> dict:
        """CPU seconds between the samples nearest to ``t0`` and ``t1`` (default: all), by
        process name, for the whole tree and the machine. A process that starts or ends inside
        the window counts from its first / to its last sample."""
        first = min(self.samples, key=lambda s: abs(s[0] - t0)) if t0 else self.samples[0]
        last = min(self.samples, key=lambda s: abs(s[0] - t1)) if t1 else self.samples[-1]
        inside = [s for s in self.samples if first[0] <= s[0] <= last[0]]
        by_name: Counter = Counter()
        for pid in {pid for s in inside for pid in s[2]}:
            seen = [s[2][pid] for s in inside if pid in s[2]]
            by_name[self.names.get(pid, str(pid))] += seen[-1] - seen[0]
        wall = last[0] - first[0]
        return {"window_s": round(wall, 2),
                "process_tree_cpu_s": round(sum(by_name.values()), 2),
                "machine_busy_cpu_s": round(last[1] - first[1], 2),
                "cpu_s_by_process": {k: round(v, 2) for k, v in by_name.most_common() if v >= 0.01}}


def _process_name(p: Any) -> str:
    """``ray::SplitCoordinator``, ``raylet``, ``gcs_server``, ... (the driver: ``driver``)."""
    import psutil

    if p.pid == os.getpid():
        return "driver"
    try:
        cmd, name = p.cmdline(), p.name()
    except psutil.Error:
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    if name.startswith("ray::"):  # the kernel's 15-character name
        return name
    exe = os.path.basename(cmd[0]) if cmd else p.name()
    if exe.startswith("python") and len(cmd) > 1:
        script = next((a for a in cmd[1:] if a.endswith(".py")), cmd[1])
        return f"python {os.path.basename(script)}"
    return exe


def _machine_busy() -> float:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
