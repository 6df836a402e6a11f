"""Cross-tokenizer distillation (issue #27): the alignment of two tokenizations of one reply
(``data/alignment.py``), the ``uld`` and ``span`` KD terms against values worked out by hand,
``span`` = ``res`` for one tokenizer, and the preprocessor's reply groups on two real BPE
tokenizers checked by decoding each group's tokens on both sides."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workloads.data.alignment import align_reply_tokens, vocabulary_map
from workloads.kd_terms import KDBatch, get_kd_term
from workloads.kd_terms.teacher_rows import DenseRows, Replies
from workloads.kd_terms.uld import index_pairs, sorted_l1

# "a red circle" + each template's end-of-turn marker:
# student  a | red| circ|le|</s>          teacher  a red| cir|cle|<|im_end|>
S_TEXT, T_TEXT = "a red circle</s>", "a red circle<|im_end|>"
S_SPANS = [(0, 0, 1), (0, 1, 5), (0, 5, 10), (0, 10, 12), (0, 12, 16)]
T_SPANS = [(0, 0, 5), (0, 5, 9), (0, 9, 12), (0, 12, 22)]


def test_alignment_groups_the_spans_both_tokenizations_agree_on():
    s, t = align_reply_tokens(S_SPANS, [S_TEXT], T_SPANS, [T_TEXT])
    # "a red" (2 : 1), " circle" (2 : 2), the end-of-turn markers (1 : 1)
    assert s.tolist() == [0, 0, 1, 1, 2] and t.tolist() == [0, 1, 1, 2]


def test_alignment_drops_a_span_one_side_was_cut_short_of():
    # max_length kept the teacher's "a red| cir" only: " circle" is not whole on its side
    s, t = align_reply_tokens(S_SPANS, [S_TEXT], T_SPANS[:2], [T_TEXT])
    assert s.tolist() == [0, 0, -1, -1, -1] and t.tolist() == [0, -1]


def test_alignment_numbers_groups_over_turns():
    s_texts, t_texts = ["ab<e>", "cd<e>"], ["ab<f>", "cd<f>"]
    s_spans = [(0, 0, 1), (0, 1, 2), (0, 2, 5), (1, 0, 2), (1, 2, 5)]
    t_spans = [(0, 0, 2), (0, 2, 5), (1, 0, 1), (1, 1, 2), (1, 2, 5)]
    s, t = align_reply_tokens(s_spans, s_texts, t_spans, t_texts)
    # the markers share their first character "<": the common text runs through it
    assert s.tolist() == [0, 0, 1, 2, 3] and t.tolist() == [0, 1, 2, 2, 3]


def test_uld_is_the_sorted_l1_of_a_worked_example():
    # student [0.5, 0.3, 0.2], teacher [0.1, 0.6, 0.2, 0.1]: sorted and padded
    # [0.5, 0.3, 0.2, 0] vs [0.6, 0.2, 0.1, 0.1]: |-.1| + |.1| + |.1| + |-.1| = 0.4
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    assert float(sorted_l1(p, q)[0]) == pytest.approx(0.4, abs=1e-7)
    r = Replies(p.log(), q.log(), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                torch.tensor([0]))
    x = KDBatch(None, _Fixed(r), "fkl", 1.0, None, "uld")
    assert float(get_kd_term("uld").loss(x)) == pytest.approx(0.4, abs=1e-6)


def test_uld_pairs_the_ith_reply_token_of_each_row_up_to_the_shorter_side():
    s_row = torch.tensor([0, 0, 0, 1, 1])
    t_row = torch.tensor([0, 0, 1, 1, 1])
    s_idx, t_idx = index_pairs(s_row, t_row)
    assert s_idx.tolist() == [0, 1, 3, 4] and t_idx.tolist() == [0, 1, 2, 3]


class _Fixed:
    """A teacher side that hands out fixed ``Replies``."""

    def __init__(self, r):
        self.r = r

    def replies(self, s, term=""):
        return self.r


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_span_of_a_worked_example():
    """Two spans. Student vocabulary {0: "x", 1: "y", 2: "zz"}, teacher {0: "y", 1: "z",
    2: "x", 3: "w"}: "x" and "y" are in both (student 0 = teacher 2, student 1 = teacher 0).

    Span 1, one token each side, "x" in both: fkl between the two distributions restricted
    to {x, y} and renormalised. Span 2, "zz" — one student token, teacher "z" then "z": ULD's
    sorted L1 between the student's distribution and the teacher's merged one, p_t1(y) times
    the probability p_t2 gives the second "z"."""
    ps = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    pt = [[0.25, 0.05, 0.45, 0.25], [0.1, 0.7, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]]
    r = Replies(torch.tensor(ps).log(), torch.tensor(pt).log(),
                s_row=torch.tensor([0, 0]), t_row=torch.tensor([0, 0, 0]),
                s_group=torch.tensor([7, 8]), t_group=torch.tensor([7, 8, 8]),
                s_token=torch.tensor([0, 2]), t_token=torch.tensor([2, 1, 1]),
                shared=(np.array([0, 1]), np.array([2, 0])))
    # span 1: student over (x, y) = (.6, .3) -> (2/3, 1/3); teacher (.45, .25) -> (9/14, 5/14)
    s1 = [0.6 / 0.9, 0.3 / 0.9]
    t1 = [0.45 / 0.7, 0.25 / 0.7]
    span1 = _kl(t1, s1)
    # span 2: teacher merged = [.1, .7, .1, .1] * 0.5 = [.05, .35, .05, .05]; sorted
    # [.35, .05, .05, .05] vs the student's [.6, .2, .2, 0]: .25 + .15 + .15 + .05
    merged = sorted([0.05, 0.35, 0.05, 0.05], reverse=True)
    student = sorted(ps[1], reverse=True) + [0.0]
    span2 = sum(abs(a - b) for a, b in zip(student, merged))
    x = KDBatch(None, _Fixed(r), "fkl", 1.0, None, "span")
    got = float(get_kd_term("span").loss(x))
    assert got == pytest.approx((span1 + span2) / 2, abs=1e-6)
    assert span1 == pytest.approx(9 / 14 * math.log(27 / 28) + 5 / 14 * math.log(15 / 14))
    assert span2 == pytest.approx(0.6)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_span_equals_res_for_one_tokenizer(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.full((2, 6), -100)
    labels[0, 2:5] = torch.tensor([3, 4, 5])
    labels[1, 1:6] = torch.tensor([1, 2, 3, 4, 9])
    rows = DenseRows(t, labels, torch.zeros(2, 6, dtype=torch.bool))
    res = get_kd_term("res").loss(KDBatch(s, rows, kind, 2.0, None, "res"))
    span = get_kd_term("span").loss(KDBatch(s, rows, kind, 2.0, None, "span"))
    assert float(span.detach()) == pytest.approx(float(res.detach()), rel=1e-12)
    g_res, = torch.autograd.grad(res, s)
    g_span, = torch.autograd.grad(span, s)
    assert torch.allclose(g_res, g_span, rtol=1e-10, atol=1e-14)


def test_the_refused_terms_name_the_ones_that_apply_across_tokenizers():
    from workloads.kd_terms import KDTermError
    from workloads.kd_terms.teacher_rows import CrossRows

    rows = CrossRows(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                     torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                     torch.zeros(1, 3, dtype=torch.long), None, "teacher T")
    with pytest.raises(KDTermError, match=r"another tokenizer.*\(uld, span\)"):
        get_kd_term("res").loss(KDBatch(torch.zeros(1, 3, 4), rows, "fkl", 1.0, None, "res"))


@pytest.fixture(scope="module")
def two_processors(tmp_path_factory):
    """A LLaVA-1.5 processor on a 320-token BPE and a Qwen2-VL one on a 400-token BPE trained
    on the same text: two real tokenizers that split words differently."""
    from mmkd_test_plugins.data_tiny import build_tiny_data

    from workloads.models import save_processor

    root = tmp_path_factory.mktemp("xtok")
    a = build_tiny_data(root / "a", num_samples=16, vocab_size=320)
    b = build_tiny_data(root / "b", num_samples=16, vocab_size=400)
    teacher = save_processor({"preset": "tiny-teacher", "family": "qwen2_vl"}, b["tokenizer"],
                             str(root / "teacher_proc"))
    return {"student": a["processor"], "teacher": teacher, "data": a}


def test_the_preprocessor_groups_reply_tokens_that_spell_the_same_text(two_processors):
    from transformers import AutoTokenizer

    from workloads.data.preprocess import REPLY_GROUP, TEACHER_PREFIX, Preprocessor

    p = two_processors
    pre = Preprocessor(p["student"], 256, quality=None, teacher_dir=p["teacher"])
    assert pre.cross
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle in the picture?"},
            {"from": "gpt", "value": "The circle is purple, next to a yellowish triangle."},
            {"from": "human", "value": "And its shape?"},
            {"from": "gpt", "value": "circle"}]
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buf, format="PNG")
    batch = {"key": np.array(["k"], dtype=object), "source": np.array(["s"], dtype=object),
             "bad": np.array([None], dtype=object), "image": np.array([buf.getvalue()], dtype=object),
             "conversations": np.array([json.dumps(conv)], dtype=object)}
    out = pre(batch)
    s_tok = AutoTokenizer.from_pretrained(p["student"])
    t_tok = AutoTokenizer.from_pretrained(p["teacher"])
    s_ids, s_grp = out["input_ids"][0], out[REPLY_GROUP][0]
    t_ids, t_grp = out[TEACHER_PREFIX + "input_ids"][0], out[TEACHER_PREFIX + REPLY_GROUP][0]
    s_lab, t_lab = out["labels"][0], out[TEACHER_PREFIX + "labels"][0]
    assert ((s_grp >= 0) <= (s_lab != -100)).all() and ((t_grp >= 0) <= (t_lab != -100)).all()
    groups = sorted(set(s_grp[s_grp >= 0].tolist()))
    assert groups == sorted(set(t_grp[t_grp >= 0].tolist())) and len(groups) >= 6
    assert s_tok.tokenize("yellowish") != t_tok.tokenize("yellowish") or \
        s_tok.tokenize(" purple") != t_tok.tokenize(" purple"), "the tokenizers split alike"
    ends = 0
    for g in groups:
        s_text = s_tok.decode(s_ids[s_grp == g])
        t_text = t_tok.decode(t_ids[t_grp == g])
        if s_text == t_text:
            continue
        # the end-of-turn group: each template's own marker
        ends += 1
        assert s_text.strip() in s_tok.all_special_tokens or s_text.strip() == s_tok.eos_token, \
            (g, s_text, t_text)
    assert ends <= 2  # one per turn at most
    # every reply character is covered: the aligned text of both turns spells the replies
    text = s_tok.decode(s_ids[(s_grp >= 0)], skip_special_tokens=True)
    assert "The circle is purple, next to a yellowish triangle." in text and "circle" in text


def test_vocabulary_map_pairs_tokens_that_decode_alike(two_processors):
    from transformers import AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(two_processors["student"])
    t_tok = AutoTokenizer.from_pretrained(two_processors["teacher"])
    s_ids, t_ids = vocabulary_map(s_tok, t_tok)
    assert 100 < len(s_ids) < len(s_tok)  # most of the words, not all
    for a, b in zip(s_ids.tolist(), t_ids.tolist()):
        assert s_tok.decode([a]) == t_tok.decode([b])
    specials = set(s_tok.all_special_ids)
    assert not specials & set(s_ids.tolist())


def test_a_pair_across_tokenizers_runs_with_reply_terms_and_is_refused_without(two_processors,
                                                                               tmp_path):
    """A Qwen2-VL teacher on one BPE and a LLaVA-1.5 student preset on another: `uld`/`span`
    alone make the teacher read its own encoding, aligned by text ("cross"); L_res (alpha 1)
    is refused at stage start in one message naming the terms that do apply."""
    from workloads.distill import DistillConfig, DistillLoss, check_distill_pair
    from workloads.families.pairing import DistillCompatError
    from workloads.models import build_model, save_model

    data_b = str(two_processors["teacher"])
    torch.manual_seed(0)
    teacher = save_model(*build_model({"preset": "tiny-teacher", "family": "qwen2_vl"}, data_b),
                         str(tmp_path / "teacher"))
    student_tok = two_processors["data"]["tokenizer"]
    spec = {"preset": "tiny-student"}
    cross = DistillConfig(alpha=0, beta=0, gamma=0, terms={"uld": 1.0, "span": 0.5})
    assert check_distill_pair(cross, spec, student_tok, teacher, stage="kd") == "cross"
    with pytest.raises(DistillCompatError) as e:
        check_distill_pair(DistillConfig(beta=0, gamma=0), spec, student_tok, teacher,
                           stage="kd")
    msg = str(e.value)
    assert "stage 'kd'" in msg and "qwen2_vl" in msg and "terms: {uld: 1.0}" in msg \
        and "`span`" in msg and "\n" not in msg
    with pytest.raises(DistillCompatError, match=r"the terms res compare .*uld"):
        DistillLoss(vocab_size=10, image_token_id=3, teacher_dir=teacher, teacher_inputs="cross",
                    alpha=1.0, beta=0.0, gamma=0.0, terms={"uld": 1.0})


def test_validate_accepts_reply_terms_in_every_placement():
    from workloads.distill import DistillConfig, validate_distill

    cross = dict(alpha=0, beta=0, gamma=0, terms={"uld": 1.0})
    for teacher, inputs in (("online", {"teacher": "t.model"}), ("service", {"teacher": "t.model"}),
                            ("offline", {"teacher_logits": "t.logits"})):
        assert validate_distill(DistillConfig(teacher=teacher, **cross),
                                {**inputs, "init": "s.model"}) == [], teacher


def _cross_batches():
    """A student batch 6 wide and its teacher's own encoding 9 wide (as in the test below), the
    teacher's logits on it and the student's: vocabularies of 4 and 5 tokens."""
    g = torch.Generator().manual_seed(3)
    s_labels = torch.tensor([[-100, 2, 1, 3, -100, -100], [-100, -100, 0, 1, 2, -100]])
    s_groups = torch.tensor([[-1, 0, 0, 1, -1, -1], [-1, -1, 0, 1, 2, -1]])
    t_labels = torch.full((2, 9), -100)
    t_labels[0, 3:7] = torch.tensor([1, 2, 3, 4])
    t_labels[1, 5:8] = torch.tensor([1, 2, 0])
    t_groups = torch.full((2, 9), -1)
    t_groups[0, 3:7] = torch.tensor([0, 1, 1, 1])
    t_groups[1, 5:8] = torch.tensor([0, 1, 2])
    batch = {"labels": s_labels, "reply_group": s_groups}
    t_batch = {"labels": t_labels, "reply_group": t_groups,
               "input_ids": torch.randint(0, 5, (2, 9), generator=g)}
    return (batch, t_batch, torch.randn(2, 9, 5, generator=g, dtype=torch.float64),
            torch.randn(2, 6, 4, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("term,params", [("uld", {}), ("uld", {"align": "span"}), ("span", {})])
def test_stored_cross_rows_at_full_k_give_the_online_values(term, params):
    """An offline (or served) teacher with another tokenizer: its entries, stored at k = V_t on
    its own encoding (``teacher_entries``, as `teacher_logits` writes them), read back as
    ``CrossRows`` by ``cross_rows`` give every reply term the value the online teacher's
    logits give (the same rows, in the same order)."""
    from workloads.kd_terms.teacher_rows import CrossRows
    from workloads.teacher.payload import cross_rows, teacher_entries

    batch, t_batch, t_logits, s = _cross_batches()
    shared = (np.array([0, 1, 3]), np.array([4, 0, 2]))
    online = CrossRows(t_logits, t_batch["labels"], t_batch["reply_group"], batch["labels"],
                       batch["reply_group"], shared, "T")
    entries = teacher_entries(t_logits, t_batch, 5, image_token_id=-1, top_k=5)
    _, stored = cross_rows(entries, s, batch, t_batch, 4, 5, shared, "T")
    want = get_kd_term(term).loss(KDBatch(s, online, "fkl", 2.0, None, term), **params)
    got = get_kd_term(term).loss(KDBatch(s, stored, "fkl", 2.0, None, term), **params)
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(want) > 0


def test_stored_cross_rows_below_full_k_hold_the_teachers_top_k_renormalised():
    """At k = 2 of 5, ULD compares the student with the teacher's two most likely tokens'
    probabilities renormalised (worked out here from the logits, not from the stored rows)."""
    from workloads.teacher.payload import cross_rows, teacher_entries

    batch, t_batch, t_logits, s = _cross_batches()
    entries = teacher_entries(t_logits, t_batch, 5, image_token_id=-1, top_k=2)
    _, stored = cross_rows(entries, s, batch, t_batch, 4, 5, None, "T")
    got = get_kd_term("uld").loss(KDBatch(s, stored, "fkl", 1.0, None, "uld"))
    # the i-th reply token of each row on both sides: row 0 pairs 3 of 4 teacher tokens, row 1
    # all 3; the teacher's reply rows are the positions before each reply label
    s_rows = [s[0, 0], s[0, 1], s[0, 2], s[1, 1], s[1, 2], s[1, 3]]
    t_rows = [t_logits[0, 2], t_logits[0, 3], t_logits[0, 4], t_logits[1, 4], t_logits[1, 5],
              t_logits[1, 6]]
    dists = []
    for a, b in zip(s_rows, t_rows):
        p = sorted(torch.softmax(a, -1).tolist(), reverse=True) + [0.0]
        top = sorted(b.tolist(), reverse=True)[:2]
        z = sum(math.exp(v) for v in top)
        q = [math.exp(v) / z for v in top] + [0.0] * 3
        dists.append(sum(abs(x - y) for x, y in zip(p, q)))
    assert float(got) == pytest.approx(sum(dists) / len(dists), rel=1e-6)


def test_uld_by_spans_pairs_the_first_token_of_each_span():
    # student rows 0,1 | 2 | 3 in spans 5, 6, 9; teacher rows 0 | 1,2 | 3 in 5, 6, 8
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [1.0, 0.0]])
    q = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.2, 0.8], [0.5, 0.5]])
    r = Replies(p.clamp_min(1e-12).log(), q.log(), torch.zeros(4, dtype=torch.long),
                torch.zeros(4, dtype=torch.long), torch.tensor([5, 5, 6, 9]),
                torch.tensor([5, 6, 6, 8]))
    x = KDBatch(None, _Fixed(r), "fkl", 1.0, None, "uld")
    # span 5: [.5, .5] vs [.6, .4] -> 0.2; span 6: [.7, .3] vs [.8, .2] -> 0.2; 8, 9 unpaired
    assert float(get_kd_term("uld").loss(x, align="span")) == pytest.approx(0.2, abs=1e-6)


def test_cross_rows_give_one_key_per_span_on_both_sides_of_different_widths():
    """Student batch 6 wide, teacher batch 9 wide (another tokenizer, another template): the
    spans' keys depend on the batch row and the group number only."""
    from workloads.kd_terms.teacher_rows import CrossRows

    s_labels = torch.tensor([[-100, 4, 5, 6, -100, -100], [-100, -100, 7, 8, 9, -100]])
    s_groups = torch.tensor([[-1, 0, 0, 1, -1, -1], [-1, -1, 0, 1, 2, -1]])
    t_labels = torch.full((2, 9), -100)
    t_labels[0, 3:7] = torch.tensor([1, 2, 3, 4])
    t_labels[1, 5:8] = torch.tensor([1, 2, 3])
    t_groups = torch.full((2, 9), -1)
    t_groups[0, 3:7] = torch.tensor([0, 1, 1, 1])
    t_groups[1, 5:8] = torch.tensor([0, 1, 2])
    rows = CrossRows(torch.zeros(2, 9, 5), t_labels, t_groups, s_labels, s_groups, None, "T")
    r = rows.replies(torch.zeros(2, 6, 4))
    assert r.s.shape == (6, 4) and r.t.shape == (7, 5)
    assert r.s_token.tolist() == [4, 5, 6, 7, 8, 9] and r.t_token.tolist() == [1, 2, 3, 4, 1, 2, 3]
    assert r.s_group.unique().tolist() == r.t_group.unique().tolist()
    assert len(r.s_group.unique()) == 5 and r.s_row.tolist() == [0, 0, 0, 1, 1, 1]


def test_an_older_stored_teacher_without_its_processor_is_refused_in_one_paragraph(tmp_path):
    from workloads.families.pairing import DistillCompatError
    from workloads.teacher.offline import cross_loss_args

    manifest = {"fingerprint": "x", "max_length": 256, "vocab_size": 400}
    with pytest.raises(DistillCompatError) as e:
        cross_loss_args(str(tmp_path), manifest, None, 256, "kd_uld")
    msg = str(e.value)
    assert "stage 'kd_uld'" in msg and "no teacher processor" in msg \
        and "Rerun `teacher_logits`" in msg and "\n" not in msg
