"""Every measured number in README.md and benchmarks/README.md, generated from
benchmarks/results/*.json.

    python benchmarks/report.py            # rewrite the generated blocks in place
    python benchmarks/report.py --check    # exit 1 with a diff if a committed block is stale

A generated block sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` and is
the output of the renderer registered as NAME (``@block("NAME")``); text outside the markers
is left alone. Renderers read results files (``R.load("kd_gain")``) and, for settings a
benchmark ran with (steps, held-out questions), the pipeline YAML it ran.

The renderers live in ``benchmarks/render/``, one module per topic (``base.py``: results files
and number formats; ``readme.py``: the main job's README blocks; ``table.py``: the benchmarks
table; ``training.py``, ``teacher_service.py``, ``families.py``, ``kd_terms.py``,
``kd_step_gpu.py``, ``cross_family.py``); this file is the engine: which block each renderer fills, and the rewrite.

Adding a benchmark to the table in benchmarks/README.md: write ``def row_NAME(r: Results) ->
str`` (the "result" cell) and add one ``Row(...)`` to ``render/table.py``'s ``ROWS``; a new
block is one function and one line in ``BLOCKS`` below.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render.base import ROOT, RESULTS, ReportError, Results, para  # noqa: E402
from render.families import family_kd_step  # noqa: E402
from render.readme import (default_table, kd_ablation_text, kd_gain_text,  # noqa: E402
                           kd_headline, kd_offline_text, main_job, merge_text)
from render.table import benchmarks_table, machine, notes  # noqa: E402
from render.teacher_service import teacher_service, teacher_service_tune  # noqa: E402
from render.training import train_overhead  # noqa: E402
from render.kd_step_gpu import kd_step_gpu_block  # noqa: E402
from render.kd_terms import kd_terms_block  # noqa: E402
from render.cross_family import cross_family_block  # noqa: E402

DOCS = ("README.md", "benchmarks/README.md")
MARKER = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->",
                    re.S)

# block name (``<!-- report:NAME -->``) -> its renderer
BLOCKS: dict[str, Callable[[Results], str]] = {
    "main-job": main_job,
    "kd-headline": kd_headline,
    "kd-gain": kd_gain_text,
    "default-table": default_table,
    "kd-ablation": kd_ablation_text,
    "kd-offline": kd_offline_text,
    "merge": merge_text,
    "machine": machine,
    "teacher-service": teacher_service,
    "teacher-service-tune": teacher_service_tune,
    "benchmarks-table": benchmarks_table,
    "family_kd_step": family_kd_step,
    "notes": notes,
    "train-overhead": train_overhead,
    "kd_step_gpu": kd_step_gpu_block,
    "kd-terms": lambda R: kd_terms_block(R, para),
    "cross-family": cross_family_block,
}


def render(text: str, R: Results, doc: str = "") -> str:
    """``text`` with every generated block replaced by its renderer's output."""
    def replace(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise ReportError(f"{doc}: unknown block <!-- report:{name} -->; known: "
                              f"{', '.join(sorted(BLOCKS))}")
        return f"<!-- report:{name} -->\n{BLOCKS[name](R)}<!-- /report:{name} -->"

    opened = re.findall(r"<!-- report:([\w-]+) -->", text)
    closed = re.findall(r"<!-- /report:([\w-]+) -->", text)
    if sorted(opened) != sorted(closed):
        raise ReportError(f"{doc}: unmatched report markers: opened {opened}, closed {closed}")
    return MARKER.sub(replace, text)


def stale(root: Path = ROOT, results_dir: Path = RESULTS) -> dict[str, str]:
    """``{doc: unified diff}`` of the docs whose generated blocks differ from the results."""
    R = Results(results_dir, root)
    diffs = {}
    for doc in DOCS:
        old = (root / doc).read_text()
        new = render(old, R, doc)
        if new != old:
            diffs[doc] = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                      f"a/{doc}", f"b/{doc}"))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff if a block is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    results = args.results or args.root / "benchmarks" / "results"
    try:
        diffs = stale(args.root, results)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    if args.check:
        if diffs:
            sys.stdout.write("".join(diffs.values()))
            print(f"report: {', '.join(diffs)} differ from benchmarks/results; run "
                  "`python benchmarks/report.py` and commit the result", file=sys.stderr)
            return 1
        return 0
    R = Results(results, args.root)
    for doc in diffs:
        path = args.root / doc
        path.write_text(render(path.read_text(), R, doc))
        print(f"rewrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
