"""Cross-tokenizer distillation (pipelines/cross_family_kd.yaml): a tiny Qwen2-VL teacher with
a 512-token BPE into a tiny LLaVA-1.5 student with a 384-token BPE, CE-only SFT vs CE + ULD vs
CE + span-aligned KD at the same steps from the same init; the evaluate stage's table with its
intervals and paired tests, each student's final KD term, and how many of the students' reply
tokens the alignment kept and how they split (1:1 spans, merged spans). The same for the
pipeline's second teacher, a LLaVA-1.5 on the 512-token BPE that sees the images
(``evaluate_llava``: another tokenizer, one family).

    python benchmarks/cross_family_kd.py [--home DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import environment  # noqa: E402
from seeded import ROOT, latest_record, run_seed  # noqa: E402

PIPE = "pipelines/cross_family_kd.yaml"
STUDENTS = ["sft", "kd_uld", "kd_span"]
LLAVA_STUDENTS = ["kd_uld_llava", "kd_span_llava"]


def alignment_stats(home: Path, record: dict, n_rows: int = 200) -> dict:
    """Encode ``n_rows`` instruct rows with both processors, as the KD stages do, and count the
    student's reply tokens by what the alignment made of them."""
    import numpy as np

    from workloads.data.preprocess import REPLY_GROUP, TEACHER_PREFIX, Preprocessor, rows_to_columns
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    stages = record["stages"]
    student = str(Path(stages["sft"]["uri"]) / "model")
    teacher = str(Path(stages["teacher"]["uri"]) / "model")
    pre = Preprocessor(student, 256, quality=None, teacher_dir=teacher)
    source = DataSource(format="webdataset", paths=[str(Path(stages["shapes"]["uri"]) / "instruct")],
                        max_samples=n_rows)
    out = pre(rows_to_columns(list(iter_rows(source))))
    s_tokens = one_one = merged_s = unaligned = 0
    t_tokens = 0
    for s_grp, t_grp, s_lab, t_lab in zip(out[REPLY_GROUP], out[TEACHER_PREFIX + REPLY_GROUP],
                                          out["labels"], out[TEACHER_PREFIX + "labels"]):
        s_grp, t_grp = np.asarray(s_grp), np.asarray(t_grp)
        s_tokens += int((np.asarray(s_lab) != -100).sum())
        t_tokens += int((np.asarray(t_lab) != -100).sum())
        unaligned += int(((np.asarray(s_lab) != -100) & (s_grp < 0)).sum())
        for g in set(s_grp[s_grp >= 0].tolist()):
            ns, nt = int((s_grp == g).sum()), int((t_grp == g).sum())
            if ns == nt == 1:
                one_one += 1
            else:
                merged_s += ns
    return {"rows": len(out[REPLY_GROUP]), "student_reply_tokens": s_tokens,
            "teacher_reply_tokens": t_tokens, "in_one_to_one_spans": one_one,
            "in_merged_spans": merged_s, "unaligned": unaligned}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=str(ROOT / ".mmkd"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cross_family_kd.json"))
    args = ap.parse_args()
    home = Path(args.home).resolve()
    run = run_seed(PIPE, STUDENTS + LLAVA_STUDENTS, args.seed, home, [])
    record = latest_record(home, PIPE)
    terms = {name: {k: v for k, v in record["stages"][name]["metrics"].items()
                    if k in ("loss", "ce", "l_uld", "l_span", "steps")}
             for name in STUDENTS + LLAVA_STUDENTS}

    def kept(results: dict) -> dict:
        return {m: {k: v for k, v in r.items() if k == "n" or k.startswith("accuracy")
                    or k in ("blind_accuracy", "image_drop", "below_floor_types")}
                for m, r in results.items()}

    def compared(comparisons: list) -> list:
        return [{k: c[k] for k in ("a", "b", "diff", "low", "high", "p", "test", "n")}
                for c in comparisons]

    table = kept(run["table"])
    llava = json.loads((Path(record["stages"]["evaluate_llava"]["uri"]) / "results"
                        / "results.json").read_text())
    report = {
        "what": "pipelines/cross_family_kd.yaml: Qwen2-VL teacher (512-token BPE) into LLaVA-1.5 "
                "students (384-token BPE), CE-only vs CE + uld vs CE + span, same init and "
                f"steps, seed {args.seed}, held-out shapes questions; `llava_teacher`: the same "
                "from a LLaVA-1.5 teacher on the 512-token BPE that sees the images",
        "seed": args.seed, "run_id": run["run_id"], "wall_seconds": run["wall_seconds"],
        "stage_status": run["stages"], "table": table,
        "comparisons": compared(run["comparisons"]),
        "llava_teacher": {"table": kept(llava["results"]),
                          "comparisons": compared(llava.get("comparisons", []))},
        "final_terms": terms,
        "alignment": alignment_stats(home, record),
        "environment": environment(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in {**table, **report["llava_teacher"]["table"]}.items():
        print(f"{name:14s} {r['accuracy']:.3f}")
    for c in report["comparisons"] + report["llava_teacher"]["comparisons"]:
        print(f"{c['b']} - {c['a']}: {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] "
              f"p={c['p']:.3f}")


if __name__ == "__main__":
    main()
