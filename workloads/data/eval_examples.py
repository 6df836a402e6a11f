"""Evaluation examples: the prompt up to the last answer, the reference answer(s), options,
question id and meta, from every format the readers know.

``webdataset`` / ``llava_json`` / ``parquet`` conversations: the prompt is the conversation up
to the last gpt reply, the reference is that reply (or ``extra.answer``). The benchmarks' own
files (``llava_eval`` question files with their answer files, benchmark parquet) come out of the
readers as the same rows, with ``question_id``, ``answers`` and ``options`` in ``extra``
(``eval_formats.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from workloads.data.eval_formats import EvalRecordError, answer_texts, is_missing, options_of
from workloads.data.quality import MALFORMED_JSON, SampleQuality
from workloads.data.source import DataSource

__all__ = ["EvalExample", "iter_eval_examples"]

# Fields an EvalExample carries as its own attributes, not in ``meta``.
_OWN = ("answer", "answers", "options", "question_id", "question_type", "bad_detail")


@dataclass
class EvalExample:
    key: str            # unique within the eval set (a repeated question id gets "#2", "#3")
    source: str
    image: Any  # PIL RGB image, or None for a text-only question
    # The conversation up to and excluding the last gpt turn ({"from", "value"} dicts): render
    # it with the chat template and add_generation_prompt=True to ask the question.
    prompt_conversation: list[dict[str, str]]
    answer: str         # the reference answer (VQA: the most common of ``answers``)
    question_type: str  # ``question_type`` or ``category`` of the record, else "unknown"
    question_id: str = ""
    answers: list[str] = field(default_factory=list)   # all references (VQA: 10), or [answer]
    options: dict[str, str] | None = None              # letter -> text, multiple choice only
    meta: dict[str, Any] = field(default_factory=dict)  # category, image, label, hint, ...


def iter_eval_examples(source: DataSource,
                       quality: SampleQuality | None = None) -> Iterator[EvalExample]:
    """Eval examples of ``source`` in file order, in this process (eval sets are small).

    ``answer`` is ``extra.answer`` when present, else the last gpt reply. Samples the readers
    flag, whose image does not decode or that have no gpt reply are skipped; ``quality``
    (when given) counts every sample and the skipped ones by kind, the way preprocessing
    does, and raises ``DataQualityError`` past its budget. When every sample is skipped this
    raises ``ValueError`` naming the most common reason and one example.
    """
    from workloads.data.preprocess import SampleError, decode_image
    from workloads.data.readers import bad_detail, iter_rows

    seen, yielded, keys = 0, 0, Counter()
    skipped: Counter[str] = Counter()
    first: dict[str, str] = {}
    for row in iter_rows(source):
        seen += 1
        kind, detail = row["bad"], bad_detail(row["extra"]) if row["bad"] else ""
        image, example = None, None
        if not kind:
            try:
                image = decode_image(row["image"]) if row["image"] is not None else None
                example = _example(row, image)
            except SampleError as e:
                kind, detail = e.kind, str(e)
        if example is None:
            kind = kind or MALFORMED_JSON
            where = f"{row['source']}:{row['key']} ({detail or kind})"
            skipped[kind] += 1
            first.setdefault(kind, where)
            if quality is not None:
                quality.record(1, {kind: 1}, [(kind, where)])
            continue
        if quality is not None:
            quality.record(1, {}, [])
        keys[example.key] += 1
        if keys[example.key] > 1:  # e.g. MME: two questions per image, one question_id
            example.key = f"{example.key}#{keys[example.key]}"
        yielded += 1
        yield example
    if seen and not yielded:
        top, n = skipped.most_common(1)[0]
        raise ValueError(f"{source.describe()}: all {seen} samples were skipped, {n} of them "
                         f"{top!r}, e.g. {first[top]}. Fix the data or the DataSource "
                         f"(format, answers, image_root)")


def _example(row: dict[str, Any], image: Any) -> EvalExample:
    from workloads.data.preprocess import SampleError

    conv = json.loads(row["conversations"])
    last_gpt = max((i for i, t in enumerate(conv) if t["from"] == "gpt"), default=None)
    if last_gpt is None:
        raise SampleError(MALFORMED_JSON, "no gpt reply to take the answer from")
    extra = json.loads(row["extra"])
    answer = str(extra.get("answer", conv[last_gpt]["value"]))
    try:
        answers = answer_texts(extra["answers"], "answers") if extra.get("answers") else []
    except EvalRecordError:
        answers = []
    try:
        options = options_of(extra)[0]
    except EvalRecordError:
        options = None
    qtype = extra.get("question_type", extra.get("category"))
    return EvalExample(
        key=row["key"], source=row["source"], image=image, prompt_conversation=conv[:last_gpt],
        answer=answer, question_type=str(qtype) if not is_missing(qtype) else "unknown",
        question_id=str(extra.get("question_id", row["key"])), answers=answers or [answer],
        options=options, meta={k: v for k, v in extra.items() if k not in _OWN})
