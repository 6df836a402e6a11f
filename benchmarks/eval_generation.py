"""Questions/s of evaluation's greedy generation: today's one-question-at-a-time loop
(``workloads.evaluation.evaluate.generate_answer``) against batched generation
(``workloads.evaluation.generation.generate_answers``: left padding, KV cache) at batch sizes 1, 4, 16, on
the tiny presets, and writes ``benchmarks/results/eval_generation.json``.

    python benchmarks/eval_generation.py [--questions 64] [--repeats 5] [--max-new-tokens 8]
                                         [--threads 1]

The questions are the shapes eval split (every one with an image), the models random-init
``tiny-student`` and ``tiny-teacher`` (seed 0). Every method answers every question in every
repetition, and the script asserts that all answers are identical to the one-by-one loop's.
The methods run in a rotated order in each repetition and the speed-up is also given per
repetition (a ratio of two runs made back to back), because the machine is shared: the load
average at start and end is recorded beside the numbers, and each run's process CPU seconds
beside its wall seconds (CPU time counts only this process's work, so it moves less with
other people's load). ``--threads`` defaults to 1, the thread count the ``evaluate`` stage
runs with under its default ``cpus_per_worker: 1``.

Random-init models never emit the end-of-sequence token, so every answer is ``max_new_tokens``
long: the one-by-one loop gains nothing from answers that stop early, and a batch never
waits for its longest answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "eval_generation.json"
PRESETS = ("tiny-student", "tiny-teacher")
BATCH_SIZES = (1, 4, 16)


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def bench_model(preset: str, tokenizer: str, questions: list, repeats: int,
                max_new_tokens: int) -> dict:
    import torch

    from workloads.evaluation.evaluate import generate_answer
    from workloads.evaluation.generation import batching, generate_answers
    from workloads.models import build_model

    torch.manual_seed(0)
    model, processor = build_model({"preset": preset}, tokenizer)
    model.eval()

    def one_by_one() -> list[str]:
        return [generate_answer(model, processor, q, max_new_tokens) for q in questions]

    methods = {"one_by_one": one_by_one}
    for bs in BATCH_SIZES:
        methods[f"batched_{bs}"] = (lambda bs=bs: generate_answers(
            model, processor, questions, max_new_tokens, batch_size=bs))
    # untimed warm-up of both paths; the one-by-one answers are the reference
    generate_answers(model, processor, questions[:16], max_new_tokens, batch_size=16)
    reference = one_by_one()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start, cpu = time.perf_counter(), time.process_time()
            answers = methods[name]()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu)
            assert answers == reference, f"{preset} {name}: answers differ from one by one"
    n = len(questions)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "batching": batching(model, processor), "identical_answers": True,
           "distinct_answers": len(set(reference)),
           "questions_per_s": {k: _stats([n / s for s in v]) for k, v in seconds.items()},
           "questions_per_cpu_s": {k: _stats([n / s for s in v])
                                   for k, v in cpu_seconds.items()},
           "speedup_vs_one_by_one": {}, "cpu_speedup_vs_one_by_one": {}}
    for key, secs in (("speedup_vs_one_by_one", seconds),
                      ("cpu_speedup_vs_one_by_one", cpu_seconds)):
        for name in names[1:]:
            paired = [o / b for o, b in zip(secs["one_by_one"], secs[name])]
            out[key][name] = {"of_medians": round(statistics.median(secs["one_by_one"])
                                                  / statistics.median(secs[name]), 2),
                              "per_repeat": _stats(paired)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.data.eval_examples import iter_eval_examples
    from workloads.data.source import DataSource

    env = environment()
    with tempfile.TemporaryDirectory(prefix="mmkd-evalgen-") as tmp:
        data = build_tiny_data(Path(tmp) / "tiny", num_samples=4 * args.questions)
        questions = list(iter_eval_examples(DataSource(format="webdataset",
                                                       paths=data["eval"])))[:args.questions]
        results = {preset: bench_model(preset, data["tokenizer"], questions, args.repeats,
                                       args.max_new_tokens) for preset in PRESETS}
    report = {
        "what": "questions/s of greedy eval generation: one by one (evaluate.generate_answer) "
                "vs batched (generation.generate_answers); answers asserted identical",
        "questions": len(questions), "with_image": sum(q.image is not None for q in questions),
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "environment": env, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "models": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({p: {k: v["median"] for k, v in r["questions_per_s"].items()}
                      for p, r in results.items()}, indent=2))
    for key in ("speedup_vs_one_by_one", "cpu_speedup_vs_one_by_one"):
        print(key, json.dumps({p: {k: v["of_medians"] for k, v in r[key].items()}
                               for p, r in results.items()}))


if __name__ == "__main__":
    main()
