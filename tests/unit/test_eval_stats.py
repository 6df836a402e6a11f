"""Intervals and paired tests against textbook values and scipy (an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from workloads.evaluation.stats import (
    MCNEMAR_EXACT_BELOW,
    Comparison,
    bootstrap_interval,
    format_comparison,
    mcnemar,
    paired_bootstrap,
    paired_comparison,
    seed_summary,
    wilson_interval,
)

# ---------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat Med 17:857, example (a)
    (15, 148, 0.0624, 0.1605),  # example (b)
])
def test_wilson_textbook(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


@pytest.mark.parametrize("k, n, confidence", [(0, 10, 0.95), (10, 10, 0.95), (1, 2, 0.9),
                                              (300, 1000, 0.99), (7, 30, 0.8)])
def test_wilson_matches_scipy(k, n, confidence):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)


# ---------------------------------------------------------------- McNemar


def pairs(n01, n10, n11=5, n00=5):
    """Paired 0/1 scores with the given counts (n01: a wrong, b right)."""
    a = [0] * n01 + [1] * n10 + [1] * n11 + [0] * n00
    b = [1] * n01 + [0] * n10 + [1] * n11 + [0] * n00
    return a, b


@pytest.mark.parametrize("n01, n10", [(0, 1), (1, 5), (3, 3), (2, 10), (0, 12), (11, 13)])
def test_mcnemar_exact_matches_binomtest(n01, n10):
    assert n01 + n10 < MCNEMAR_EXACT_BELOW
    expected = stats.binomtest(n01, n01 + n10, 0.5).pvalue
    assert mcnemar(*pairs(n01, n10)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n01, n10", [(10, 20), (40, 25), (13, 13), (100, 60)])
def test_mcnemar_chi2_matches_scipy(n01, n10):
    assert n01 + n10 >= MCNEMAR_EXACT_BELOW
    chi2 = max(0, abs(n01 - n10) - 1) ** 2 / (n01 + n10)
    assert mcnemar(*pairs(n01, n10)) == pytest.approx(stats.chi2.sf(chi2, 1), rel=1e-9)


def test_mcnemar_edge_cases():
    assert mcnemar([1, 0, 1], [1, 0, 1]) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="different numbers"):
        mcnemar([1, 0], [1])


# ---------------------------------------------------------------- bootstrap

RNG = np.random.default_rng(1234)
LARGE = RNG.normal(0.5, 0.2, size=2000)


def test_bootstrap_close_to_normal_interval():
    se = LARGE.std(ddof=1) / math.sqrt(LARGE.size)
    low, high = bootstrap_interval(LARGE)
    z_low, z_high = LARGE.mean() - 1.959964 * se, LARGE.mean() + 1.959964 * se
    width = z_high - z_low
    assert abs(low - z_low) < 0.1 * width and abs(high - z_high) < 0.1 * width


def test_bootstrap_deterministic_per_seed():
    x = RNG.random(50)
    assert bootstrap_interval(x, seed=3) == bootstrap_interval(x, seed=3)
    assert bootstrap_interval(x, seed=3) != bootstrap_interval(x, seed=4)
    assert bootstrap_interval([0.4] * 10) == pytest.approx((0.4, 0.4))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_paired_bootstrap_vs_paired_t():
    a = LARGE
    b = LARGE + RNG.normal(0.01, 0.2, size=LARGE.size)  # a small real improvement
    c = paired_bootstrap(a, b)
    t = stats.ttest_rel(b, a)
    ci = t.confidence_interval()
    assert c.diff == pytest.approx(float(np.mean(b - a)))
    assert c.low == pytest.approx(ci.low, abs=0.15 * (ci.high - ci.low))
    assert c.high == pytest.approx(ci.high, abs=0.15 * (ci.high - ci.low))
    assert c.p == pytest.approx(t.pvalue, abs=0.03)
    assert c.test == "paired_bootstrap" and c.n == LARGE.size


def test_paired_bootstrap_null_and_clear_effect():
    same = paired_bootstrap(LARGE, LARGE)
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    big = paired_bootstrap(LARGE, LARGE + 0.1 + RNG.normal(0, 0.05, LARGE.size))
    assert big.p == pytest.approx(1 / 2001) and big.low > 0.09


def test_paired_comparison_picks_the_test():
    a, b = pairs(3, 12)
    binary = paired_comparison(a, b)
    assert binary.test == "mcnemar"
    assert binary.p == pytest.approx(stats.binomtest(3, 15, 0.5).pvalue)
    assert binary.diff == pytest.approx((3 - 12) / len(a))  # n01 - n10 over n
    soft = paired_comparison([0.3, 0.6, 1.0, 0.0], [0.6, 0.6, 1.0, 0.3])
    assert soft.test == "paired_bootstrap" and soft.diff == pytest.approx(0.15)


# ---------------------------------------------------------------- seeds and printing


def test_seed_summary_textbook():
    # 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776 -> 3 -/+ 2.776 * sqrt(2.5 / 5)
    s = seed_summary([1, 2, 3, 4, 5])
    assert (s.mean, s.n) == (3.0, 5) and s.std == pytest.approx(math.sqrt(2.5))
    assert (round(s.low, 3), round(s.high, 3)) == (1.037, 4.963)


@pytest.mark.parametrize("values", [[0.61, 0.64, 0.58], [0.7, 0.71], [0.5, 0.52, 0.49, 0.55]])
def test_seed_summary_matches_scipy_t(values):
    s = seed_summary(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert (s.low, s.high) == pytest.approx((low, high), rel=1e-12)


def test_seed_summary_single_seed():
    s = seed_summary([0.7])
    assert s.mean == 0.7 and math.isnan(s.std) and math.isnan(s.low) and s.n == 1


@pytest.mark.parametrize("comparison, expected", [
    (Comparison(0.006, -0.041, 0.053, 0.81, "mcnemar", 300),
     "kd_dpt_sft_dft − baseline: +0.6 pts [−4.1, +5.3], p = 0.81 (not significant)"),
    (Comparison(0.05, 0.02, 0.08, 0.0004, "mcnemar", 300),
     "kd_dpt_sft_dft − baseline: +5.0 pts [+2.0, +8.0], p < 0.001 (significant)"),
    (Comparison(-0.0002, -0.03, 0.02, 0.032, "paired_bootstrap", 300),
     "kd_dpt_sft_dft − baseline: +0.0 pts [−3.0, +2.0], p = 0.032 (significant)"),
])
def test_format_comparison(comparison, expected):
    assert format_comparison("kd_dpt_sft_dft", "baseline", comparison) == expected


def test_format_comparison_raw_scale():
    c = Comparison(12.5, -3.0, 28.0, 0.12, "paired_bootstrap", 100)
    assert (format_comparison("b", "a", c, scale=1, unit="")
            == "b − a: +12.5 [−3.0, +28.0], p = 0.12 (not significant)")


# -- results that flag themselves (#24) --------------------------------------------------------

def test_answer_floors_and_below_floor_by_hand():
    from workloads.evaluation.checks import answer_floors, below_floor

    refs = ([{"question_type": "colour", "answer": a} for a in
             ["green", "Green.", "green", "red", "blue"]]
            + [{"question_type": "count", "answer": a} for a in ["2", "3"]])
    floors = answer_floors(refs)
    assert floors["colour"] == {"answer": "green", "floor": 3 / 5, "n": 5}
    assert floors["count"]["floor"] == 1 / 2
    assert floors["overall"]["floor"] == pytest.approx((3 + 1) / 7)
    flags = below_floor({"colour": 0.4, "count": 0.5}, floors)
    assert flags == {"colour": {"accuracy": 0.4, "floor": 0.6}}  # at the floor is not below


def test_blind_examples_replace_images_by_one_grey_image():
    from PIL import Image

    from workloads.data.eval_examples import EvalExample
    from workloads.evaluation.checks import BLIND_RGB, blind_examples

    ex = EvalExample(key="k", source="s", image=Image.new("RGB", (8, 6), (255, 0, 0)),
                     prompt_conversation=[], answer="red", question_type="colour")
    text_only = EvalExample(key="t", source="s", image=None, prompt_conversation=[],
                            answer="x", question_type="q")
    blind, same = blind_examples([ex, text_only])
    assert blind.image.size == (8, 6) and set(blind.image.getdata()) == {BLIND_RGB}
    assert ex.image.getpixel((0, 0)) == (255, 0, 0) and same is text_only
