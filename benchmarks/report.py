"""Every measured number in README.md and benchmarks/README.md, generated from
benchmarks/results/*.json.

    python benchmarks/report.py            # rewrite the generated blocks in place
    python benchmarks/report.py --check    # exit 1 with a diff if a committed block is stale

A generated block sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` and is
the output of the renderer registered as NAME (``@block("NAME")``); text outside the markers
is left alone. Renderers read results files (``R.load("kd_gain")``) and, for settings a
benchmark ran with (steps, held-out questions), the pipeline YAML it ran.

Adding a benchmark to the table in benchmarks/README.md: write ``def row_NAME(r: Results) ->
str`` (the "result" cell) and add one ``Row(...)`` to ``ROWS``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ("README.md", "benchmarks/README.md")
MARKER = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->",
                    re.S)


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


BLOCKS: dict[str, Callable[[Results], str]] = {}


def block(name: str):
    def register(fn: Callable[[Results], str]) -> Callable[[Results], str]:
        BLOCKS[name] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- formatting


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


# ----------------------------------------------------------------------------- README.md

MODEL_NAMES = {"teacher": "teacher", "baseline_pt_sft": "baseline student (PT-SFT)",
               "kd_dpt_sft": "LLaVA-KD student (DPT-SFT)",
               "kd_dpt_sft_dft": "LLaVA-KD student (DPT-SFT-DFT)"}
TYPES = ("color", "count", "exists", "relation", "shape", "size")


@block("main-job")
def main_job(R: Results) -> str:
    d, orch = R.load("default_pipeline"), R.load("orchestration")
    res = d["results"]
    cached = orch["default_pipeline_cached_rerun_cli_seconds"]
    return para(
        "`mmkd run pipelines/llava_kd.yaml` generates the shapes VQA data set (1–4 coloured shapes "
        "per 32×32 image; questions about colour, shape, size, count, existence and relative "
        f"position), trains a BPE tokenizer ({d['tokenizer_vocab_size']} tokens), a teacher "
        f"(`tiny-teacher`, {res['teacher']['params'] / 1e6:.2f}M parameters) and two students "
        f"(`tiny-student`, {res['baseline_pt_sft']['params'] / 1e6:.2f}M): a baseline (PT → SFT) "
        "and a LLaVA-KD student (DPT → SFT → DFT, with the frozen teacher in the loop), evaluates "
        f"all of them on {res['teacher']['n']} held-out questions, and prints a table (also "
        "`results.md/csv/png` in the evaluate stage's output and in MLflow). On the "
        f"{d['environment']['machine']['cpu_count']}-core CPU machine it took "
        f"{minutes(d['run_wall_s'])} (`benchmarks/default_pipeline.py`); a second run is fully "
        f"cached and takes {cached['median']:.1f} s (median of {len(cached['runs'])}, "
        "`benchmarks/orchestration.py`).")


def _pooled_p(x: float | None) -> str:
    return "n/a" if x is None else ("< 0.001" if x < 0.001 else f"{x:.2g}")


@block("kd-headline")
def kd_headline(R: Results) -> str:
    """The section's first sentence: does KD beat the baseline, over seeds, pooled."""
    g = R.load("kd_gain")
    pooled = (g.get("pooled_over_seeds") or {}).get("kd_dpt_sft_dft")
    s, seeds = g["summary"], len(g["seeds"])
    gain = g["gain_dpt_sft_dft_over_pt_sft"]
    if pooled is None:
        return para(f"Over {seeds} student seeds (`results/kd_gain.json`) the LLaVA-KD student "
                    f"scores {pm(s['kd_dpt_sft_dft'])} against the baseline's "
                    f"{pm(s['baseline_pt_sft'])} ({pts_pm(gain)} points).")
    t_p = pooled["p_ttest_over_seeds"]
    significant = pooled["p_mcnemar"] < 0.05 and t_p is not None and t_p < 0.05
    verdict = "a significant gain" if significant and gain["mean"] > 0 else (
        "a significant loss" if significant else "not a significant difference across seeds")
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    return para(
        f"**The result:** over {seeds} student seeds the LLaVA-KD student (DPT → SFT → DFT, "
        f"L_res + L_rel) scores {pm(s['kd_dpt_sft_dft'])} on the held-out questions against the "
        f"baseline's {pm(s['baseline_pt_sft'])}, {pts_pm(gain)} points, ahead on {wins} of "
        f"{seeds} seeds: {verdict} (t-test of the {seeds} per-seed differences: "
        f"p = {_pooled_p(t_p)}; McNemar on the {pooled['n']:,} answers of all seeds pooled: "
        f"p = {_pooled_p(pooled['p_mcnemar'])}, which counts the same questions at every seed as "
        f"new ones; `benchmarks/kd_gain.py`, `results/kd_gain.json`).")


@block("kd-gain")
def kd_gain_text(R: Results) -> str:
    g = R.load("kd_gain")
    s, seeds = g["summary"], len(g["seeds"])
    gain, dpt = g["gain_dpt_sft_dft_over_pt_sft"], g["gain_dpt_sft_over_pt_sft"]
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    per_seed = []
    for r in g["runs"]:
        c = next((c for c in r.get("comparisons", [])
                  if (c["a"], c["b"]) == ("baseline_pt_sft", "kd_dpt_sft_dft")), None)
        if c is not None:
            per_seed.append(f"seed {r['seed']}: {signed(100 * c['diff'])} pts "
                            f"[{signed(100 * c['low'])}, {signed(100 * c['high'])}], "
                            f"p = {c['p']:.2g}")
    tests = (" Per seed, DPT-SFT-DFT − PT-SFT on the same questions (McNemar): "
             + "; ".join(per_seed) + ".") if per_seed else ""
    return para(
        f"Over {seeds} student seeds (`benchmarks/kd_gain.py`): PT-SFT {pm(s['baseline_pt_sft'])}, "
        f"DPT-SFT {pm(s['kd_dpt_sft'])}, DPT-SFT-DFT {pm(s['kd_dpt_sft_dft'])} — DPT-SFT-DFT beats "
        f"the baseline on {wins} of {seeds} seeds ({pts_pm(gain)} points), DPT alone "
        f"{pts_pm(dpt)} ({'within noise' if within_noise(dpt) else 'beyond its spread'})." + tests)


@block("default-table")
def default_table(R: Results) -> str:
    d = R.load("default_pipeline")
    res, prior = d["results"], d["answer_prior"]
    ci = all("accuracy_low" in r for r in res.values())
    n = int(next(iter(res.values()))["n"])
    lines = [f"One run (seed 0, {d['run_id']}, {n} held-out questions, "
             "`benchmarks/results/default_pipeline.json`):", "",
             "| model | accuracy |" + (" 95% interval |" if ci else "")
             + " colour | count | exists | relation | shape | size | caption ppl |",
             "|---|---|" + ("---|" if ci else "") + "---|---|---|---|---|---|---|"]
    for name, r in res.items():
        cells = [f3(r["accuracy"])] + (
            [f"{f3(r['accuracy_low'])}–{f3(r['accuracy_high'])}"] if ci else []) + [
            f3(r[f"accuracy/{t}"]) for t in TYPES]
        lines.append(f"| {MODEL_NAMES.get(name, name)} | {' | '.join(cells)} | "
                     f"{r['caption_ppl']:.2f} |")
    cells = [f3(prior["accuracy"])] + ([""] if ci else []) + [
        f3(prior["per_type"][t]) for t in TYPES]
    lines.append(f"| most frequent answer per type | {' | '.join(cells)} | |")
    pairs = [c for c in d.get("comparisons", []) if c["a"] != "teacher" and c["b"] != "teacher"]
    if pairs:
        lines += ["", "Paired comparisons of the students on the same questions (`evaluate` "
                      "prints them for every pair; McNemar p-values):", ""]
        lines += [f"- {c['text']}" for c in pairs]
    students = [r["accuracy"] for n, r in res.items() if n != "teacher"]
    above = [a - prior["accuracy"] for a in students]
    teacher = 100 * (res["teacher"]["accuracy"] - prior["accuracy"])
    if min(above) >= 0.05:
        verdict = (f"the students, at {span(students, f3)}, are {100 * min(above):.1f}-"
                   f"{100 * max(above):.1f} points above it, so they use the image; the teacher "
                   f"is {teacher:.1f} points above it.")
    else:
        verdict = (f"the students, at {span(students, f3)}, are within "
                   f"{100 * max(abs(a) for a in above):.1f} points of it and use the image only a "
                   f"little; the teacher, {teacher:.1f} points above it, clearly does.")
    return "\n".join(lines) + "\n\n" + para(
        "The last row answers each question type's most frequent answer (chosen on these same "
        f"questions, so a slightly optimistic floor): {verdict}")


@block("kd-ablation")
def kd_ablation_text(R: Results) -> str:
    a = R.load("kd_ablation")
    s, c, seeds = a["summary"], a["contrasts"], len(a["seeds"])
    dpt = c["DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)"]
    pt = c["PT-SFT-DFT vs PT-SFT-FT (KD terms at equal compute)"]
    vis, rel = c["+visual vs response-only (DFT)"], c["+relation vs +visual (DFT)"]
    order = ["pt_sft", "dpt_sft", "pt_sft_dft", "dpt_sft_dft"]  # the paper's, worst to best
    label = {"pt_sft": "PT-SFT", "dpt_sft": "DPT-SFT", "pt_sft_dft": "PT-SFT-DFT",
             "dpt_sft_dft": "DPT-SFT-DFT"}
    ours = sorted(order, key=lambda k: s[k]["mean"])
    chain = " < ".join(f"{label[k]} {f3(s[k]['mean'])}" for k in ours)
    return para(
        f"Is it the KD or the extra steps? `pipelines/kd_stage_ablation.yaml` ({seeds} seeds, "
        f"`benchmarks/kd_ablation.py`{dated(R, 'kd_ablation')}) adds a control that runs DFT's exact schedule with "
        f"cross-entropy only: after DPT-SFT, DFT beats that control by {pts_pm(dpt)} points "
        f"{seeds_positive(dpt, seeds)}"
        f"{', so the gain is not just compute' if not within_noise(dpt) else ''}; after plain "
        f"PT-SFT the same DFT {'does not' if within_noise(pt) else 'does'} ({pts_pm(pt)}). The "
        f"stage ordering {'matches' if ours == order else 'differs from'} the paper's ({chain}); "
        f"the DFT loss terms, after DPT-SFT: response only {f3(s['dpt_sft_dft_res']['mean'])}, "
        f"+visual {f3(s['dpt_sft_dft_res_vis']['mean'])} ({pts_pm(vis)} points), +relation "
        f"{f3(s['dpt_sft_dft']['mean'])} ({pts_pm(rel)}).")


def offline_rows(R: Results) -> tuple[dict, dict[int, dict], int]:
    """The online row, the offline rows by k, and how many samples the logits were stored for."""
    rows = R.load("kd_offline")["runs"][0]["rows"]
    ks = {int(k.removeprefix("dft_offline_top")): v for k, v in rows.items()
          if k.startswith("dft_offline_top")}
    shapes = R.pipeline("pipelines/kd_offline_teacher.yaml")["stages"]["shapes"]["params"]
    return rows["dft_online"], dict(sorted(ks.items())), int(shapes["num_instruct"])


@block("kd-offline")
def kd_offline_text(R: Results) -> str:
    online, ks, samples = offline_rows(R)
    n = held_out(R, "pipelines/kd_offline_teacher.yaml", "kd_offline")
    faster = [1 - r["dft_wall_s"] / online["dft_wall_s"] for r in ks.values()]
    accs = ", ".join(f"k={k} {f3(r['accuracy'])}" for k, r in ks.items())
    per_sample = ", ".join(f"{r['logits_bytes'] / samples / 1e3:.1f} KB at k={k}"
                           for k, r in ks.items())
    return para(
        "Offline teacher (`pipelines/kd_offline_teacher.yaml`, `benchmarks/kd_offline.py`"
        f"{dated(R, 'kd_offline')}): a "
        "`teacher_logits` stage runs the teacher once and stores its top-k logits; DFT then reads "
        f"them instead of running the teacher. Student accuracy: online {f3(online['accuracy'])}, "
        f"offline {accs} (one seed, ±{100 * std_error(online['accuracy'], n):.1f} points "
        f"standard error). The stored logits cost {per_sample} per sample, and the DFT stage ran "
        f"{span(faster, pct_n, '%')} faster — worth it when the teacher is large or the same "
        "logits serve several runs (a tune, seeds), not for one run of a tiny teacher.")


@block("merge")
def merge_text(R: Results) -> str:
    m = R.load("merge_ablation")["rows"]
    n = held_out(R, "pipelines/merge_ablation.yaml")
    c = m["centralized"]["accuracy"]
    soft, uft = m["ensemble_soft"], m["uniform_ft"]
    broken = ", ".join(f3(m[k]["accuracy"]) for k in ("uniform", "task_arithmetic", "ties"))
    return para(
        f"On the tiny setting (`benchmarks/merge_ablation.py`{dated(R, 'merge_ablation')}, one seed, "
        f"±{100 * std_error(c, n):.1f} points standard error) the soft-routed ensemble of two "
        f"cluster experts comes within {100 * (c - soft['accuracy']):.1f} points of the "
        f"centralized model ({f3(soft['accuracy'])} vs {f3(c)}) at "
        f"{soft['params_over_centralized']:.1f}x the parameters, and averaging followed by a "
        f"short fine-tune within {100 * (c - uft['accuracy']):.1f} ({f3(uft['accuracy'])}); plain "
        f"averaging, task arithmetic and TIES fall apart ({broken}): the experts were trained "
        "with their vision towers from a caption-only base and drifted too far apart.")


# ----------------------------------------------------------------------------- benchmarks/README.md


@block("machine")
def machine(R: Results) -> str:
    """What the results files say about where they ran (older files record less)."""
    seen: dict[str, dict[str, set]] = {k: {} for k in ("cpus", "torch", "ray", "deepspeed",
                                                       "python", "commit")}
    for path in sorted(R.dir.glob("*.json")):
        d, name = json.loads(path.read_text()), path.stem
        for run in d.get("runs", {}).values() if isinstance(d.get("runs"), dict) else [d]:
            env = run.get("environment") or {}
            mach = {**(run.get("machine") or {}), **(run.get("versions") or {})}
            values = {"cpus": env.get("machine", {}).get("cpu_count") or mach.get("cpu_count")
                      or mach.get("cpus"),
                      "python": env.get("python") or mach.get("python"),
                      "commit": (env.get("git") or {}).get("commit") or mach.get("git_commit")}
            for lib in ("torch", "ray", "deepspeed"):
                values[lib] = (env.get("libraries") or {}).get(lib) or mach.get(lib)
            for key, value in values.items():
                if value is not None:
                    seen[key].setdefault(str(value)[:7] if key == "commit" else str(value),
                                         set()).add(name)
    total = len(list(R.dir.glob("*.json")))
    parts = []
    for key, values in seen.items():
        files = set().union(*values.values()) if values else set()
        shown = ", ".join(sorted(values)) or "—"
        parts.append(f"{key} {shown} ({len(files)} of {total} files)")
    return para("Where the results ran, as recorded in `results/*.json` (files written before "
                "`_env.py` record less): " + "; ".join(parts) + ". The machine is shared with "
                "other sessions, so wall times are noisy; scripts that can also record CPU time "
                "do.")


@dataclass
class Row:
    script: str
    measured: str
    result: Callable[[Results], str]
    aim: str = "—"


def row_orchestration(R: Results) -> str:
    o = R.load("orchestration")
    cli, dflt = o["cached_rerun_cli_seconds"], o["default_pipeline_cached_rerun_cli_seconds"]
    return (f"{o['chain']['overhead_per_stage_seconds']:.3f} s per stage; fan-out "
            f"{o['fan']['wall_seconds']:.2f} s vs {o['fan']['ideal_seconds']:.0f} s ideal; cached "
            f"{o['chain']['stages']}-stage rerun {o['cached_rerun_in_process_seconds']:.3f} s in "
            f"process / median {cli['median']:.3f} s (min {cli['min']}, max {cli['max']}) as a "
            f"fresh `mmkd run`; **cached rerun of the default pipeline: median "
            f"{dflt['median']:.3f} s (min {dflt['min']}, max {dflt['max']})**"
            f"{', Ray not started' if not o['cached_rerun_started_ray'] else ''} (ray.init alone: "
            f"{o['ray_init_seconds']:.3f} s)")


def row_train_stage_overhead(R: Results) -> str:
    o = R.load("train_stage_overhead")
    (base, b), (ours, m) = o["stage_seconds"].items()
    return (f"stage wall: {_mm(m)} s at mmkd's {ours.split('_')[-1]} s poll vs {_mm(b)} s at "
            f"Ray's default {base.split('_')[-1]} s, **×{o['stage_ratio_of_medians']:.2f}** "
            f"({o['stage_saving_seconds']:.1f} s less per stage; {o['reps']} runs each, "
            f"alternating)")


def row_data_throughput(R: Results) -> str:
    d = R.load("data_throughput")
    r, c, ratio = d["results"], d["training_consumption_samples_per_s"], \
        d["data_over_consumption_ratio"]
    k = lambda x: f"{x / 1e3:.2f}k/s"  # noqa: E731
    return (f"steady state: plain loop {k(r['plain_python_1cpu']['steady_samples_per_s'])}, Ray "
            f"Data 1 CPU {k(r['ray_data_1cpu']['steady_samples_per_s'])}, 2 CPUs "
            f"{k(r['ray_data_2cpu']['steady_samples_per_s'])} (the second core also runs the "
            f"driver); a training step consumes {k(c['tiny-student'])} (tiny-student) and "
            f"{k(c['tiny-teacher'])} (tiny-teacher): **data/consumption "
            f"{ratio['tiny-student']:.1f}x** (student), {ratio['tiny-teacher']:.0f}x (teacher). "
            f"Totals for {d['samples']} samples: {r['ray_data_1cpu']['total_s']:.1f} s with Ray "
            f"Data vs {r['plain_python_1cpu']['total_s']:.1f} s plain (Ray's start-up)")


def row_data_memory(R: Results) -> str:
    d = R.load("data_memory")
    r = d["results"]
    mem = lambda v: f"{v['peak_extra_mib']:.1f} MiB ({v['seconds']:.1f} s)"  # noqa: E731
    return (f"{d['file']['bytes'] / 1e6:.0f} MB, {d['file']['records']} records. Streaming, "
            f"whole file: **{mem(r['stream_whole_file'])}**; one of "
            f"{r['stream_one_range']['ranges']} ranges: {mem(r['stream_one_range'])}; planning "
            f"the ranges: {mem(r['plan_ranges'])}; validate's sample: "
            f"{r['validate_sample']['peak_extra_mib']:.1f} MiB "
            f"({r['validate_sample']['seconds']:.2f} s); `json.loads` whole: "
            f"**{r['json_load_whole']['peak_extra_mib']:.0f} MiB** "
            f"({r['json_load_whole']['seconds']:.1f} s)")


TRAIN_BASE = "omp=PASSIVE"  # the configuration the overhead analysis starts from
DEFAULT_SETTING = "omp=default,zero=2,threads=1"  # pipelines/llava_kd.yaml's training stages


ONE_WORKER_ZERO0 = "b8f4eb5"  # from this commit one worker runs ZeRO-1/2 as ZeRO-0, no all-reduce


def _descends(commit: str | None, ancestor: str) -> bool:
    import subprocess

    if not commit:
        return False
    out = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return out.returncode == 0


def train_label(key: str, run: dict | None = None) -> str:
    """``omp=PASSIVE,allreduce=off`` -> ``OMP_WAIT_POLICY=PASSIVE, DeepSpeed all-reduce off``;
    a ZeRO-1/2 entry measured after ``ONE_WORKER_ZERO0`` says it ran as ZeRO-0."""
    words = {"omp=default": "OMP_WAIT_POLICY unset", "allreduce=off": "DeepSpeed all-reduce off"}
    out = []
    for part in key.split(","):
        k, _, v = part.partition("=")
        out.append(words.get(part) or {"omp": f"OMP_WAIT_POLICY={v}", "zero": f"ZeRO-{v}",
                                       "rows": f"{v} rows",
                                       "threads": f"{v} thread{'s' if v != '1' else ''}"
                                       }.get(k, part))
        if k == "zero" and v in ("1", "2") and run is not None and _descends(
                ((run.get("environment") or {}).get("git") or {}).get("commit"), ONE_WORKER_ZERO0):
            out[-1] += f" requested (one worker: runs as ZeRO-0, no all-reduce, since {ONE_WORKER_ZERO0})"
    return ", ".join(out)


def train_run_summary(run: dict) -> dict:
    reps = run["repetitions"]
    loads = [r[w]["load_1m_before"] for r in reps for w in ("plain", "mmkd")]
    return {"n": len(reps), "load": span(loads, lambda x: f"{x:.1f}"),
            "plain": span(run["plain_tokens_per_s"]["values"], lambda x: f"{x:.0f}"),
            "mmkd": span(run["mmkd_tokens_per_s"]["values"], lambda x: f"{x:.0f}"),
            "overhead": f"{signed(100 * run['overhead']['median'])}% "
                        f"({signed(100 * run['overhead']['min'])} to "
                        f"{signed(100 * run['overhead']['max'])})",
            "cpu": f"{signed(100 * run['cpu_overhead']['median'])}% "
                   f"({signed(100 * run['cpu_overhead']['min'])} to "
                   f"{signed(100 * run['cpu_overhead']['max'])})"}


def row_train_throughput(R: Results) -> str:
    runs = R.load("train_throughput")["runs"]
    out = []
    for key in (k for k in (DEFAULT_SETTING, "omp=default", TRAIN_BASE, f"{TRAIN_BASE},threads=1")
                if k in runs):
        s = train_run_summary(runs[key])
        out.append(f"{'the default pipeline setting: ' if key == DEFAULT_SETTING else ''}"
                   f"{train_label(key, runs[key])}, {s['n']} interleaved repetitions, load {s['load']}: "
                   f"plain {s['plain']} tok/s, mmkd {s['mmkd']} tok/s, **overhead "
                   f"{s['overhead']}**, CPU seconds per step {s['cpu']}")
    return ("<br>".join(out) + "; other configurations and where the time goes: "
            "[below](#the-training-loops-overhead)")


def row_eval_generation(R: Results) -> str:
    d = R.load("eval_generation")
    parts = []
    for name, m in d["models"].items():
        q, sp = m["questions_per_s"], m["speedup_vs_one_by_one"]["batched_16"]["per_repeat"]
        parts.append(f"{name}: one by one {q['one_by_one']['median']:.0f}/s, batch 16 "
                     f"{q['batched_16']['median']:.0f}/s, **{sp['median']:.1f}x** "
                     f"({sp['min']:.1f}-{sp['max']:.1f}x over {d['repeats']} repeats)")
    same = all(m["identical_answers"] for m in d["models"].values())
    return "; ".join(parts) + ("; answers identical" if same else "; ANSWERS DIFFER")


def row_kd_step(R: Results) -> str:
    r = R.load("kd_step")["ratios"]
    return (f"online {r['dft_online_over_floor_wall']:.2f} (wall) / "
            f"{r['dft_online_over_floor_cpu']:.2f} (CPU time); offline "
            f"{r['dft_offline_over_sft_wall']:.2f} / {r['dft_offline_over_sft_cpu']:.2f}")


def row_kd_loss_memory(R: Results) -> str:
    v = R.load("kd_loss_memory")["variants"]
    fused, naive = v["div_chunked_fused"], v["div_naive_kldiv"]
    rel, rel_naive = v["rel_chunked"], v["rel_naive"]
    return (f"chunked divergence: {fused['peak_extra_mb']:.1f} MB vs {naive['peak_extra_mb']:.1f}"
            f" MB naive (**{fused['peak_extra_mb'] / naive['peak_extra_mb']:.2f}**), "
            f"{fused['time_s'] / naive['time_s']:.1f}x the naive time; relation loss "
            f"{rel['peak_extra_mb']:.1f} vs {rel_naive['peak_extra_mb']:.1f} MB "
            f"({rel['peak_extra_mb'] / rel_naive['peak_extra_mb']:.2f})")


def kd_loss_setup(R: Results) -> str:
    s = R.load("kd_loss_memory")["setup"]
    return f"V={s['V'] / 1e3:.0f}k, T={s['T']}, B={s['B']}, {s['dtype'].replace('float', 'fp')}"


def row_kd_gain(R: Results) -> str:
    g = R.load("kd_gain")
    s, gain, dpt = g["summary"], g["gain_dpt_sft_dft_over_pt_sft"], g["gain_dpt_sft_over_pt_sft"]
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    return (f"teacher {f3(s['teacher']['mean'])}; PT-SFT {pm(s['baseline_pt_sft'])}; DPT-SFT "
            f"{pm(s['kd_dpt_sft'])}; DPT-SFT-DFT {pm(s['kd_dpt_sft_dft'])}. Gain of DPT-SFT-DFT "
            f"over PT-SFT **{pts_pm(gain)} points** (min {pts(gain['min'])}, {wins} of "
            f"{len(g['runs'])} seeds positive); DPT-SFT alone {pts_pm(dpt)}"
            f"{' (within noise)' if within_noise(dpt) else ''}. DFT adds steps the baseline does "
            "not get: see `kd_ablation.py` for the equal-compute control")


def row_kd_ablation(R: Results) -> str:
    a = R.load("kd_ablation")
    s, c, n = a["summary"], a["contrasts"], len(a["seeds"])
    con = lambda k: f"{pts_pm(c[k])} ({c[k]['positive_seeds']}/{n})"  # noqa: E731
    return (f"PT-SFT {pm(s['pt_sft'])}, DPT-SFT {pm(s['dpt_sft'])}, PT-SFT-DFT "
            f"{pm(s['pt_sft_dft'])}, DPT-SFT-DFT **{pm(s['dpt_sft_dft'])}**. Equal compute: "
            f"DPT-SFT-DFT vs DPT-SFT-FT **"
            f"{con('DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)')}**; PT-SFT-DFT vs "
            f"PT-SFT-FT {con('PT-SFT-DFT vs PT-SFT-FT (KD terms at equal compute)')}; whole "
            f"recipe vs PT-SFT-FT {con('DPT-SFT-DFT vs PT-SFT-FT (whole recipe at equal compute)')}"
            f". Loss terms (after DPT-SFT): response-only {f3(s['dpt_sft_dft_res']['mean'])}, "
            f"+visual {f3(s['dpt_sft_dft_res_vis']['mean'])}, +relation "
            f"{f3(s['dpt_sft_dft']['mean'])}")


def row_kd_offline(R: Results) -> str:
    online, ks, samples = offline_rows(R)
    secs = lambda key: span([r[key] for r in ks.values()], lambda x: f"{x:.0f}")  # noqa: E731
    return (f"accuracy: online {f3(online['accuracy'])}; "
            + ", ".join(f"offline k={k} {f3(r['accuracy'])}" for k, r in ks.items())
            + f" (one seed). Cost: the teacher pass over the {samples} DFT samples "
            f"{secs('teacher_pass_wall_s')} s once; offline DFT {secs('dft_wall_s')} s vs online "
            f"{online['dft_wall_s']:.0f} s (wall, shared machine); stored logits "
            + ", ".join(f"{r['logits_bytes'] / 1e6:.1f} MB (k={k}, "
                        f"{r['logits_bytes'] / samples / 1e3:.1f} KB per sample)"
                        for k, r in ks.items()))


def row_merge_ablation(R: Results) -> str:
    d = R.load("merge_ablation")
    m = d["rows"]
    a = lambda k: f3(m[k]["accuracy"])  # noqa: E731
    d_pts = lambda k: pts(m[k]["accuracy_minus_centralized"])  # noqa: E731
    x = lambda k: f"{m[k]['params_over_centralized']:.1f}x"  # noqa: E731
    return (f"centralized {a('centralized')}; experts {a('expert_0')} / {a('expert_1')}; "
            f"**soft-routed ensemble {a('ensemble_soft')} ({d_pts('ensemble_soft')} pts, "
            f"{x('ensemble_soft')} the parameters)**, top-1 ensemble {a('ensemble_top1')} "
            f"({d_pts('ensemble_top1')}), random-partition top-1 ensemble "
            f"{a('random_partition_ensemble')}; JAM-Width {a('jam_width')} → "
            f"{a('jam_width_ft')} after its fine-tune ({x('jam_width')} params); JAM-Cross "
            f"{a('jam_cross_untrained')} untrained → {a('jam_cross_ft')} after training only its "
            f"new layers; uniform average {a('uniform')} → {a('uniform_ft')} after the same "
            f"fine-tune; task arithmetic {a('task_arithmetic')}; TIES {a('ties')}. Whole "
            f"pipeline: {len(d['stage_status'])} stages, "
            f"{sum(d['stage_wall_s'].values()) / 60:.1f} min of stage wall time")


def row_tune_kd(R: Results) -> str:
    t = R.load("tune_kd")
    stops = sorted(tr["steps"] for tr in t["trials"] if not tr["completed"])
    full = max(tr["steps"] for tr in t["trials"])
    best, p = t["best"], t["best"]["params"]
    metric = "kd_dpt_sft_dft/accuracy"
    return (f"{len(t['trials'])} trials ({t['tune_wall_s'] / 60:.1f} min): {t['stopped_early']} "
            f"stopped early by ASHA (at {', '.join(map(str, stops))} of {full} steps), "
            f"**{t['trial_steps_run']} of {t['trial_steps_budget']} trial-steps "
            f"({pct(t['compute_fraction'])})**; mmkd freed the placement groups of "
            f"{t['placement_groups_freed']} of the {t['stopped_early']} stopped trials' Ray Train "
            f"runs. Best accuracy {f3(best[metric])} (α {p['alpha']:.2f}, β {p['beta']:.2f}, "
            f"γ {p['gamma']:.2f}, τ {p['temperature']:g}) vs the paper defaults' "
            f"{f3(t['paper_defaults'][metric])} (seed 0)")


def row_merge_methods(R: Results) -> str:
    res = R.load("merge_methods")["results"]
    merge = [s for p in res.values() for s in p["merge_s"].values()]
    rel = lambda k: span([p["forward_relative_to_single"][k] for p in res.values()],  # noqa: E731
                         lambda x: f"{x:.1f}")
    return (f"merges {span(merge, lambda s: f'{1e3 * s:.0f}')} ms; ensemble forward "
            f"{rel('ensemble_soft')}x one expert (soft, K=2), top-1 {rel('ensemble_top1')}x, "
            f"width {rel('width')}x, cross {rel('cross')}x")


def _fkd(R: Results) -> tuple[dict, dict]:
    d = R.load("family_kd_step")
    return d, d["families"]


def row_family_kd_step(R: Results) -> str:
    d, fams = _fkd(R)
    cpu = {n: f["kd_over_floor_cpu"]["per_repeat"]["median"] for n, f in fams.items()}
    wall = [f["kd_over_floor"]["per_repeat"]["median"] for f in fams.values()]
    pre = [f["preprocess_samples_per_cpu_s"]["median"] for f in fams.values()]
    hi, lo = max(cpu, key=cpu.get), min(cpu, key=cpu.get)
    return (f"{len(fams)} families, {d['args']['repeats']} interleaved repetitions of "
            f"{d['args']['steps']} steps, 1 thread: **KD / floor {cpu[lo]:.2f} ({lo}) to "
            f"{cpu[hi]:.2f} ({hi})** in CPU time (median over families "
            f"{statistics.median(cpu.values()):.2f}), {span(wall, lambda x: f'{x:.2f}')} in wall "
            f"time (load {_fkd_load(d)}); preprocessing {span(pre, lambda x: f'{x:.0f}')} "
            "samples per CPU second; per family: [below](#the-kd-step-per-family)")


def _fkd_load(d: dict) -> str:
    loads = [x for f in d["families"].values() for x in f["load_1m_per_repeat"]]
    return span(loads, lambda x: f"{x:.1f}")


def row_teacher_service(R: Results) -> str:
    d = R.load("teacher_service")
    parts = []
    for name, pair in d["pairs"].items():
        r = pair["summary"]["ratios"]
        parts.append(f"{name} ({pair['summary']['teacher_params'] / 1e6:.1f}M-parameter teacher): "
                     f"service {_mm(r['service_over_floor'])}, online on 2 threads "
                     f"{_mm(r['online_2threads_over_floor'])}")
    reps = next(iter(d["pairs"].values()))["summary"]["repeats"]
    return (f"DFT step / (student step + teacher forward), median (min-max) of {reps} "
            f"repetitions: " + "; ".join(parts) + f" (load {_load(d)}); "
            "[details](../README.md#where-the-teacher-runs)")


def _mm(x: dict) -> str:
    return f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"


def _load(d: dict) -> str:
    return f"{d['loadavg']['start'][0]:.1f}-{d['loadavg']['end'][0]:.1f}"


@block("teacher-service")
def teacher_service(R: Results) -> str:
    """The teacher modes side by side (teacher_service.json)."""
    d = R.load("teacher_service")
    lines = ["| pair | teacher parameters | student step | teacher forward | online KD step "
             "(2 threads) | service KD step (1 + 1 CPU) | service / floor | online / floor | "
             "student peak RSS, service / online |", "|---|---|---|---|---|---|---|---|---|"]
    for name, pair in d["pairs"].items():
        s = pair["summary"]
        sec = {k: f"{1e3 * v['median']:.0f} ms" for k, v in s["seconds"].items()}
        rss = s["peak_rss_mb"]
        lines.append(f"| {name} | {s['teacher_params'] / 1e6:.1f}M | {sec['student_step']} | "
                     f"{sec['teacher_forward']} | {sec['online_kd_step']} | "
                     f"{sec['service_kd_step']} | {_mm(s['ratios']['service_over_floor'])} | "
                     f"{_mm(s['ratios']['online_2threads_over_floor'])} | "
                     f"{rss['service']['median']:.0f} / {rss['online']['median']:.0f} MB |")
    s = next(iter(d["pairs"].values()))["summary"]
    a = d["args"]
    best = {n: p["summary"]["ratios"]["teacher_forward_share_of_floor"]["median"]
            for n, p in d["pairs"].items()}
    bound = ", ".join(f"{n} {max(v, 1 - v):.2f}" for n, v in best.items())
    return ("\n".join(lines) + "\n\n"
            f"`benchmarks/teacher_service.py`: median seconds per DFT step over {a['steps']} steps "
            f"(after {a['warmup']} untimed), batch {a['batch_size']}, every row new to the "
            f"service; {s['repeats']} repetitions, pairs interleaved; load {_load(d)} on "
            f"{d['environment']['machine']['cpu_count']} cores. Floor: the student's CE step plus "
            "the teacher's forward, 1 thread each, one after the other. Overlap cannot beat "
            f"max(student, teacher) / (student + teacher) ({bound}), and each request costs a Ray "
            "round trip. The overlap works (the service step approaches that bound when the "
            "student's step is not negligible: balanced), but on one machine a colocated teacher "
            "that gets both threads is as fast (its forward parallelizes too); the service pays "
            "off in the student's memory (last column), when the teacher is shared (the tune "
            "below) or lives on other devices.\n")


def row_teacher_service_tune(R: Results) -> str:
    d = R.load("teacher_service_tune")
    parts = []
    for name, pair in d["pairs"].items():
        r = pair["summary"]["ratios"]
        parts.append(f"{name} ({pair['teacher_params'] / 1e6:.0f}M-parameter teacher): memory "
                     f"{_mm(r['model_processes_mb_service_over_online'])}, wall "
                     f"{_mm(r['wall_s_service_over_online'])}")
    return (f"{d['args']['trials']}-trial tune, service / a teacher per trial: "
            + "; ".join(parts) + f" (load {_load(d)}); "
            "[details](../README.md#where-the-teacher-runs)")


@block("teacher-service-tune")
def teacher_service_tune(R: Results) -> str:
    """A tune sharing one teacher service vs a teacher per trial (teacher_service_tune.json)."""
    d = R.load("teacher_service_tune")
    a = d["args"]
    lines = ["| teacher | mode | wall | memory of the model processes | Ray instance peak above "
             "idle | teacher loads | rows forwarded / asked |", "|---|---|---|---|---|---|---|"]
    for name, pair in d["pairs"].items():
        s = pair["summary"]
        for mode in ("online", "service"):
            m = s[mode]
            if mode == "service":
                svc = [r["service"] for r in pair["runs"]["service"]]
                loads = ", ".join(f"{x['loads']:.0f}" for x in svc)
                rows = ", ".join(f"{x['rows_forwarded']:.0f} / {x['rows_requested']:.0f}"
                                 for x in svc)
            else:
                loads, rows = f"{a['trials']} (one per trial)", "-"
            lines.append(f"| {name} ({pair['teacher_params'] / 1e6:.0f}M) | {mode} | "
                         f"{_mm_int(m['wall_s'], 's')} | {_mm_int(m['model_processes_mb'], ' MB')} | "
                         f"{_mm_int(m['tree_peak_above_idle_mb'], ' MB')} | {loads} | {rows} |")
    return ("\n".join(lines) + "\n\n"
            f"`benchmarks/teacher_service_tune.py`: `run_tune` of a {a['trials']}-trial grid "
            f"(learning rates) over a 1-worker DFT stage of {a['steps']} steps, all trials at "
            f"once on {a['cpus']} logical CPUs ({d['environment']['machine']['cpu_count']} cores, "
            f"load {_load(d)}); median (min-max) of {a['repeats']} repetitions (per run where "
            "listed), modes interleaved, each tune in a fresh Ray instance, nothing cached. "
            "Memory: PSS, the sum of each process's peak over the trials' Ray Train workers and "
            "(service) the replica and its coordinator. A teacher per trial holds one copy per "
            "trial; the service holds one and forwards each row once for all trials (they read "
            "the same rows), the rest are cache hits. Service / online: " + "; ".join(
                f"{n} memory {_mm(p['summary']['ratios']['model_processes_mb_service_over_online'])}"
                f", wall {_mm(p['summary']['ratios']['wall_s_service_over_online'])}"
                for n, p in d["pairs"].items()) + ". The service's replica and coordinator "
            "took " + ", ".join(f"{statistics.median(_svc_mb(p)):.0f} MB ({n})"
                                for n, p in d["pairs"].items())
            + ": the service saves memory once the teacher copies it replaces outweigh its own "
            "processes.\n")


def _svc_mb(pair: dict) -> list[float]:
    return [r["roles"]["teacher_service"]["sum_of_peaks_mb"] for r in pair["runs"]["service"]]


def _mm_int(x: dict, unit: str) -> str:
    return f"{x['median']:.0f}{unit} ({x['min']:.0f}-{x['max']:.0f})"


ROWS = [
    Row("orchestration.py", "runner overhead per stage (a chain of no-op stages), fan-out of "
        "sleeping stages on 2 CPU slots vs the ideal, fully cached reruns as fresh `mmkd run` "
        "processes (MLflow written by a background relog)", row_orchestration,
        "cached rerun ≤ 3 s"),
    Row("train_stage_overhead.py", "wall seconds of a 2-step tiny `pretrain` stage (Ray Train, "
        "1 worker, ZeRO-2) at Ray Train's default controller poll interval and at mmkd's "
        "(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, forwarded to every stage task)",
        row_train_stage_overhead, "the stage ends when training does"),
    Row("data_throughput.py", "samples/s of read → decode → image processor → chat template → "
        "tokenize → collate: plain Python loop vs Ray Data (1 and 2 CPUs); samples/s a training "
        "step of each tiny preset consumes", row_data_throughput, "data path never the bottleneck"),
    Row("data_memory.py", "peak extra RSS of reading a generated LLaVA JSON array, each variant "
        "in a fresh process: the streaming reader over the whole file and over one of its byte "
        "ranges (what one Ray read task gets), the pass that plans the ranges, `validate`'s "
        "sample, and `json.loads` of the whole file (the old reader's first step)",
        row_data_memory, "streaming < 128 MiB, whatever the file size"),
    Row("train_throughput.py", "tokens/s of the mmkd loop (1 Ray Train worker)"
        " vs a plain PyTorch loop, tiny-teacher, same batches and thread count (2 unless listed), repetitions "
        "interleaved", row_train_throughput, "overhead ≤ 10%"),
    Row("kd_step.py", "DFT step time / (SFT step + teacher forward); offline-teacher DFT step / "
        "SFT step", row_kd_step, "online ≤ 1.15"),
    Row("kd_loss_memory.py", "peak extra memory and time of the chunked KD losses vs a naive "
        "`kl_div` implementation, {setup}", row_kd_loss_memory, "≤ 0.25 of naive"),
    Row("kd_gain.py", "the default pipeline at 3 student seeds (teacher, data, tokenizer fixed at "
        "seed 0): held-out accuracy of teacher, PT-SFT, DPT-SFT, DPT-SFT-DFT", row_kd_gain,
        "KD beats the baseline"),
    Row("kd_ablation.py", "`pipelines/kd_stage_ablation.yaml` at 3 student seeds: the paper's "
        "stage ablation, the DFT loss-term ablation, and a compute-matched control (`*_ft`: "
        "DFT's exact schedule with cross-entropy only)", row_kd_ablation,
        "DPT-SFT-DFT beats the equal-compute control"),
    Row("kd_offline.py", "`pipelines/kd_offline_teacher.yaml`: DFT with the teacher online vs "
        "offline (stored top-k logits; the largest k covers the whole tiny vocabulary), same "
        "student (DPT-SFT, seed 0)", row_kd_offline, "offline at k=64 loses nothing here"),
    Row("merge_ablation.py", "`pipelines/merge_ablation.yaml` end to end (K=2 experts on k-means "
        "clusters of image embeddings; a centralized model on all data): held-out accuracy "
        "against the centralized model, parameters, training samples and summed stage seconds "
        "behind each model", row_merge_ablation),
    Row("tune_kd.py", "`mmkd tune pipelines/tune_kd_weights.yaml` (Optuna samples of DFT's α, β, "
        "γ, τ; ASHA on the student CE; best by held-out accuracy after DFT): trial-steps run vs "
        "the full budget, best accuracy vs the paper's defaults", row_tune_kd),
    Row("merge_methods.py", "time of each merge method on the tiny presets; forward cost of "
        "merged models relative to one expert", row_merge_methods),
    Row("family_kd_step.py", "per model family, its tiny teacher and student, one batch of 8 "
        "shapes samples through the real data path: the KD step (`DistillLoss`, all three KD "
        "terms) over its floor (student CE step + teacher forward); `Preprocessor` samples/s",
        row_family_kd_step),
    Row("teacher_service.py", "DFT step with `teacher: service` (student 1 CPU + one replica 1 "
        "CPU, requests a step ahead) vs `online` (one process, 2 threads), over the floor "
        "(student step + teacher forward); a tiny pair, a wide (32M) teacher, and that teacher "
        "with a student whose step costs about half its forward", row_teacher_service,
        "service ≤ 0.75 × floor"),
    Row("teacher_service_tune.py", "a 4-trial `mmkd tune` of DFT sharing one teacher service vs "
        "a teacher in every trial: memory of the processes holding a model, wall time",
        row_teacher_service_tune, "memory < online"),
    Row("eval_generation.py", "questions/s of `evaluate`'s greedy generation: the one-by-one loop "
        "vs batched with left padding and the KV cache (1 torch thread, 64 shapes questions, 8 "
        "new tokens)", row_eval_generation, "≥ 4x at batch 16"),
]


@block("benchmarks-table")
def benchmarks_table(R: Results) -> str:
    lines = ["| script | what is measured | result | aim |", "|---|---|---|---|"]
    for row in ROWS:
        measured = row.measured.replace("{setup}", kd_loss_setup(R)) \
            if "{setup}" in row.measured else row.measured
        lines.append(f"| `{row.script}` | {measured} | {row.result(R)} | {row.aim} |")
    return "\n".join(lines) + "\n"


@block("family_kd_step")
def family_kd_step(R: Results) -> str:
    """Per family: the KD step against its floor and preprocessing (family_kd_step.json)."""
    d, fams = _fkd(R)
    a = d["args"]
    ms = lambda s: f"{s['median']:.1f}"  # noqa: E731

    def ratio(r: dict) -> str:
        p = r["per_repeat"]
        return f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})"

    lines = ["| family | parameters, teacher / student | batch tokens (image) | student step | "
             "teacher forward | KD step | KD / floor, CPU | KD / floor, wall | KD terms alone | "
             "preprocessing samples per CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in fams.items():
        c, b, p = f["cpu_ms"], f["batch"], f["params"]
        pre = f["preprocess_samples_per_cpu_s"]
        lines.append(
            f"| {name} | {p['teacher'] / 1e6:.2f}M / {p['student'] / 1e6:.2f}M | {b['tokens']} "
            f"({b['image_tokens']}) | {ms(c['student_step'])} | {ms(c['teacher_forward'])} | "
            f"{ms(c['kd_step'])} | {ratio(f['kd_over_floor_cpu'])} | "
            f"{ratio(f['kd_over_floor'])} | {ms(c['kd_terms'])} | {pre['median']:.0f} "
            f"({pre['min']:.0f}-{pre['max']:.0f}); wall "
            f"{f['preprocess_samples_per_s']['median']:.0f} |")
    cpu = {n: f["kd_over_floor_cpu"]["per_repeat"]["median"] for n, f in fams.items()}
    hi = max(cpu, key=cpu.get)
    f = fams[hi]
    excess = (f["cpu_ms"]["kd_step"]["median"] - f["cpu_ms"]["student_step"]["median"]
              - f["cpu_ms"]["teacher_forward"]["median"])
    wall_over_cpu = [g["ms"]["kd_step"]["median"] / g["cpu_ms"]["kd_step"]["median"]
                     for g in fams.values()]
    fewest = min(g["batch"]["image_tokens"] for g in fams.values())
    many = [n for n, g in fams.items() if g["batch"]["image_tokens"] > 2 * fewest]
    few = [n for n in fams if n not in many]
    terms = lambda ns: span([fams[n]["cpu_ms"]["kd_terms"]["median"] for n in ns],  # noqa: E731
                            lambda x: f"{x:.1f}", " ms")
    ratios = lambda ns: span([cpu[n] for n in ns], lambda x: f"{x:.2f}")  # noqa: E731
    tokens = lambda ns: span([fams[n]["batch"]["image_tokens"] for n in ns], str)  # noqa: E731
    vocab = span([g["batch"]["vocab_size"] for g in fams.values()], str)
    hidden = sorted({h for g in fams.values() for h in g["text_hidden_size"].values()})
    text = (
        f"Student step, teacher forward, KD step and KD terms in ms of process CPU per step, "
        f"median of {a['repeats']} interleaved repetitions of {a['steps']} steps (after "
        f"{a['warmup']} untimed) at 1 torch thread; KD / floor: the median (min-max) of the "
        "repetitions' ratios (a repetition measures the three back to back); preprocessing: "
        f"{a['pre_rows']} rows per repetition, median (min-max), and the median in wall time. "
        f"Load average {_fkd_load(d)} on {d['environment']['machine']['cpu_count']} cores, so "
        f"the KD step's wall time ran {span(wall_over_cpu, lambda x: f'{x:.1f}')}x its CPU "
        "time: the CPU columns are the measure. The KD step costs most over its floor on "
        f"{hi} ({cpu[hi]:.2f}): {excess:.1f} ms over it, of which the KD losses alone take "
        f"{f['cpu_ms']['kd_terms']['median']:.1f} ms. The losses grow with the image tokens "
        "(L_vis: a softmax over the vocabulary per image token; L_rel: a Gram matrix over the "
        "vocabulary per image, quadratic in its tokens): on the families whose processors give "
        f"the most image tokens ({', '.join(many)}: {tokens(many)} in the batch) they take "
        f"{terms(many)} and the KD step is {ratios(many)} of its floor; on the others "
        f"({', '.join(few)}: {tokens(few)}) {terms(few)} and {ratios(few)}. They weigh more here "
        f"than at real sizes: the tiny models' hidden sizes ({', '.join(map(str, hidden))}) are "
        f"small next to the vocabulary ({vocab} tokens), and the models' matrix products grow "
        "with the hidden size while the losses do not.")
    return "\n".join(lines) + "\n\n" + para(text)


@block("notes")
def notes(R: Results) -> str:
    r = R.load("kd_loss_memory")["peak_extra_ratios"]
    d = R.load("default_pipeline")
    return (
        "- `kd_loss_memory.py` runs each variant in a fresh subprocess and reads the kernel's RSS "
        "high-water\n  mark after resetting it; checkpointing per chunk "
        f"({r['div_checkpoint / div_naive_kldiv']:.2f} of naive) lost to a custom autograd\n  "
        f"function ({r['div_chunked_fused / div_naive_kldiv']:.2f}) because each chunk's backward "
        "still allocated a full-size gradient.\n"
        "- `kd_step.py`'s offline-teacher overhead on the tiny model comes from hashing each row "
        "to find its\n  stored logits; at real model sizes the teacher forward it replaces "
        "dominates.\n"
        f"- The default pipeline (`mmkd run pipelines/llava_kd.yaml`, {len(d['stages'])} stages, "
        f"{d['training_stages']} of them Ray Train +\n  DeepSpeed) took "
        f"{minutes(d['run_wall_s'])} wall on a {d['environment']['machine']['cpu_count']}-core "
        f"machine (`default_pipeline.py`, {d['run_id']}"
        + (f", {d['driver_peak_rss_mib']} MiB peak RSS in the driver" if "driver_peak_rss_mib" in d
           else "") + ").\n")


def _median_phases(run: dict, loop: str) -> dict[str, tuple[float, float]]:
    """Per phase, the median over repetitions of the mean (wall, CPU) seconds per step."""
    reps = run["repetitions"]
    out = {k: (statistics.median(r[loop]["phase_wall_s"][k] for r in reps),
               statistics.median(r[loop]["phase_cpu_s"][k] for r in reps))
           for k in reps[0][loop]["phase_wall_s"]}
    out["whole"] = (statistics.median(r[loop]["step_wall_s"] for r in reps),
                    statistics.median(r[loop]["step_cpu_s"] for r in reps))
    return out


def default_epoch_steps(R: Results) -> int:
    """Optimizer steps per epoch of the default pipeline's SFT stages (one worker)."""
    stages = R.pipeline("pipelines/llava_kd.yaml")["stages"]
    return stages["shapes"]["params"]["num_instruct"] // stages["baseline_sft"]["params"][
        "batch_size"]


def _ray_cpu_share(cpu: dict) -> float:
    """CPU seconds per second that the Ray processes other than the worker (the process that
    used the most) spent during a loop's measured steps."""
    worker = max(cpu["cpu_s_by_process"].values())
    return (cpu["process_tree_cpu_s"] - worker) / cpu["window_s"]


@block("train-overhead")
def train_overhead(R: Results) -> str:
    """Where the mmkd loop's time goes next to the plain loop (train_throughput.json)."""
    runs = R.load("train_throughput")["runs"]
    lines = ["| configuration | repetitions | load (1 min) | plain tok/s | mmkd tok/s | overhead "
             "(wall), median (min to max) | CPU s per step, mmkd vs plain |",
             "|---|---|---|---|---|---|---|"]
    for key, run in sorted(runs.items()):
        s = train_run_summary(run)
        lines.append(f"| {train_label(key, run)} | {s['n']} | {s['load']} | {s['plain']} | "
                     f"{s['mmkd']} | {s['overhead']} | {s['cpu']} |")
    base = runs[TRAIN_BASE]
    ms = lambda x: f"{1e3 * x:.1f}"  # noqa: E731
    cols = ("fetch", "collate", "forward", "backward", "step", "other")
    lines += ["", f"Per step in {train_label(TRAIN_BASE)} (each repetition's mean, median over "
              "repetitions; ms wall / ms process CPU):", "",
              "| loop | load | fetch (Ray Data) | collate | forward | backward | optimizer step "
              "| other | whole step |", "|---|---|---|---|---|---|---|---|---|"]
    variants = [("plain", base, "plain"), ("mmkd", base, "mmkd")]
    off = f"{TRAIN_BASE},allreduce=off"
    if off in runs:
        variants.append(("mmkd, DeepSpeed all-reduce off", runs[off], "mmkd"))
    for name, run, loop in variants:
        ph = _median_phases(run, loop)
        cells = [f"{ms(ph[k][0])} / {ms(ph[k][1])}" if k in ph else "—" for k in cols]
        lines.append(f"| {name} | {train_run_summary(run)['load']} | {' | '.join(cells)} | "
                     f"{ms(ph['whole'][0])} / {ms(ph['whole'][1])} |")
    plain, mmkd = _median_phases(base, "plain"), _median_phases(base, "mmkd")
    stalls = [st for r in base["repetitions"] for st in r["mmkd"]["fetch_stalls"]]
    spy = (base.get("profile") or {}).get("py_spy")
    fetch_share = mmkd["fetch"][0] / mmkd["whole"][0]
    text = (
        f"Ray Data is {'not ' if fetch_share < 0.05 else ''}where the steady-state time goes: "
        "fetching a batch takes "
        f"{ms(mmkd['fetch'][0])} ms of a {ms(mmkd['whole'][0])} ms step on average, with "
        f"{len(stalls)} waits of {span([st[1] for st in stalls], lambda x: f'{x:.0f}', ' ms')} "
        f"in {len(base['repetitions'])} repetitions (a new window of rows). The extra CPU is "
        f"DeepSpeed's: backward {signed(1e3 * (mmkd['backward'][1] - plain['backward'][1]))} ms, "
        f"optimizer step {signed(1e3 * (mmkd['step'][1] - plain['step'][1]))} ms per step over "
        "the plain loop.")
    if spy:
        ds = spy["loop_top_deepspeed_functions"]
        reduce = sum(v for k, v in ds.items() if "allreduce" in k or "all_reduce" in k)
        clip = sum(v for k, v in ds.items() if k.startswith("clip_grad_norm_"))
        text += (f" py-spy on the worker ({spy['loop_samples']} samples of the training loop): "
                 f"{pct(reduce)} in DeepSpeed's gradient all-reduce (flatten, all-reduce over "
                 "gloo, copy back: with one worker there is nothing to reduce), "
                 f"{pct(clip)} in its gradient clipping.")
    if off in runs:
        text += (f" With the all-reduce off ({train_label(off)}): overhead "
                 f"{train_run_summary(runs[off])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[off])['cpu']}.")
    ray_share = [_ray_cpu_share(r["mmkd"]["measured_steps_cpu"]) for r in base["repetitions"]]
    text += (" The rest is wall time: the worker's two threads share the two cores "
             "with Ray's own processes (Train controller, Data coordinator, stats and log "
             f"actors, raylet, GCS), which used {span(ray_share, lambda x: f'{x:.2f}')} CPU "
             "seconds per second during the measured steps.")
    one, one_off = f"{TRAIN_BASE},threads=1", f"{TRAIN_BASE},allreduce=off,threads=1"
    if one in runs:
        text += (" With one thread per loop (the default pipeline's `cpus_per_worker: 1`, which "
                 f"leaves a core to Ray): overhead {train_run_summary(runs[one])['overhead']}, "
                 f"CPU per step {train_run_summary(runs[one])['cpu']}")
        text += (f"; with the all-reduce off as well: overhead "
                 f"{train_run_summary(runs[one_off])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[one_off])['cpu']}." if one_off in runs else ".")
    for key in (k for k in runs if "zero=" in k):
        ph = _median_phases(runs[key], "mmkd")
        text += (f" With {train_label(key).split(', ')[-1]} (the default pipeline's "
                 f"`deepspeed` setting) and one worker: overhead "
                 f"{train_run_summary(runs[key])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[key])['cpu']}; backward {ms(ph['backward'][1])} ms "
                 f"and optimizer step {ms(ph['step'][1])} ms of CPU (ZeRO-0: "
                 f"{ms(mmkd['backward'][1])} and {ms(mmkd['step'][1])}).")
    for key in (k for k in runs if "rows=" in k):
        st = [x for r in runs[key]["repetitions"] for x in r["mmkd"]["fetch_stalls"]]
        text += (f" With {train_label(key)} an epoch ends inside the measured steps and Ray Data "
                 f"executes the dataset again: {len(st)} waits of "
                 f"{span([x[1] for x in st], lambda x: f'{x:.0f}', ' ms')} "
                 f"(overhead {train_run_summary(runs[key])['overhead']}); the default pipeline "
                 f"pays this once per {default_epoch_steps(R)} steps.")
    if "omp=default" in runs:
        d = train_run_summary(runs["omp=default"])
        text += (" With `OMP_WAIT_POLICY` unset, torch's OpenMP threads spin while they wait, and "
                 f"on this shared machine throughput swung with the load: plain {d['plain']} "
                 f"tok/s at load {d['load']}, overhead {d['overhead']}.")
    return "\n".join(lines) + "\n\n" + para(text)


# ----------------------------------------------------------------------- per-benchmark renderers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render.kd_step_gpu import kd_step_gpu_block  # noqa: E402
from render.kd_terms import kd_terms_block  # noqa: E402

block("kd_step_gpu")(kd_step_gpu_block)
block("kd-terms")(lambda R: kd_terms_block(R, para))


# ----------------------------------------------------------------------------- driver


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
