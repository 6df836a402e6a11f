"""How `evaluate` turns per-question scores into intervals, paired tests and seed arms, checked
against scipy and hand-worked values (no model)."""

from __future__ import annotations

import pytest
from scipy import stats

from workloads.evaluation.metrics import METRICS
from workloads.evaluation.tables import compare_models, results_table, score_interval, seed_arms


def test_exact_match_interval_is_wilson():
    records = [{"prediction": "a", "answers": ["a" if i < 7 else "b"]} for i in range(10)]
    metric = METRICS["exact_match"]
    scores = metric.scores(records)
    assert sum(scores) == 7
    ci = stats.binomtest(7, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert score_interval(metric, records, scores) == pytest.approx((ci.low, ci.high))


def test_pope_interval_brackets_its_f1():
    # 40 yes/no questions: the model says yes to everything; F1 = 2*20/(2*20+20) = 2/3
    records = [{"prediction": "Yes", "label": "yes" if i % 2 else "no"} for i in range(40)]
    metric = METRICS["pope"]
    f1 = metric.aggregate(records)["f1"]
    assert f1 == pytest.approx(2 / 3)
    low, high = score_interval(metric, records, metric.scores(records), n_resamples=800)
    assert low < f1 < high and high - low < 0.4


def test_paired_comparison_of_two_models():
    a = [1.0] * 30 + [0.0] * 70
    b = [1.0] * 30 + [1.0] * 12 + [0.0] * 58  # b fixes 12 of a's errors, breaks none
    [c] = compare_models({"base": a, "kd": b})
    assert (c["a"], c["b"]) == ("base", "kd") and c["test"] == "mcnemar"
    assert c["diff"] == pytest.approx(0.12)
    # exact McNemar: 12 discordant pairs all one way, two-sided binomial p = 2 * 0.5**12
    assert c["p"] == pytest.approx(stats.binomtest(12, 12, 0.5).pvalue)
    assert c["low"] > 0 and c["text"].startswith("kd − base: +12.0 pts")
    assert "(significant)" in c["text"]


def test_seed_arms_mean_std_and_t_interval():
    results = {"teacher": {"accuracy": 0.6},
               "dft_seed-0": {"accuracy": 0.40}, "dft_seed-1": {"accuracy": 0.44},
               "dft_seed-2": {"accuracy": 0.48}, "sft_seed-0": {"accuracy": 0.3}}
    arms = seed_arms(results, "accuracy")
    assert list(arms) == ["dft"]  # one seed is no arm; unseeded names are not arms
    arm = arms["dft"]
    assert arm["mean"] == pytest.approx(0.44) and arm["std"] == pytest.approx(0.04)
    half = stats.t.ppf(0.975, 2) * 0.04 / 3 ** 0.5
    assert (arm["low"], arm["high"]) == pytest.approx((0.44 - half, 0.44 + half))


def test_table_puts_the_headline_and_its_interval_first_and_counts_as_integers():
    md, _ = results_table({"m": {"f1": 0.5, "f1_high": 0.6, "f1_low": 0.4, "accuracy": 0.7,
                                 "n": 300.0, "params": 204352.0}}, "f1")
    header, _, row = md.splitlines()
    assert header == "| model | f1 | f1_low | f1_high | accuracy | n | params |"
    assert row == "| m | 0.5000 | 0.4000 | 0.6000 | 0.7000 | 300 | 204352 |"
