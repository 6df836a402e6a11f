"""Evaluation examples: the prompt up to the last answer, the expected short answer, its type."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from workloads.data.preprocess import SampleError, decode_image
from workloads.data.readers import iter_rows
from workloads.data.source import DataSource

__all__ = ["EvalExample", "iter_eval_examples"]


@dataclass
class EvalExample:
    key: str
    source: str
    image: Any  # PIL RGB image, or None for a text-only question
    # The conversation up to and excluding the last gpt turn ({"from", "value"} dicts): render
    # it with the chat template and add_generation_prompt=True to ask the question.
    prompt_conversation: list[dict[str, str]]
    answer: str
    question_type: str


def iter_eval_examples(source: DataSource) -> Iterator[EvalExample]:
    """Eval examples of ``source`` in file order, in this process (eval sets are small).

    ``answer`` is ``extra.answer`` when present, else the last gpt reply; ``question_type`` is
    ``extra.question_type`` or "unknown". Samples the readers flag or whose image does not
    decode are skipped (the reader row's ``bad`` kind says why).
    """
    for row in iter_rows(source):
        if row["bad"]:
            continue
        try:
            image = decode_image(row["image"]) if row["image"] is not None else None
        except SampleError:
            continue
        conv = json.loads(row["conversations"])
        last_gpt = max((i for i, t in enumerate(conv) if t["from"] == "gpt"), default=None)
        if last_gpt is None:
            continue
        extra = json.loads(row["extra"])
        yield EvalExample(key=row["key"], source=row["source"], image=image,
                          prompt_conversation=conv[:last_gpt],
                          answer=str(extra.get("answer", conv[last_gpt]["value"])),
                          question_type=str(extra.get("question_type", "unknown")))
