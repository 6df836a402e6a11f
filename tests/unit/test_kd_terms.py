"""KD terms as plugins: the registry, the config's `terms`, and a plugin term (the test
plugin's `argmax_ce`) against values worked out by hand, with every form of teacher rows."""

from __future__ import annotations

import math

import pytest
import torch

from workloads.kd_terms import (BUILTIN_WEIGHTS, KDBatch, KDTermError, get_kd_term,
                                resolve_terms)
from workloads.kd_terms.teacher_rows import DenseRows, PairedRows, StoredRows

# one row, T = 3, V = 3; labels: the logits at positions 0 and 1 predict response tokens
LABELS = torch.tensor([[-100, 1, 2]])
STUDENT = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
TEACHER = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 0.0, 0.0]]])
# by hand: the teacher's top tokens are 0 (p = e^2/(e^2+2) = 0.787) and 1 (p = e/(e+2) = 0.576);
# the student's CE on them: log 3 at position 0, log(e + 2) at position 1
CE_0, CE_1 = math.log(3), math.log(math.e + 2)
P_TOP = (math.exp(2) / (math.exp(2) + 2), math.e / (math.e + 2))


def _batch(rows, term="argmax_ce"):
    return KDBatch(STUDENT, rows, "fkl", 1.0, None, term)


def _stored(k):
    vals, idx = TEACHER.topk(k, dim=-1)
    resp = torch.tensor([[True, True, False]])
    return StoredRows(vals, idx, resp, torch.zeros_like(resp), [torch.zeros(0, 0)], 3,
                      "the offline teacher in /x")


def test_the_builtins_are_the_papers_three_weighted_by_alpha_beta_gamma():
    assert BUILTIN_WEIGHTS == {"res": "alpha", "vis": "beta", "rel": "gamma"}
    assert get_kd_term("res").needs == {"response"} and get_kd_term("rel").needs == {"relation"}
    got = resolve_terms({"res": 1.0, "vis": 0.0, "rel": 0.5}, {"argmax_ce": {"weight": 2}})
    assert got == {"res": {"weight": 1.0, "params": {}}, "rel": {"weight": 0.5, "params": {}},
                   "argmax_ce": {"weight": 2.0, "params": {"min_confidence": 0.0}}}


@pytest.mark.parametrize("terms,message", [
    ({"vis": 1.0}, "its weight is the stage's `beta`"),
    ({"hellinger": 1.0}, "unknown KD term 'hellinger'; registered: argmax_ce, rel, res, span, uld, vis"),
    ({"argmax_ce": -1}, "needs a weight, a number >= 0"),
    ({"argmax_ce": {"min_confidence": 0.5}}, "needs a weight"),
    ({"argmax_ce": {"weight": 1, "margin": 1}}, "has no parameter 'margin' (its parameters: "
                                                "min_confidence)"),
    ({"argmax_ce": {"weight": 1, "min_confidence": 2}}, "min_confidence"),
])
def test_bad_terms_name_the_term_and_what_to_do(terms, message):
    with pytest.raises(KDTermError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_terms({}, terms)


def test_a_plugin_term_equals_its_hand_computed_value_online():
    term = get_kd_term("argmax_ce")
    rows = DenseRows(TEACHER, LABELS, torch.zeros(1, 3, dtype=torch.bool))
    assert float(term.loss(_batch(rows), min_confidence=0.0)) == pytest.approx((CE_0 + CE_1) / 2)
    # 0.7 lies between the two positions' top probabilities: only position 0 counts
    assert P_TOP[1] < 0.7 < P_TOP[0]
    assert float(term.loss(_batch(rows), min_confidence=0.7)) == pytest.approx(CE_0)
    assert float(term.loss(_batch(rows), min_confidence=0.9)) == 0.0


def test_stored_rows_serve_whole_rows_only_when_k_covers_the_vocabulary():
    term = get_kd_term("argmax_ce")
    assert float(term.loss(_batch(_stored(3)), min_confidence=0.0)) == pytest.approx(
        (CE_0 + CE_1) / 2)
    with pytest.raises(KDTermError, match=r"KD term 'argmax_ce' reads the teacher's whole logit "
                                          r"rows, but the offline teacher in /x keeps the top 2 "
                                          r"of 3 .*`teacher: online`"):
        term.loss(_batch(_stored(2)), min_confidence=0.0)


def test_the_builtin_terms_on_stored_rows_at_full_k_equal_them_online():
    image = torch.tensor([[False, False, True]])
    dense = DenseRows(TEACHER, LABELS, image)
    vals, idx = TEACHER.topk(3, dim=-1)
    grams = [TEACHER[0, 2:] @ TEACHER[0, 2:].T]
    stored = StoredRows(vals, idx, dense.masks["response"], image, grams, 3, "stored")
    for name in ("res", "vis", "rel"):
        a = get_kd_term(name).loss(_batch(dense, name))
        b = get_kd_term(name).loss(_batch(stored, name))
        assert float(a) == pytest.approx(float(b), rel=1e-6, abs=1e-7), name
    assert float(get_kd_term("res").loss(_batch(dense, "res"))) > 0


def test_paired_rows_have_response_positions_only():
    rows = PairedRows(TEACHER[0, :2], LABELS.new_tensor([[True, True, False]]).bool(),
                      "teacher /t")
    assert float(get_kd_term("argmax_ce").loss(_batch(rows), min_confidence=0.0)) == \
        pytest.approx((CE_0 + CE_1) / 2)
    with pytest.raises(KDTermError, match="teacher /t runs on its own encoding"):
        get_kd_term("vis").loss(_batch(rows, "vis"))


PIPE = """name: t
stages:
  shapes: {workload: shapes, params: {num_captions: 16, num_instruct: 16, num_eval: 4}}
  tokenizer: {workload: tokenizer, inputs: {corpus: shapes.captions}, params: {vocab_size: 300}}
  kd:
    workload: distill
    inputs: {tokenizer: tokenizer.tokenizer, teacher: /no/teacher, data: shapes.instruct}
    params: {model: {preset: tiny-student}, max_steps: 1,
             terms: TERMS}
"""


@pytest.mark.parametrize("terms,said", [
    ("{argmax_ce: {weight: 0.5, min_confidense: 0.3}}",
     "has no parameter 'min_confidense' (its parameters: min_confidence)"),
    ("{hellinger: 1}", "unknown KD term 'hellinger'; registered: argmax_ce, rel, res, span, uld, vis"),
])
def test_mmkd_validate_names_the_line_the_term_and_what_it_accepts(capsys, tmp_path, terms,
                                                                   said, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    path = tmp_path / "p.yaml"
    path.write_text(PIPE.replace("TERMS", terms))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path.name}:9: stage 'kd', field 'stages.kd.params.terms'" in err and said in err
    assert "Traceback" not in err and "Value error" not in err
