"""The merge ablation (pipelines/merge_ablation.yaml) on the tiny presets: every merge against
the centralized model — accuracy, caption perplexity, parameters, training samples and the
summed wall seconds of the stages behind each model — and each stage's own wall time.

    python benchmarks/merge_ablation.py [--home DIR] [--force STAGE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeded import ROOT, latest_record, machine, run_seed

PIPE = "pipelines/merge_ablation.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=str(ROOT / ".mmkd"))
    ap.add_argument("--force", action="append", default=[], help="rerun STAGE and downstream")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/merge_ablation.json"))
    args = ap.parse_args()
    home = Path(args.home).resolve()
    run = run_seed(PIPE, [], 0, home, [], args=[a for s in args.force for a in ("--force", s)])
    record = latest_record(home, PIPE)
    table = run["table"]
    central = table["centralized"]
    keep = ("accuracy", "caption_ppl", "params", "train_samples", "train_s")
    rows = {name: {**{k: m.get(k) for k in keep},
                   "accuracy_minus_centralized": m["accuracy"] - central["accuracy"],
                   "params_over_centralized": m["params"] / central["params"]}
            for name, m in table.items()}
    stage_s = {n: round(s["ended"] - s["started"], 1) for n, s in record["stages"].items()
               if s["status"] == "done"}
    report = {"what": "pipelines/merge_ablation.yaml on tiny presets, 300 held-out questions "
                      "(std. error ~2.8 points), one seed",
              "run_id": run["run_id"], "stage_status": run["stages"], "rows": rows,
              "stage_wall_s": stage_s, "machine": machine()}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, r in rows.items():
        print(f"{name:28s} {r['accuracy']:.3f} ({r['accuracy_minus_centralized']:+.3f}) "
              f"params x{r['params_over_centralized']:.2f} samples {r['train_samples']}")


if __name__ == "__main__":
    main()
