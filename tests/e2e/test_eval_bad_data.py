"""`evaluate` has training's bad-data budget, seen as a user sees it. `mmkd run` on a LLaVA eval
file where 3 of 50 questions are bad (two images missing, one `options` string of 2 MB) fails
the stage in one paragraph naming the stage, what was bad and `max_bad_fraction`, and publishes
nothing; with the budget raised to 0.1 the same data scores the 47 good questions and counts the
bad ones by kind in the stage's metrics. (The budget is judged over the whole set: the first
bad question, the 8th, is 1 in 8 = 12.5% of what was read by then, and must not fail the stage
at 0.1 — it did, when evaluate judged every prefix.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import mmkd

pytestmark = pytest.mark.slow


def _eval_set(root: Path) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(50):
        rows.append({"question_id": i, "image": f"q{i}.png", "text": "What colour is it?",
                     "answer": "red"})
        if i not in (7, 31):  # these two images are never written
            Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "images" / f"q{i}.png")
    # MMMU writes options as a string; this one is 2 MB (its parser caps the length first)
    rows[12]["options"] = "[" + ", ".join(["'x'"] * 400_000) + "]"
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_fails_over_its_bad_data_budget_and_counts_bad_questions_under_it(cli_env,
                                                                                    tmp_path):
    from mmkd_test_plugins.data_tiny import build_tiny_data

    from workloads.models import build_model, save_model

    data = build_tiny_data(tmp_path / "tiny", num_samples=8, vocab_size=320)
    model = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                       str(tmp_path / "student"))
    questions = _eval_set(tmp_path / "eval")
    pipe = tmp_path / "eval.yaml"
    pipe.write_text(json.dumps({"name": "bad_eval", "stages": {"evaluate": {
        "workload": "evaluate",
        "params": {"models": {"student": model}, "max_new_tokens": 2,
                   "data": {"format": "llava_eval", "paths": str(questions),
                            "image_root": str(tmp_path / "eval" / "images")}}}}}))

    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=600)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    assert "stage 'evaluate'" in text and "max_bad_fraction" in text, text[-3000:]
    assert "3 of 50" in text or "3/50" in text, text[-3000:]
    store = Path(cli_env["MMKD_HOME"]) / "artifacts" / "stages"
    assert not list(store.glob("evaluate-*/_SUCCESS")), "a failed evaluate published a result"

    out = mmkd(["run", str(pipe), "--plain", "--set",
                "stages.evaluate.params.max_bad_fraction=0.1"], cli_env, tmp_path, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (result,) = store.glob("evaluate-*/_SUCCESS")
    runs = [json.loads(r.read_text()) for r in (Path(cli_env["MMKD_HOME"]) / "runs").glob(
        "*/run.json")]
    (record,) = [r for r in runs if r["status"] == "success"]
    metrics = record["stages"]["evaluate"]["last_metrics"]  # what the stage reported (MLflow too)
    assert metrics["data/seen"] == 50
    assert metrics["data/skipped_missing_image"] == 2
    assert metrics["data/skipped_wrong_field_type"] == 1
    table = json.loads((result.parent / "results" / "results.json").read_text())["results"]
    assert table["student"]["n"] == 47
