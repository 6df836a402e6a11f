"""Metrics of the standard VLM benchmarks, each with its official answer normalisation.

A *record* is one question as a dict: the reference fields plus ``prediction`` (model text).
Reference fields: ``answers`` (list of str; a single ``answer`` str is accepted too) and, per
metric, ``options`` ({letter: text}), ``label`` (yes/no), ``image_id``, ``category``,
``circular_id``.

Each ``Metric`` has ``item_score(prediction, reference) -> float`` in [0, 1] (what
``workloads.evaluation.stats`` resamples), ``aggregate(records) -> dict`` with the benchmark's numbers,
and ``headline``, the key a paper reports.

Registry keys, benchmarks, and the official scorer each follows:

- ``vqa``: VQAv2, TextVQA, VizWiz. EvalAI answer processing and the leave-one-out soft accuracy
  (GT-Vision-Lab/VQA vqaEval.py; mmf/LLaVA m4c_evaluator.py; lmms-eval vqa_eval_metric.py).
- ``gqa``: GQA. LLaVA scripts/convert_gqa_for_eval.py, then GQA eval.py's prediction == gold.
- ``exact_match``: mmkd's own VQA splits, as ``workloads.evaluation.evaluate`` scored them (unchanged).
- ``pope``: POPE. AoiDragon/POPE evaluate.py (= LLaVA llava/eval/eval_pope.py).
- ``multiple_choice``: ScienceQA, MMBench, MMMU. MMBench's rule-based ``can_infer``
  (lmms-eval tasks/mmbench/mmbench_evals.py), without its GPT fallback.
- ``multiple_choice_circular``: MMBench CircularEval (``eval_sub_data``: all rotations right).
- ``mme``: MME. MME eval_tool calculation.py; answer parsing of lmms-eval tasks/mme/utils.py.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Metric", "METRICS", "normalize_answer", "exact_match", "vqa_normalize",
           "vqa_soft_accuracy", "gqa_normalize", "gqa_match", "pope_parse", "pope_counts",
           "extract_choice", "mme_parse", "MME_PERCEPTION", "MME_COGNITION"]

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Metric:
    name: str
    headline: str
    """key of ``aggregate``'s result that papers report"""
    item_score: Callable[[str, Record], float]
    aggregate: Callable[[Sequence[Record]], dict[str, float]]
    binary: bool = True
    """per-question scores are 0/1 (Wilson interval, McNemar test apply)"""
    mean_headline: bool = True
    """the headline is the mean of ``scores(records)`` (so their interval is the headline's)"""
    group_key: str | None = None
    """records sharing this field are one question whose score is the min (circular evaluation)"""

    def scores(self, records: Sequence[Record]) -> list[float]:
        """Per-question scores, in order of first appearance (two models' lists pair up when
        their records come in the same order)."""
        per_record = [self.item_score(str(r["prediction"]), r) for r in records]
        if self.group_key is None:
            return per_record
        groups: dict[Any, float] = {}
        for i, (r, s) in enumerate(zip(records, per_record)):
            k = r.get(self.group_key, ("record", i))  # no group id: a question of its own
            groups[k] = min(groups.get(k, 1.0), s)
        return list(groups.values())


def _answers(ref: Record) -> list[str]:
    answers = ref.get("answers")
    if answers is None and ref.get("answer") is not None:
        answers = [ref["answer"]]
    if not answers:
        raise ValueError(f"reference {ref.get('question_id', '')!r}: no `answers` to score against")
    return [str(a) for a in answers]


def _mean_aggregate(metric: Callable[[str, Record], float]):
    def aggregate(records: Sequence[Record]) -> dict[str, float]:
        scores = [metric(str(r["prediction"]), r) for r in records]
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "n": float(len(scores))}
    return aggregate


# ------------------------------------------------------------------ today's mmkd exact match

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def _exact_match_score(prediction: str, ref: Record) -> float:
    return float(any(exact_match(prediction, a) for a in _answers(ref)))


# ------------------------------------------------------------------ VQAv2 / TextVQA

# EvalAI's processor (the VQA challenge server; lmms-eval and LLaVA's TextVQA evaluator use it).
# Unlike GT-Vision-Lab's vqaEval.py it keeps apostrophes and colons and also strips - ! { }.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
# Upstream writes "(?!<=\d)(\.)(?!\d)": the look-behind is mistyped, so in effect every period not
# followed by a digit goes ("3.5" keeps its point, "dogs." loses it).
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = ("a", "an", "the")
# The official table (contractions written without their apostrophes -> with them).
_VQA_CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't "
    "hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've "
    "he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've "
    "Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's "
    "maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've "
    "mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at "
    "shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've "
    "shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've "
    "somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
    "somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll "
    "someones=someone's somethingd=something'd somethingd've=something'd've "
    "something'dve=something'd've somethingll=something'll thats=that's thered=there'd "
    "thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd "
    "theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
    "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't "
    "whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
    "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've "
    "wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't "
    "wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've "
    "yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've "
    "y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
    "youre=you're youve=you've").split())


def vqa_normalize(text: str) -> str:
    """The EvalAI answer processing: lowercase; drop ``,`` and ``?``; split off ``'s``; strip the
    punctuation set (deleted when it touches a space, else replaced by one); drop periods not
    before a digit; number words -> digits; drop articles; restore contractions."""
    # Commas go first, so upstream's "digit,digit -> delete all punctuation" rule never fires.
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the annotators of ``min(#matches / 3, 1)``.

    With 10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0. Fewer answers use the same
    formula over n subsets of n-1 (it tops out at (n-1)/3 below 4 answers); a single answer is
    plain exact match (its only subset is empty). Prediction and answers are both normalised,
    as LLaVA's TextVQA evaluator does (vqaEval.py assumes pre-normalised VQAv2 annotations)."""
    if not answers:
        raise ValueError("vqa_soft_accuracy: no reference answers")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    subsets = [sum(g == pred for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
    return sum(min(1.0, m / 3) for m in subsets) / len(gts)


def _vqa_score(prediction: str, ref: Record) -> float:
    return vqa_soft_accuracy(prediction, _answers(ref))


# ------------------------------------------------------------------ GQA

def gqa_normalize(text: str) -> str:
    """Strip whitespace and trailing periods, lowercase (LLaVA's convert_gqa_for_eval.py does
    ``rstrip('.').lower()``; GQA's eval.py then compares strings exactly, articles included)."""
    return text.strip().rstrip(".").strip().lower()


def gqa_match(prediction: str, answers: Sequence[str]) -> float:
    pred = gqa_normalize(prediction)
    return float(any(pred == gqa_normalize(a) for a in answers))


def _gqa_score(prediction: str, ref: Record) -> float:
    return gqa_match(prediction, _answers(ref))


# ------------------------------------------------------------------ POPE

def pope_parse(text: str) -> str:
    """POPE's rule: keep the text before the first ``.``, drop commas, split on spaces; any word
    ``No``/``no``/``not`` -> "no", else "yes" (so "Not sure" and "nope" read as yes)."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _yes_no_label(ref: Record, metric: str) -> str:
    label = ref.get("label")
    label = str(label if label is not None else _answers(ref)[0]).lower().strip().rstrip(".")
    if label not in ("yes", "no"):
        raise ValueError(f"{metric}: reference {ref.get('question_id', '')!r} has label "
                         f"{label!r}; expected 'yes' or 'no' in `label` or `answers[0]`")
    return label


def _pope_score(prediction: str, ref: Record) -> float:
    return float(pope_parse(prediction) == _yes_no_label(ref, "pope"))


def pope_counts(records: Sequence[Record]) -> dict[str, int]:
    """TP/FP/TN/FN with "yes" as the positive class."""
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for r in records:
        pred, label = pope_parse(str(r["prediction"])), _yes_no_label(r, "pope")
        c[("t" if pred == label else "f") + ("p" if pred == "yes" else "n")] += 1
    return c


def _pope_from_counts(c: Mapping[str, int]) -> dict[str, float]:
    n = sum(c.values())
    # POPE divides by zero where nothing is predicted positive; we report 0 there.
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (c["tp"] + c["tn"]) / n if n else 0.0, "precision": precision,
            "recall": recall, "f1": f1,
            "yes_ratio": (c["tp"] + c["fp"]) / n if n else 0.0,  # of predictions, as POPE does
            "n": float(n)}


def _pope_aggregate(records: Sequence[Record]) -> dict[str, float]:
    """Pooled over all records, plus ``<metric>/<category>`` per POPE split (random, popular,
    adversarial) when records carry ``category``. LLaVA reports F1 per split."""
    out = _pope_from_counts(pope_counts(records))
    by_cat: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.get("category") is not None:
            by_cat[str(r["category"])].append(r)
    for cat, rs in sorted(by_cat.items()):
        out.update({f"{k}/{cat}": v for k, v in _pope_from_counts(pope_counts(rs)).items()})
    return out


# ------------------------------------------------------------------ multiple choice

_MC_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def _option_text(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def extract_choice(prediction: str, options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None when none or several fit.

    MMBench's rule-based step (``can_infer_option`` then ``can_infer_text``, before its GPT
    fallback), on the whitespace-split answer: exactly one bare letter ("B", "The answer is B";
    skipped when "A" appears in an answer of over 3 words, where it may be the article), else
    exactly one letter in one wrapper form ("B.", "(B)", "B)", ":B"...), else the one option whose
    text the answer contains. Added: an answer equal to an option's text (case, trailing period
    aside) picks it even when another option's text is a substring ("black cat" vs "cat").
    Letters are counted over A-E plus the option letters, as MMBench does; a letter not among
    ``options`` gives None. Upper-case letters only (MMBench is case-sensitive)."""
    letters = sorted(set("ABCDE") | set(options or ()))
    allowed = set(options) if options else set("ABCDE")
    words = [w.strip() for w in prediction.split()]

    def only(prefix: str = "", suffix: str = "") -> str | None:
        hits = [c for c in letters if prefix + c + suffix in words]
        return hits[0] if len(hits) == 1 else None

    bare = only()
    if bare is not None and not ("A" in words and len(words) > 3):
        return bare if bare in allowed else None
    for prefix, suffix in _MC_WRAPPERS:
        hit = only(prefix, suffix)
        if hit is not None:
            return hit if hit in allowed else None
    if not options:
        return None
    answer = _option_text(prediction)
    equal = [k for k, v in options.items() if _option_text(str(v)) == answer]
    if len(equal) == 1:
        return equal[0]
    contained = [k for k, v in options.items() if str(v).lower() in prediction.lower()]
    return contained[0] if len(contained) == 1 else None


def _gold_letter(ref: Record) -> str:
    gold = _answers(ref)[0].strip()
    options = ref.get("options") or {}
    if gold not in options:  # gold given as the option's text
        by_text = [k for k, v in options.items() if _option_text(str(v)) == _option_text(gold)]
        gold = by_text[0] if len(by_text) == 1 else gold
    return gold


def _mc_score(prediction: str, ref: Record) -> float:
    return float(extract_choice(prediction, ref.get("options")) == _gold_letter(ref))


def _mc_circular_aggregate(records: Sequence[Record]) -> dict[str, float]:
    """MMBench CircularEval: a question (``circular_id``) counts only if all its rotations (one
    record each, options shifted, ``answers`` the rotated letter) are right."""
    per_q = METRICS["multiple_choice_circular"].scores(records)
    plain = _mean_aggregate(_mc_score)(records)
    return {"circular_accuracy": sum(per_q) / len(per_q) if per_q else 0.0,
            "accuracy": plain["accuracy"], "n": float(len(per_q))}


# ------------------------------------------------------------------ MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's rule (lmms-eval, from Otter): lowercase, drop periods; "yes"/"no" as is; a single
    "y"/"n"; else "yes" or "no" within the first 4 characters; else "other" (always wrong)."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _mme_score(prediction: str, ref: Record) -> float:
    return float(mme_parse(prediction) == _yes_no_label(ref, "mme"))


def _mme_image(r: Record) -> Any:
    for key in ("image_id", "image", "question_id"):  # lmms-eval's question_id is the image path
        if r.get(key) is not None:
            return r[key]
    raise ValueError("mme: a record has none of `image_id`, `image`, `question_id`")


def _mme_aggregate(records: Sequence[Record]) -> dict[str, float]:
    """Per subtask: acc = fraction of questions right, acc+ = fraction of images with all (both)
    questions right, score = (acc + acc+) * 100; perception / cognition = sum of their subtasks'
    scores (max 2000 / 800)."""
    by_cat: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cat = str(r.get("category"))
        if cat not in MME_PERCEPTION + MME_COGNITION:
            raise ValueError(f"mme: category {cat!r} is not an MME subtask; expected one of "
                             f"{', '.join(MME_PERCEPTION + MME_COGNITION)}")
        by_cat[cat][_mme_image(r)].append(_mme_score(str(r["prediction"]), r))
    out: dict[str, float] = {}
    for cat, images in by_cat.items():
        questions = [s for ss in images.values() for s in ss]
        acc = sum(questions) / len(questions)
        acc_plus = sum(all(ss) for ss in images.values()) / len(images)
        out.update({f"acc/{cat}": acc, f"acc_plus/{cat}": acc_plus,
                    f"score/{cat}": (acc + acc_plus) * 100})
    out["perception"] = sum(out.get(f"score/{c}", 0.0) for c in MME_PERCEPTION)
    out["cognition"] = sum(out.get(f"score/{c}", 0.0) for c in MME_COGNITION)
    out["total"] = out["perception"] + out["cognition"]
    out["n"] = float(len(records))
    return out


# ------------------------------------------------------------------ registry

METRICS: dict[str, Metric] = {
    "vqa": Metric("vqa", "accuracy", _vqa_score, _mean_aggregate(_vqa_score), binary=False),
    "gqa": Metric("gqa", "accuracy", _gqa_score, _mean_aggregate(_gqa_score)),
    "exact_match": Metric("exact_match", "accuracy", _exact_match_score,
                          _mean_aggregate(_exact_match_score)),
    "pope": Metric("pope", "f1", _pope_score, _pope_aggregate, mean_headline=False),
    "multiple_choice": Metric("multiple_choice", "accuracy", _mc_score,
                              _mean_aggregate(_mc_score)),
    "multiple_choice_circular": Metric("multiple_choice_circular", "circular_accuracy",
                                       _mc_score, _mc_circular_aggregate,
                                       group_key="circular_id"),
    "mme": Metric("mme", "perception", _mme_score, _mme_aggregate, mean_headline=False),
}
