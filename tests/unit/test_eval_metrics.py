"""Benchmark metrics against worked examples of the official scorers (values computed by hand from
their rules, not taken from our output)."""

from __future__ import annotations

import pytest

from workloads.evaluation.metrics import (
    METRICS,
    exact_match,
    extract_choice,
    gqa_match,
    mme_parse,
    normalize_answer,
    pope_counts,
    pope_parse,
    vqa_normalize,
    vqa_soft_accuracy,
)

# ---------------------------------------------------------------- VQAv2 / TextVQA


@pytest.mark.parametrize("text, expected", [
    # EvalAI processor, step by step: lowercase, drop ',' '?', split "'s", punctuation, periods
    # not before a digit, number words, articles, contractions.
    ("Two dogs.", "2 dogs"),
    ("The poster shows a 10% discount.", "poster shows 10% discount"),  # m4c_evaluator's demo
    ("dont", "don't"),
    ("Yes!", "yes"),
    ("3.5", "3.5"),
    ("t-shirt", "t shirt"),            # '-' not touching a space -> replaced by a space
    ("black - white", "black white"),  # touching a space -> deleted
    ("red, white", "red white"),
    ("man's hat", "man 's hat"),
    ("none", "0"),
    ("  TEN\n", "10"),
    ("an apple", "apple"),
    ("what's up?", "what 's up"),
])
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


# 10 annotators, k of them give the prediction. Leave-one-out: dropping one of the k leaves k-1
# matches, dropping one of the 10-k leaves k, so acc = [k min(1,(k-1)/3) + (10-k) min(1,k/3)] / 10.
@pytest.mark.parametrize("k, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_ten_annotators(k, expected):
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_soft_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides():
    answers = ["Two Dogs"] * 3 + ["dogs"] * 7
    assert vqa_soft_accuracy("2 dogs.", answers) == pytest.approx(0.9)
    assert vqa_soft_accuracy("the dogs", answers) == pytest.approx(1.0)


@pytest.mark.parametrize("answers, expected", [
    (["cat"] * 3 + ["dog"] * 2, (3 * 2 / 3 + 2 * 1) / 5),  # 5 answers, 3 match: 0.8
    (["cat"] * 3, 2 / 3),                                    # each subset of 2 has 2 matches
    (["cat", "dog"], (0 + 1 / 3) / 2),
    (["cat"], 1.0),                                          # one answer: exact match
    (["dog"], 0.0),
])
def test_vqa_soft_accuracy_fewer_answers(answers, expected):
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_metric_mean_and_registry():
    m = METRICS["vqa"]
    records = [{"prediction": "two", "answers": ["2"] * 2 + ["1"] * 8},
               {"prediction": "yes", "answers": ["yes"] * 10}]
    assert m.scores(records) == pytest.approx([0.6, 1.0])
    assert m.aggregate(records)[m.headline] == pytest.approx(0.8)
    assert not m.binary
    with pytest.raises(ValueError, match="answers"):
        m.item_score("x", {"question_id": 7})


# ---------------------------------------------------------------- exact match


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes.", "yes", 1.0), ("Left", "left", 1.0), ("  left. ", "left", 1.0),
    ("the left", "left", 0.0),  # GQA keeps articles
    ("left side", "left", 0.0),
])
def test_gqa_match(prediction, answer, expected):
    assert gqa_match(prediction, [answer]) == expected


def test_todays_exact_match_kept():
    # the behaviour workloads.evaluation.evaluate had: punctuation -> space, articles dropped
    assert normalize_answer("The Red, Ball!") == "red ball"
    assert normalize_answer("a  big-circle") == "big circle"
    assert exact_match("A cat.", "cat") and not exact_match("cats", "cat")
    records = [{"prediction": "The square", "answer": "square"},
               {"prediction": "circle", "answer": "square"}]
    assert METRICS["exact_match"].aggregate(records) == {"accuracy": 0.5, "n": 2.0}


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a dog in the image.", "no"),
    ("No.", "no"),
    ("no", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("Not sure.", "yes"),              # POPE checks "No", "no", "not": capital "Not" is not there
    ("I don't know", "yes"),
    ("nope", "yes"),
])
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_pope_aggregate_by_hand():
    # TP=3, FP=2, TN=4, FN=1 -> acc 7/10, precision 3/5, recall 3/4, F1 2/3, yes-ratio 5/10
    rows = ([("Yes", "yes")] * 3 + [("Yes, it is.", "no")] * 2 + [("No", "no")] * 4
            + [("There is no dog.", "yes")])
    records = [{"prediction": p, "label": y, "category": "random"} for p, y in rows]
    assert pope_counts(records) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    m = METRICS["pope"]
    out = m.aggregate(records)
    expected = {"accuracy": 0.7, "precision": 0.6, "recall": 0.75, "f1": 2 / 3, "yes_ratio": 0.5}
    for k, v in expected.items():
        assert out[k] == pytest.approx(v) and out[f"{k}/random"] == pytest.approx(v)
    assert m.headline == "f1" and not m.mean_headline
    assert m.scores(records) == [1.0] * 3 + [0.0] * 2 + [1.0] * 4 + [0.0]


def test_pope_label_from_answers_and_bad_label():
    assert METRICS["pope"].item_score("No", {"answers": ["no"]}) == 1.0
    with pytest.raises(ValueError, match="expected 'yes' or 'no'"):
        METRICS["pope"].item_score("No", {"label": "maybe", "question_id": 3})


# ---------------------------------------------------------------- multiple choice

OPTIONS = {"A": "cat", "B": "dog", "C": "black cat", "D": "bird"}


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B) dog", "B"), ("C. black cat", "C"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("The answer is (D).", "D"),
    ("Answer:B", None),               # glued to the word: MMBench's split does not see it
    ("dog", "B"),                     # the option's text
    ("It is a dog.", "B"),            # the one option text contained
    ("black cat", "C"),               # equal to C's text though "cat" (A) is inside it
    ("Black cat.", "C"),
    ("a black cat", None),            # contains both "cat" and "black cat": ambiguous
    ("A or B", None),                 # two bare letters
    ("I don't know", None),
    ("E", None),                      # not an option
    ("b", None),                      # MMBench is case-sensitive
    ("A cat is on the mat", "A"),     # "A" in >3 words is read as the article; text "cat" -> A
])
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


def test_extract_choice_without_options():
    assert extract_choice("(C)") == "C"
    assert extract_choice("dog") is None


def test_multiple_choice_gold_as_letter_or_text():
    m = METRICS["multiple_choice"]
    assert m.item_score("B", {"answers": ["B"], "options": OPTIONS}) == 1.0
    assert m.item_score("B", {"answers": ["dog"], "options": OPTIONS}) == 1.0
    assert m.item_score("A", {"answer": "B", "options": OPTIONS}) == 0.0


def test_circular_evaluation():
    # q1: 4 rotations all right; q2: 3 right, 1 wrong -> circular 1/2, plain 7/8
    def rot(qid, ok):
        return {"circular_id": qid, "prediction": "A" if ok else "B", "answers": ["A"],
                "options": {"A": "x", "B": "y"}}
    records = [rot("q1", True)] * 4 + [rot("q2", True)] * 3 + [rot("q2", False)]
    m = METRICS["multiple_choice_circular"]
    out = m.aggregate(records)
    assert out["circular_accuracy"] == 0.5 and out["accuracy"] == 7 / 8 and out["n"] == 2
    assert m.headline == "circular_accuracy" and m.scores(records) == [1.0, 0.0]


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No.", "no"), ("yes, it is", "yes"), ("No, it is not.", "no"),
    ("y", "yes"), ("n", "no"), ("x", "other"), ("Maybe", "other"), ("There is no dog", "other"),
])
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_scores_by_hand():
    def q(cat, img, pred, label):
        return {"category": cat, "image_id": img, "prediction": pred, "label": label}
    records = [
        q("existence", "i1", "Yes", "yes"), q("existence", "i1", "No", "no"),  # both right
        q("existence", "i2", "Yes", "yes"), q("existence", "i2", "Yes", "no"),  # one right
        q("count", "i3", "No", "yes"), q("count", "i3", "Yes", "no"),           # none right
        q("code_reasoning", "i4", "Yes", "yes"), q("code_reasoning", "i4", "No", "no"),
    ]
    out = METRICS["mme"].aggregate(records)
    # existence: acc 3/4, acc+ 1/2 -> 125; count: 0; code_reasoning: acc 1, acc+ 1 -> 200
    assert out["acc/existence"] == 0.75 and out["acc_plus/existence"] == 0.5
    assert out["score/existence"] == pytest.approx(125.0)
    assert out["score/count"] == 0.0 and out["score/code_reasoning"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(125.0) and out["cognition"] == pytest.approx(200.0)
    assert METRICS["mme"].headline == "perception"


def test_mme_unknown_category():
    with pytest.raises(ValueError, match="not an MME subtask"):
        METRICS["mme"].aggregate([{"category": "Existence", "image_id": 1, "prediction": "yes",
                                   "label": "yes"}])


def test_registry_is_consistent():
    for key, m in METRICS.items():
        assert m.name == key and key == key.lower()
