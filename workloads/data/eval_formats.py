"""The standard benchmarks' own eval files as reader rows: LLaVA's evaluation question files
(``DataSource.format: llava_eval``), benchmarks as Hugging Face datasets export them to Parquet,
and the answer files they ship.

- ``llava_eval``: LLaVA's ``llava/eval`` question files (``*.jsonl`` of ``{"question_id",
  "image", "text", "category"?}``, e.g. TextVQA, POPE, GQA, MME), with the answers inline
  (``answer`` / ``answers`` / ``label``) or in ``DataSource.answers``;
- ``parquet`` without a conversations column but with ``question`` (or ``text``): image
  ``{"bytes", "path"}`` struct or bytes, ``answer`` / ``answers``, ``options`` / ``choices`` or
  MMBench's ``A``/``B``/``C``/``D`` columns, ``hint``, ``question_id``/``index``, ``category``.

``question_record`` turns one such record into a row's parts (the readers call it), so the Ray
datasource, ``mmkd validate`` and ``eval_examples`` all see ordinary rows: the prompt as the
human turn, the reference answer as the gpt turn, question id, answers and options in
``extra``. A multiple-choice prompt lists its options the way LLaVA's MMBench eval does.

Answers files (``DataSource.answers``), keyed by ``question_id``: JSONL or a JSON list of
records, VQA's ``{"annotations": [...]}``, TextVQA's ``{"data": [...]}``, or a JSON object
``{question_id: record or answer}`` (GQA). A record's reference is ``answers`` (VQA's ten
annotators, strings or ``{"answer": ...}`` dicts), ``answer``, ``multiple_choice_answer`` or
``label`` (POPE); its other fields (``answer_type``, ``question_type``, ...) join the meta.

Imports no reader or model code (the readers import this module).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from workloads.data.quality import MALFORMED_JSON, WRONG_FIELD_TYPE
from workloads.data.source import filesystem

__all__ = ["MC_INSTRUCTION", "QUESTION_FIELDS", "EvalRecordError", "Answers", "question_record",
           "question_id_of", "options_of", "answer_texts", "is_missing", "load_answers"]

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
QUESTION_FIELDS = ("text", "question")           # LLaVA eval files / HF exports
ID_FIELDS = ("question_id", "id", "index")       # ... MMBench's parquet has only `index`
REFERENCE_FIELDS = ("answers", "answer", "multiple_choice_answer", "label")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EvalRecordError(ValueError):
    """A question record that cannot be used; ``kind`` is its bad-sample kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def is_missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


MAX_OPTIONS_CHARS = 64 * 1024  # a question's options are a few hundred characters


def _options_string(name: str, text: str) -> Any:
    """A list of options written as a string (MMMU: ``"['a', 'b']"``), parsed as a JSON or
    Python literal of strings only, after a length check: ``ast.literal_eval`` on unbounded
    text took ~950 MB for 2 MB and overflowed the stack on deep nesting."""
    def wrong(why: str) -> EvalRecordError:
        return EvalRecordError(WRONG_FIELD_TYPE, f"`{name}` is a string that is not a list of "
                                                 f"options ({why}): {text[:80]!r}")

    if len(text) > MAX_OPTIONS_CHARS:
        raise wrong(f"{len(text):,} characters, over {MAX_OPTIONS_CHARS:,}")
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        raise wrong("not a [...] list")
    inner = stripped[1:-1]
    if _nested(inner):
        raise wrong("nested")
    try:
        import json

        value = json.loads(stripped)
    except ValueError:
        try:
            value = ast.literal_eval(stripped)  # single quotes; bounded and flat by now
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise wrong("not a literal list") from None
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise wrong("items must be strings")
    return value


def _nested(inner: str) -> bool:
    """A bracket outside quotes: a nested list or dict (options are flat)."""
    quote = None
    for ch in inner:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            return True
    return False


def options_of(entry: dict[str, Any]) -> tuple[dict[str, str] | None, list[str]]:
    """(letter -> text, fields consumed) from ``options``/``choices`` (a list, a dict, or a
    list written as a string, as MMMU does) or from ``A``, ``B``, ... columns (MMBench)."""
    for name in ("options", "choices"):
        value = entry.get(name)
        if is_missing(value):
            continue
        if isinstance(value, str):
            value = _options_string(name, value)
        if isinstance(value, dict):
            return {str(k).strip().upper(): str(v) for k, v in value.items()}, [name]
        if isinstance(value, (list, tuple)):
            if len(value) > len(_LETTERS):
                raise EvalRecordError(WRONG_FIELD_TYPE, f"`{name}` has {len(value)} options")
            return {_LETTERS[i]: str(v) for i, v in enumerate(value)}, [name]
        raise EvalRecordError(WRONG_FIELD_TYPE,
                              f"`{name}` is a {type(value).__name__}, not a list of options")
    letters = []
    for letter in _LETTERS:
        if is_missing(entry.get(letter)):
            break
        letters.append(letter)
    if len(letters) >= 2:  # the empty columns after the last option go too
        return {k: str(entry[k]) for k in letters}, [k for k in _LETTERS if k in entry]
    return None, []


def answer_texts(value: Any, field_name: str) -> list[str]:
    if isinstance(value, (str, int, float, bool)):
        return [str(value)]
    if not isinstance(value, (list, tuple)):
        raise EvalRecordError(WRONG_FIELD_TYPE,
                              f"`{field_name}` is a {type(value).__name__}, not a list")
    out = []
    for a in value:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise EvalRecordError(WRONG_FIELD_TYPE, f"`{field_name}` holds a "
                                                    f"{type(a).__name__}, not answer text")
        out.append(str(a))
    return out


def _reference(rec: dict[str, Any], options: dict[str, str] | None) -> tuple[str, list[str]]:
    """(answer, answers) of a record holding at least one of ``REFERENCE_FIELDS``."""
    answers = [] if is_missing(rec.get("answers")) else answer_texts(rec["answers"], "answers")
    answer = None
    for name in ("answer", "multiple_choice_answer", "label"):
        value = rec.get(name)
        if is_missing(value):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and options \
                and 0 <= value < len(options):  # ScienceQA: the index of the right choice
            value = list(options)[value]
        texts = answer_texts(value, name)
        if len(texts) != 1:
            raise EvalRecordError(WRONG_FIELD_TYPE, f"`{name}` holds {len(texts)} answers; "
                                                    f"put several in `answers`")
        answer = texts[0]
        break
    if answer is None:
        if not answers:
            raise EvalRecordError(MALFORMED_JSON, "empty `answers`")
        answer = Counter(answers).most_common(1)[0][0]  # ties: the first given
    return answer, answers or [answer]


def question_id_of(entry: dict[str, Any], fallback: str) -> str:
    for name in ID_FIELDS:
        value = entry.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            return str(value)
    return fallback


def question_record(entry: dict[str, Any], answers: "Answers | None",
                    fallback_id: str) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """``(question_id, conversation, extra)`` of one benchmark question record (JSON object
    or parquet row without the image): the human turn is the prompt (hint, question, options
    and the answer-with-a-letter instruction for multiple choice), the gpt turn the reference
    answer. Raises ``EvalRecordError`` when the record has no question or no answer."""
    qid = question_id_of(entry, fallback_id)
    name = next((n for n in QUESTION_FIELDS if n in entry), None)
    if name is None:
        raise EvalRecordError(MALFORMED_JSON, f"question {qid}: no `text` or `question` field")
    question = entry[name]
    if not isinstance(question, str) or not question.strip():
        raise EvalRecordError(WRONG_FIELD_TYPE, f"question {qid}: `{name}` is not a non-empty "
                                                f"string")
    options, consumed = options_of(entry)
    ref_rec = entry
    if not any(not is_missing(entry.get(n)) for n in REFERENCE_FIELDS):
        ref_rec = answers.get(qid) if answers is not None else None
        if ref_rec is None:
            where = (f"and the answers file {answers.path} has none for it" if answers is not
                     None else "and the source has no answers file (DataSource.answers)")
            raise EvalRecordError(MALFORMED_JSON, f"question_id {qid} has no `answer`, "
                                                  f"`answers` or `label` {where}")
    try:
        answer, all_answers = _reference(ref_rec, options)
    except EvalRecordError as e:
        where = f" in {answers.path}" if ref_rec is not entry and answers else ""
        raise EvalRecordError(e.kind, f"question_id {qid}{where}: {e}") from None
    hint = entry.get("hint")
    prompt = question if is_missing(hint) else f"{hint}\n{question}"
    if options:
        prompt = "\n".join([prompt, *(f"{k}. {v}" for k, v in options.items()), MC_INSTRUCTION])
    extra = {k: v for k, v in entry.items()
             if k not in consumed and not isinstance(v, (bytes, bytearray))}
    if ref_rec is not entry:  # the answers file's own fields (answer_type, ...) too
        extra.update({k: v for k, v in ref_rec.items() if k not in extra})
    extra.update(question_id=qid, answer=answer, answers=all_answers)
    if options:
        extra["options"] = options
    conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return qid, conv, extra


# ---- answers files ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Answers:
    path: str
    by_id: dict[str, dict[str, Any]]

    def get(self, qid: str) -> dict[str, Any] | None:
        return self.by_id.get(qid)


MAX_ANSWERS_JSON_BYTES = int(os.environ.get("MMKD_MAX_ANSWERS_JSON_BYTES", 1 << 30))
MAX_ANSWERS_LINE_BYTES = 16 << 20  # one JSONL record


def _lines(stream) -> Iterator[bytes]:
    """Lines of a binary stream, read in 1 MB blocks (no ``readline`` on pyarrow streams)."""
    rest = b""
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        yield from parts
        if len(rest) > MAX_ANSWERS_LINE_BYTES:
            yield rest  # the caller rejects it by its length
            return
    if rest:
        yield rest


def load_answers(path: str) -> Answers:
    """The answers file ``path`` (see the module docstring), cached per file version. Raises
    ``ValueError`` naming the file (and record) when it is not one."""
    fs, local = filesystem(path)
    info = fs.get_file_info(local)
    if info.size is None:
        raise FileNotFoundError(f"answers file {path!r} does not exist; fix DataSource.answers")
    return _load_answers(path, info.size, info.mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_answers(path: str, size: int, mtime_ns: int | None) -> Answers:
    fs, local = filesystem(path)
    hint = ("DataSource.answers must be JSONL or JSON records with `question_id` and "
            "`answer`/`answers`/`label`, or a JSON object keyed by question_id")
    jsonl = path.endswith(".jsonl")
    if not jsonl and size > MAX_ANSWERS_JSON_BYTES:  # a JSON document is parsed whole
        raise ValueError(f"answers file {path}: {size:,} bytes of JSON, over the "
                         f"{MAX_ANSWERS_JSON_BYTES:,} parsed in one piece (set "
                         f"MMKD_MAX_ANSWERS_JSON_BYTES to raise it, or write it as JSONL, which is "
                         f"read line by line)")
    where = ""
    try:
        if jsonl:  # streamed: one line in memory at a time, besides the records kept
            records = []
            with fs.open_input_stream(local) as f:
                for n, raw in enumerate(_lines(f)):
                    where = f", line {n + 1}"
                    if len(raw) > MAX_ANSWERS_LINE_BYTES:
                        raise ValueError(f"a line of {len(raw):,} bytes, over "
                                         f"{MAX_ANSWERS_LINE_BYTES:,}")
                    line = raw.decode("utf-8-sig" if n == 0 else "utf-8")
                    if line.strip():
                        records.append(json.loads(line))
        else:
            with fs.open_input_stream(local) as f:
                records = json.loads(f.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"answers file {path}{where}: not valid {'JSONL' if jsonl else 'JSON'} "
                         f"({type(e).__name__}: {e}). {hint}") from None
    if isinstance(records, dict):
        wrapped = next((records[k] for k in ("annotations", "data")
                        if isinstance(records.get(k), list)), None)
        if wrapped is not None:
            records = wrapped
        else:  # {question_id: record, answer or list of answers}
            records = [{**(v if isinstance(v, dict) else
                           {"answers" if isinstance(v, list) else "answer": v}),
                        "question_id": k} for k, v in records.items()]
    if not isinstance(records, list):
        raise ValueError(f"answers file {path}: a JSON {type(records).__name__}. {hint}")
    by_id: dict[str, dict[str, Any]] = {}
    for n, rec in enumerate(records):
        qid = question_id_of(rec, "") if isinstance(rec, dict) else ""
        if not qid:
            raise ValueError(f"answers file {path}, record {n + 1}: no `question_id` field. "
                             f"{hint}")
        if qid in by_id and by_id[qid] != rec:
            raise ValueError(f"answers file {path}: question_id {qid} appears twice with "
                             f"different records (records are matched by question_id alone)")
        by_id[qid] = rec
    return Answers(path, by_id)
