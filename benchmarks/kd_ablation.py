"""LLaVA-KD's stage and loss-term ablation (pipelines/kd_stage_ablation.yaml) over student seeds,
with the compute-matched control: ``*_ft`` rows run DFT's exact schedule (150 steps, lr 5e-4)
with cross-entropy only, so "DFT vs FT" is the effect of the KD terms at equal compute.

Reports held-out accuracy per row (mean ± std over seeds) and paired per-seed differences.

    python benchmarks/kd_ablation.py [--seeds 0 1 2] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _env import environment
from seeded import ROOT, machine, run_seed, summary

STUDENT_STAGES = ["pt", "dpt", "sft", "dft", "ft", "dft_response_only", "dft_response_visual"]
MODELS = ["teacher", "pt_sft", "dpt_sft", "pt_sft_ft", "pt_sft_dft", "dpt_sft_ft", "dpt_sft_dft",
          "dpt_sft_dft_res", "dpt_sft_dft_res_vis"]
# (name, a, b): accuracy(a) - accuracy(b), paired per seed
CONTRASTS = [
    ("DPT-SFT vs PT-SFT (distilled pre-training)", "dpt_sft", "pt_sft"),
    ("DPT-SFT-DFT vs PT-SFT (the paper's headline)", "dpt_sft_dft", "pt_sft"),
    ("DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)", "dpt_sft_dft", "dpt_sft_ft"),
    ("PT-SFT-DFT vs PT-SFT-FT (KD terms at equal compute)", "pt_sft_dft", "pt_sft_ft"),
    ("DPT-SFT-DFT vs PT-SFT-FT (whole recipe at equal compute)", "dpt_sft_dft", "pt_sft_ft"),
    ("+visual vs response-only (DFT)", "dpt_sft_dft_res_vis", "dpt_sft_dft_res"),
    ("+relation vs response-only (DFT)", "dpt_sft_dft", "dpt_sft_dft_res"),
    ("+relation vs +visual (DFT)", "dpt_sft_dft", "dpt_sft_dft_res_vis"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME (reuses its cache)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_ablation.json"))
    args = ap.parse_args()

    rows = []
    for seed in args.seeds:
        run = run_seed("pipelines/kd_stage_ablation.yaml", STUDENT_STAGES, seed,
                       Path(args.home).resolve(), args.set)
        table = run.pop("table")
        rows.append({**run, "accuracy": {m: table[m]["accuracy"] for m in MODELS}})
        print(json.dumps(rows[-1]["accuracy"]), flush=True)
    report = {
        "what": "held-out shapes VQA exact-match accuracy, pipelines/kd_stage_ablation.yaml, "
                "teacher fixed (seed 0), student stages at each seed",
        "overrides": args.set, "seeds": args.seeds, "runs": rows,
        "summary": {m: summary([r["accuracy"][m] for r in rows]) for m in MODELS},
        "contrasts": {name: {**summary([r["accuracy"][a] - r["accuracy"][b] for r in rows]),
                             "positive_seeds": sum(r["accuracy"][a] > r["accuracy"][b]
                                                   for r in rows)}
                      for name, a, b in CONTRASTS},
        "machine": machine(),
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "contrasts")}, indent=2))


if __name__ == "__main__":
    main()
