"""Why does every model score at the floor on `exists` questions? Two measurements:

1. ``pipelines/teacher_budget.yaml``: the default pipeline's teacher with SFT at 300 steps (the
   default) and 1200, scored on the held-out questions.
2. For every model of that run and of a default-pipeline run (``--default HOME RUN_ID``, e.g.
   the run behind ``results/default_pipeline.json``): its `exists` answers split by what the
   image holds — the asked-for object is there ("yes" questions), its colour is absent, its
   shape is absent, or both are there on different objects — with how often it says "yes" in
   each. A model that uses the image says "yes" far more often when the object is there than
   when its colour is absent; one that does not says "yes" equally often everywhere.

    python benchmarks/exists_budget.py [--home DIR] [--default HOME RUN_ID]
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _env import environment  # noqa: E402
from seeded import ROOT, run_seed  # noqa: E402

KINDS = ("object present", "colour absent", "shape absent", "both present, not together")


def eval_questions(home: Path, shapes_uri: str | None = None) -> dict[str, dict]:
    """The eval split's samples by key (question text, scene), from a run's shapes output."""
    pattern = f"{shapes_uri}/eval/*.tar" if shapes_uri else \
        f"{home}/artifacts/stages/shapes-*/eval/*.tar"
    out = {}
    for path in glob.glob(pattern):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[Path(m.name).name.rsplit(".", 1)[0]] = json.load(tar.extractfile(m))
    return out


def exists_breakdown(results_dir: Path, questions: dict[str, dict]) -> dict[str, dict]:
    """Per model: for each kind of `exists` question, n, the share answered "yes", accuracy;
    and the gap between "yes" when the object is present and when its colour is absent."""
    out = {}
    for pred in sorted(results_dir.glob("predictions_*.jsonl")):
        model = pred.stem.removeprefix("predictions_")
        counts = {k: [0, 0, 0] for k in KINDS}
        for line in pred.open():
            r = json.loads(line)
            if r["question_type"] != "exists":
                continue
            text = questions[r["key"]]["conversations"][0]["value"]
            colour, shape = re.search(r"Is there an? (\w+) (\w+)\?", text).groups()
            colours = {o["color"] for o in r["scene"]}
            shapes = {o["shape"] for o in r["scene"]}
            kind = ("object present" if r["answer"] == "yes" else
                    "colour absent" if colour not in colours else
                    "shape absent" if shape not in shapes else "both present, not together")
            c = counts[kind]
            c[0] += 1
            c[1] += str(r["prediction"]).strip().lower().startswith("yes")
            c[2] += bool(r["correct"])
        kinds = {k: {"n": n, "says_yes": round(y / n, 3), "accuracy": round(a / n, 3)}
                 for k, (n, y, a) in counts.items() if n}
        n_all = sum(v[0] for v in counts.values())
        out[model] = {"kinds": kinds, "accuracy": round(sum(v[2] for v in counts.values())
                                                         / n_all, 3), "n": n_all,
                      "yes_gap": round(kinds["object present"]["says_yes"]
                                       - kinds["colour absent"]["says_yes"], 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME (reuses its cache)")
    ap.add_argument("--default", nargs=2, metavar=("HOME", "RUN_ID"),
                    help="also break down a default-pipeline run's evaluate results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/exists_budget.json"))
    args = ap.parse_args()
    home = Path(args.home).resolve()
    run = run_seed("pipelines/teacher_budget.yaml", [], 0, home, [])
    record = json.loads((home / "runs" / run["run_id"] / "run.json").read_text())
    questions = eval_questions(home, record["stages"]["shapes"]["uri"])
    result = {
        "what": "held-out `exists` questions: accuracy, and the share of 'yes' answers by what "
                "the image holds (pipelines/teacher_budget.yaml; a default-pipeline run)",
        "teacher_budget": {"run_id": run["run_id"], "wall_seconds": run["wall_seconds"],
                           "accuracy": {m: {"overall" if k == "accuracy" else k.removeprefix("accuracy/"): v
                                            for k, v in r.items()
                                            if k == "accuracy" or k.startswith("accuracy/")}
                                        for m, r in run["table"].items()},
                           "exists": exists_breakdown(Path(run["results_dir"]), questions)},
    }
    if args.default:
        d_home, run_id = Path(args.default[0]), args.default[1]
        d_record = json.loads((d_home / "runs" / run_id / "run.json").read_text())
        d_results = Path(d_record["stages"]["evaluate"]["uri"]) / "results"
        d_questions = eval_questions(d_home, d_record["stages"]["shapes"]["uri"])
        result["default_pipeline"] = {"run_id": run_id,
                                      "exists": exists_breakdown(d_results, d_questions)}
    result["environment"] = environment()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
