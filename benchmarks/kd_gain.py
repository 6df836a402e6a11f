"""Does LLaVA-KD help? The default pipeline over several student seeds, teacher fixed.

For each seed S, runs `mmkd run pipelines/llava_kd.yaml` with every *student* stage's seed set
to S (the data, tokenizer and teacher stay at seed 0, so they are trained once and cached), then
reads the evaluate stage's table. Reports per seed and mean ± std over seeds:
  * teacher accuracy, baseline (PT-SFT), KD after DPT-SFT, KD after DPT-SFT-DFT;
  * gain = KD (DPT-SFT-DFT) - baseline, and gain of DPT-SFT alone.

    python benchmarks/kd_gain.py [--seeds 0 1 2] [--home DIR] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeded import ROOT, run_seed, summary

from scipy import stats

from orchestrator.provenance import environment
from workloads.evaluation.stats import paired_comparison

STUDENT_STAGES = ["baseline_pt", "baseline_sft", "student_dpt", "student_sft", "student_dft"]
MODELS = ["teacher", "baseline_pt_sft", "kd_dpt_sft", "kd_dpt_sft_dft"]


def seed_row(seed: int, home: Path, extra: list[str]) -> dict:
    run = run_seed("pipelines/llava_kd.yaml", STUDENT_STAGES, seed, home, extra)
    table = run.pop("table")
    results = Path(run.pop("results_dir"))
    run["correct"] = {m: [1.0 if json.loads(line)["correct"] else 0.0 for line in
                          open(results / f"predictions_{m}.jsonl")]
                      for m in ("baseline_pt_sft", "kd_dpt_sft", "kd_dpt_sft_dft")}
    run["comparisons"] = [c for c in run["comparisons"] if "teacher" not in (c["a"], c["b"])]
    return {**run, "accuracy": {m: table[m]["accuracy"] for m in MODELS},
            "per_type": {m: {k.split("/", 1)[1]: v for k, v in table[m].items()
                             if k.startswith("accuracy/")} for m in MODELS}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME (reuses its cache)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_gain.json"))
    args = ap.parse_args()

    rows = [seed_row(s, Path(args.home).resolve(), args.set) for s in args.seeds]
    gain = [r["accuracy"]["kd_dpt_sft_dft"] - r["accuracy"]["baseline_pt_sft"] for r in rows]
    gain_dpt = [r["accuracy"]["kd_dpt_sft"] - r["accuracy"]["baseline_pt_sft"] for r in rows]
    pooled = {}
    for kd in ("kd_dpt_sft_dft", "kd_dpt_sft"):
        # every seed's answers to the same questions, pooled: McNemar on all the discordant
        # pairs (the questions repeat across seeds, so this p-value is the optimistic one) and
        # a one-sample t-test of the per-seed differences (seeds as the unit)
        c = paired_comparison([x for r in rows for x in r["correct"]["baseline_pt_sft"]],
                              [x for r in rows for x in r["correct"][kd]])
        diffs = [r["accuracy"][kd] - r["accuracy"]["baseline_pt_sft"] for r in rows]
        t_p = (float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1
               and len(set(diffs)) > 1 else None)
        pooled[kd] = {"diff": c.diff, "low": c.low, "high": c.high, "p_mcnemar": c.p,
                      "n": c.n, "p_ttest_over_seeds": t_p}
    for r in rows:
        r.pop("correct")
    report = {
        "what": "held-out shapes VQA exact-match accuracy of the default pipeline, teacher fixed "
                "(seed 0), student stages at each seed",
        "overrides": args.set, "seeds": args.seeds, "runs": rows,
        "summary": {m: summary([r["accuracy"][m] for r in rows]) for m in MODELS},
        "gain_dpt_sft_dft_over_pt_sft": summary(gain),
        "gain_dpt_sft_over_pt_sft": summary(gain_dpt),
        "pooled_over_seeds": pooled,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "gain_dpt_sft_dft_over_pt_sft",
                                             "gain_dpt_sft_over_pt_sft", "pooled_over_seeds")},
                     indent=2))


if __name__ == "__main__":
    main()
