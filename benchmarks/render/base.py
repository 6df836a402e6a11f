"""What every renderer shares: the results files (``Results``), the error a missing one
raises, and the number formats of the READMEs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable



ROOT = Path(__file__).resolve().parents[2]


RESULTS = ROOT / "benchmarks" / "results"


class Results:
    """Results files (``benchmarks/results/NAME.json``) and pipeline files, read once."""

    def __init__(self, results_dir: Path = RESULTS, root: Path = ROOT) -> None:
        self.dir, self.root, self._cache = Path(results_dir), Path(root), {}

    def load(self, name: str) -> dict:
        if name not in self._cache:
            path = self.dir / f"{name}.json"
            if not path.exists():
                raise ReportError(f"{path} is missing: run benchmarks/{name}.py to produce it")
            self._cache[name] = json.loads(path.read_text())
        return self._cache[name]

    def pipeline(self, path: str) -> dict:
        import yaml

        if path not in self._cache:
            self._cache[path] = yaml.safe_load((self.root / path).read_text())
        return self._cache[path]


class ReportError(Exception):
    pass


def dated(R: "Results", name: str) -> str:
    """A sentence for a results file that records no commit: its numbers come from an older
    version of the code and pipelines (rerun its script to refresh them)."""
    d = R.load(name)
    if ((d.get("environment") or {}).get("git") or {}).get("commit"):
        return ""
    return (f" (`results/{name}.json` predates commit records: measured with an earlier version "
            f"of the code and pipeline files; `benchmarks/{name}.py` refreshes it)")


def para(text: str) -> str:
    """A prose paragraph, wrapped like the hand-written ones (100 columns)."""
    import textwrap

    for width in range(100, 80, -1):  # a line must not start like a list item ("2. ", "+ ")
        out = textwrap.fill(" ".join(text.split()), width=width, break_long_words=False,
                            break_on_hyphens=False)
        if not re.search(r"^(\d+[.)]|[-+*>#|]) ", out, re.M):
            break
    return out + "\n"


def f3(x: float) -> str:
    return f"{x:.3f}"


def signed(x: float, digits: int = 1) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def pts(x: float) -> str:
    """An accuracy difference in points: ``+7.2``."""
    return signed(100 * x)


def pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def pts_pm(s: dict) -> str:
    return f"{pts(s['mean'])} ± {100 * s['std']:.1f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def pct_n(x: float) -> str:
    return f"{100 * x:.0f}"


def span(values: list[float], fmt: Callable[[float], str], unit: str = "") -> str:
    """``lo-hi`` (or one value when they print the same), ``unit`` once at the end."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return (lo if lo == hi else f"{lo}-{hi}") + unit


def minutes(s: float) -> str:
    return f"{int(s // 60)} min {round(s % 60):d} s"


def std_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def held_out(R: Results, pipeline: str, result: str | None = None) -> int:
    """Held-out questions behind a results file: its own ``questions`` when it records them,
    else what the pipeline's evaluate stage scores now."""
    if result is not None and "questions" in R.load(result):
        return int(R.load(result)["questions"])
    stages = R.pipeline(pipeline)["stages"]
    return int(stages["evaluate"]["params"].get("max_samples")
               or stages["shapes"]["params"]["num_eval"])


def seeds_positive(contrast: dict, seeds: int) -> str:
    n = contrast["positive_seeds"]
    return "on every seed" if n == seeds else f"on {n} of {seeds} seeds"


def within_noise(diff: dict) -> bool:
    return abs(diff["mean"]) <= diff["std"]


MODEL_NAMES = {"teacher": "teacher", "baseline_pt_sft": "baseline student (PT-SFT)",
               "kd_dpt_sft": "LLaVA-KD student (DPT-SFT)",
               "kd_dpt_sft_dft": "LLaVA-KD student (DPT-SFT-DFT)"}


TYPES = ("color", "count", "exists", "relation", "shape", "size")


def mm_range(x: dict) -> str:
    return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"


def load_range(d: dict) -> str:
    return f"{d['loadavg']['start'][0]:.1f}-{d['loadavg']['end'][0]:.1f}"
