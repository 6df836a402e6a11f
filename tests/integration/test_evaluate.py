"""Scoring functions of ``evaluate`` on hand-computed cases (no model, no Ray)."""

from __future__ import annotations

import pytest

from workloads.evaluation.evaluate import exact_match, model_names, normalize_answer
from workloads.evaluation.tables import accuracy_by_type, results_table


def test_normalize_and_exact_match():
    assert normalize_answer("  The Red, circle!") == "red circle"
    assert exact_match("Blue.", "blue")
    assert exact_match("a square", "Square")
    assert not exact_match("blue square", "blue")
    assert not exact_match("", "blue")


def test_accuracy_by_type_known_predictions():
    preds = [("red", "red", "color"), ("Blue!", "blue", "color"), ("green", "red", "color"),
             ("2", "3", "count"), ("yes", "Yes.", "exists")]
    records = [{"prediction": p, "answer": a, "question_type": t, "correct": exact_match(p, a)}
               for p, a, t in preds]
    acc = accuracy_by_type(records)
    assert list(acc)[0] == "overall"
    assert acc == pytest.approx({"overall": 3 / 5, "color": 2 / 3, "count": 0.0, "exists": 1.0})


def test_results_table_markdown_and_csv():
    md, csv_text = results_table({"teacher": {"accuracy": 0.75, "accuracy/color": 1.0, "n": 4},
                                  "student": {"accuracy": 0.25, "caption_ppl": 12.5, "n": 4}})
    lines = md.splitlines()
    assert lines[0] == "| model | accuracy | accuracy/color | caption_ppl | n |"
    assert lines[2] == "| teacher | 0.7500 | 1.0000 |  | 4 |"
    assert csv_text.splitlines()[2] == "student,0.2500,,12.5000,4"


def test_model_names_from_inputs():
    assert model_names({"t": "/a/model"}) == {"t": "/a/model"}
    assert model_names(["/s/teacher_sft/model", "/s/student_dft/model"]) == {
        "teacher_sft": "/s/teacher_sft/model", "student_dft": "/s/student_dft/model"}
    assert model_names(["/x/model", "/y/model"], names=["a", "b"]) == {"a": "/x/model", "b": "/y/model"}
    with pytest.raises(ValueError, match="names"):
        model_names(["/x/model"], names=["a", "b"])
