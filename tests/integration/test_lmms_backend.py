"""lmms-eval as ``evaluate``'s backend (``workloads.evaluation.lmms_backend``) on a local task built from the
shapes eval split, offline: lmms-eval's answers and its exact-match score are checked against
the same models' greedy answers (``workloads.evaluation.evaluate.generate_answer``) scored in the test.

Two tiny models: a random one (its answers depend on every pixel and prompt token, so equal
answers mean lmms-eval asked the same question about the same image) and a "yes-sayer" made by
hand (so the score is a known count, neither 0 nor 1).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from workloads.data.eval_examples import iter_eval_examples
from workloads.data.source import DataSource
from workloads.evaluation.evaluate import exact_match, generate_answer
from mmkd_test_plugins.train_fixtures import yes_sayer
from workloads.evaluation.lmms_backend import INSTALL, run_lmms_eval, write_local_task

TASK = "mmkd_shapes_eval"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def _needs_lmms_eval():
    if importlib.util.find_spec("lmms_eval") is None:
        if os.environ.get("CI"):  # CI installs it (scripts/install.sh): a skip would hide that
            pytest.fail(f"lmms-eval is not installed; install it with `{INSTALL}`")
        pytest.skip(f"lmms-eval is not installed (`{INSTALL}`)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    root = tmp_path_factory.mktemp("lmms")
    data = build_tiny_data(root / "data", num_samples=80, vocab_size=320)  # 20 eval questions
    torch.manual_seed(0)
    rand = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                      str(root / "random" / "model"))
    torch.manual_seed(1)
    model, proc = build_model({"preset": "tiny-student"}, data["tokenizer"])
    yes = save_model(yes_sayer(model, proc), proc, str(root / "yes" / "model"))
    task_dir = str(root / "tasks" / TASK)
    assert write_local_task(data["eval"], task_dir, TASK, max_new_tokens=MAX_NEW_TOKENS) == TASK
    examples = list(iter_eval_examples(DataSource(format="webdataset", paths=[data["eval"]])))
    return {"root": root, "random": rand, "yes": yes, "include": [str(root / "tasks")],
            "examples": examples, "eval": data["eval"]}


def _by_hand(model_dir, examples):
    """The built-in path's greedy answers and exact-match hits, in eval-split order."""
    from workloads.merging import load_any_model

    model, processor = load_any_model(model_dir)
    preds = [generate_answer(model, processor, ex, MAX_NEW_TOKENS) for ex in examples]
    return preds, [exact_match(p, ex.answer) for p, ex in zip(preds, examples)]


def _samples(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return sorted(rows, key=lambda r: r["doc_id"])


def test_local_task_folder(setup):
    task_dir = os.path.join(setup["include"][0], TASK)
    assert sorted(os.listdir(task_dir)) == ["data.jsonl", "images", f"{TASK}.yaml", "utils.py"]
    with open(os.path.join(task_dir, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    exs = setup["examples"]
    assert len(rows) == len(exs) == 20
    assert [(r["key"], r["answer"]) for r in rows] == [(e.key, e.answer) for e in exs]
    assert all("<image>" not in r["question"] and r["image"].startswith("images/") for r in rows)


@pytest.fixture(scope="module")
def random_run(setup):
    samples = str(setup["root"] / "random_samples.jsonl")
    scores = run_lmms_eval(setup["random"], [TASK], setup["include"], samples_path=samples)
    return scores, _samples(samples)


def test_random_model_same_answers_and_score_as_by_hand(setup, random_run):
    scores, rows = random_run
    preds, hits = _by_hand(setup["random"], setup["examples"])
    assert [r["key"] for r in rows] == [e.key for e in setup["examples"]]
    assert len(set(preds)) > 1  # the answers vary with the input, so equal answers mean something
    assert [r["prediction"].strip() for r in rows] == [p.strip() for p in preds]
    assert scores[f"{TASK}/n"] == 20
    assert scores[f"{TASK}/exact_match"] == pytest.approx(sum(hits) / len(hits))
    assert [r["exact_match"] for r in rows] == [float(h) for h in hits]


def test_lmms_evals_own_llava_hf_gives_the_same_answers(setup, random_run):
    """lmms-eval's own LLaVA class, an independent implementation, on the plain LLaVA dir."""
    pytest.importorskip("decord")  # lmms-eval's llava_hf module imports it
    theirs = str(setup["root"] / "llava_hf_samples.jsonl")
    scores = run_lmms_eval(setup["random"], [TASK], setup["include"], lmms_model="llava_hf",
                           model_args={"device_map": "cpu", "dtype": "float32"},
                           samples_path=theirs)
    ours = random_run[1]
    assert len(ours) == 20
    assert [r["prediction"] for r in _samples(theirs)] == [r["prediction"] for r in ours]
    assert scores == random_run[0]


def test_yes_sayer_scores_the_known_count(setup):
    scores = run_lmms_eval(setup["yes"], [TASK], setup["include"])
    preds, hits = _by_hand(setup["yes"], setup["examples"])
    assert set(preds) == {"yes"}
    expected = sum(e.answer == "yes" for e in setup["examples"]) / len(setup["examples"])
    assert 0 < expected < 1
    assert sum(hits) / len(hits) == pytest.approx(expected)
    assert scores[f"{TASK}/exact_match"] == pytest.approx(expected)
    assert scores[f"{TASK}/n"] == 20
    # lmms-eval's standard error of a mean: sqrt(p(1-p)/(n-1))
    assert scores[f"{TASK}/exact_match_stderr"] == pytest.approx(
        (expected * (1 - expected) / 19) ** 0.5)


def test_unknown_task_names_the_include_path(setup):
    with pytest.raises(ValueError, match="not_a_task.*not found under include_path"):
        run_lmms_eval(setup["random"], ["not_a_task"], setup["include"])


def test_evaluate_stage_with_the_lmms_eval_backend(setup):
    """`evaluate` with `backend: lmms_eval` and no `tasks`: the eval data becomes a local task;
    lmms-eval's scores land in the same table, with an interval and a paired test."""
    from orchestrator.plugin import StageContext
    from workloads.evaluation.evaluate import EvalConfig, evaluate

    ctx = StageContext(pipeline="p", stage="evaluate", key="k",
                       output_dir=str(setup["root"] / "stage"),
                       inputs={"models": {"random": setup["random"], "yes": setup["yes"]},
                               "data": setup["eval"]})
    metrics = evaluate(EvalConfig(backend="lmms_eval", max_new_tokens=MAX_NEW_TOKENS), ctx)
    expected = sum(e.answer == "yes" for e in setup["examples"]) / 20
    assert metrics["yes/mmkd_eval/exact_match"] == pytest.approx(expected)
    assert metrics["yes/mmkd_eval/exact_match_low"] < expected < metrics[
        "yes/mmkd_eval/exact_match_high"]
    table = json.load(open(setup["root"] / "stage" / "results" / "results.json"))
    assert table["headline"] == "mmkd_eval/exact_match"
    [c] = table["comparisons"]
    assert (c["a"], c["b"]) == ("random", "yes") and 0 < c["p"] <= 1
    head = json.load(open(setup["root"] / "stage" / "headline.json"))
    assert head["metrics"]["yes/mmkd_eval/exact_match"] == pytest.approx(expected)
