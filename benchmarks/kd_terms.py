"""Which KD terms help the tiny default pipeline? pipelines/kd_term_ablation.yaml over student
seeds: the KD branch (DPT -> SFT -> DFT) with the paper's terms, without L_vis, without L_rel
and with L_res only, against the baseline (PT -> SFT), on the *validation* split.

Reports per seed and mean ± std over seeds: accuracy, accuracy per question type, the types
below their most-frequent-answer floor, the accuracy drop without images, and the evaluate
stage's paired comparisons (McNemar) of every KD row against the baseline and the paper's row.

    python benchmarks/kd_terms.py [--seeds 0 1 2] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeded import ROOT, machine, run_seed, summary

from orchestrator.provenance import environment

PIPELINE = "pipelines/kd_term_ablation.yaml"
VARIANTS = ["paper", "no_vis", "no_rel", "res_only"]
STUDENT_STAGES = ["baseline_pt", "baseline_sft"] + [f"{s}_{v}" for v in VARIANTS
                                                    for s in ("dpt", "sft", "dft")]
MODELS = ["baseline"] + [f"kd_{v}" for v in VARIANTS]
TYPES = ["color", "shape", "size", "count", "exists", "relation"]


def pipeline_for(variants: list[str], home: Path) -> tuple[str, list[str], list[str]]:
    """The ablation pipeline with only ``variants`` (and the baseline): its path, its student
    stages and its evaluated models. All four: the file itself."""
    if variants == VARIANTS:
        return PIPELINE, STUDENT_STAGES, MODELS
    import yaml

    spec = yaml.safe_load((ROOT / PIPELINE).read_text())
    dropped = [v for v in VARIANTS if v not in variants]
    for v in dropped:
        for s in ("dpt", "sft", "dft"):
            del spec["stages"][f"{s}_{v}"]
    ev = spec["stages"]["evaluate"]
    ev["inputs"]["models"] = ["baseline_sft.model"] + [f"dft_{v}.model" for v in variants]
    ev["params"]["names"] = ["baseline"] + [f"kd_{v}" for v in variants]
    home.mkdir(parents=True, exist_ok=True)  # a fresh --home
    path = home / f"kd_term_ablation_{'_'.join(variants)}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    stages = ["baseline_pt", "baseline_sft"] + [f"{s}_{v}" for v in variants
                                                for s in ("dpt", "sft", "dft")]
    return str(path), stages, ["baseline"] + [f"kd_{v}" for v in variants]


def seed_row(seed: int, home: Path, extra: list[str], variants: list[str]) -> dict:
    pipeline, stages, models = pipeline_for(variants, home)
    run = run_seed(pipeline, stages, seed, home, extra)
    table = run.pop("table")
    run.pop("results_dir", None)
    return {**run,
            "accuracy": {m: table[m]["accuracy"] for m in models},
            "per_type": {m: {t: table[m].get(f"accuracy/{t}") for t in TYPES} for m in models},
            "below_floor_types": {m: table[m].get("below_floor_types") for m in models},
            "image_drop": {m: table[m].get("image_drop") for m in models}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME (reuses its cache)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every seed")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                    help="KD branches to run (the baseline always runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_terms.json"))
    args = ap.parse_args()

    rows = [seed_row(s, Path(args.home).resolve(), args.set, args.variants) for s in args.seeds]
    models = ["baseline"] + [f"kd_{v}" for v in args.variants]
    report = {
        "what": "validation-split shapes VQA exact-match accuracy of the default pipeline's KD "
                "branch with four sets of KD terms and of the baseline, teacher fixed (seed 0), "
                "student stages at each seed",
        "pipeline": PIPELINE, "overrides": args.set, "seeds": args.seeds, "runs": rows,
        "variants": args.variants,
        "summary": {m: summary([r["accuracy"][m] for r in rows]) for m in models},
        "per_type": {m: {t: summary([r["per_type"][m][t] for r in rows]) for t in TYPES}
                     for m in models},
        "gain_over_baseline": {m: summary([r["accuracy"][m] - r["accuracy"]["baseline"]
                                           for r in rows]) for m in models[1:]},
        "machine": machine(), "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "gain_over_baseline")}, indent=2))


if __name__ == "__main__":
    main()
