"""The normalized row every reader produces (``readers.py``), and the helpers that build one: a
good row, a bad row flagged with its kind and what was wrong, a row from a webdataset sample's
metadata and/or caption.

Row schema (one sample each):
    key            str    sample id, unique within its file
    source         str    file the sample came from (shard, JSON or parquet file)
    image          bytes  raw encoded image, or None (text-only sample / missing image)
    conversations  str    JSON list of {"from": "human"|"gpt"|"system", "value": str}
    extra          str    JSON dict of every other metadata field (answer, question_type, ...)
    bad            str    "" when fine, else a bad-sample kind (see ``quality.py``)
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from workloads.data.quality import MALFORMED_JSON, WRONG_FIELD_TYPE

__all__ = ["ROW_SCHEMA", "CAPTION_PROMPT", "make_row", "bad_row", "bad_detail",
           "normalize_conversations", "row_from_metadata"]

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("image", pa.binary()),
    ("conversations", pa.string()), ("extra", pa.string()), ("bad", pa.string()),
])
# A bare caption (`{key}.txt`) becomes this one-turn conversation, as in LLaVA pre-training.
CAPTION_PROMPT = "<image>\nDescribe the image."
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
          "system": "system"}
_DETAIL = "bad_detail"  # key in a bad row's `extra`: what exactly was wrong


def make_row(key: str, source: str, image: bytes | None, conversations: list | None,
         extra: dict | None, bad: str = "") -> dict[str, Any]:
    return {"key": key, "source": source, "image": image,
            "conversations": json.dumps(conversations or []),
            "extra": json.dumps(extra or {}, sort_keys=True), "bad": bad}


def bad_row(key: str, source: str, kind: str, detail: str, **extra: Any) -> dict[str, Any]:
    return make_row(key, source, None, None, {_DETAIL: detail, **extra}, kind)


def bad_detail(extra: str) -> str:
    """What a reader said about a bad row ("" when it said nothing)."""
    try:
        value = json.loads(extra).get(_DETAIL, "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


def normalize_conversations(conv: Any) -> tuple[list[dict[str, str]] | None, str]:
    """LLaVA's conversation list with roles normalized, or (None, bad kind) when it is not one."""
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except (ValueError, RecursionError):
            return None, MALFORMED_JSON
    if conv is None or (isinstance(conv, list) and not conv):
        return None, MALFORMED_JSON
    if not isinstance(conv, list):
        return None, WRONG_FIELD_TYPE
    out = []
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, WRONG_FIELD_TYPE
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            return None, MALFORMED_JSON
        out.append({"from": role, "value": turn["value"]})
    return out, ""


def row_from_metadata(key: str, source: str, image: bytes | None, meta: Any,
                   caption: str | None) -> dict[str, Any]:
    """A row from a parsed metadata dict (webdataset .json) and/or a caption (.txt)."""
    if meta is None and caption is not None:
        conv = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}]
        return make_row(key, source, image, conv, {})
    if not isinstance(meta, dict):
        return bad_row(key, source, MALFORMED_JSON, "the metadata is not a JSON object")
    extra = {k: v for k, v in meta.items() if k not in ("conversations", "caption")}
    kind = ""
    if "conversations" in meta:
        conv, kind = normalize_conversations(meta["conversations"])
    elif isinstance(meta.get("caption", caption), str):
        conv = [{"from": "human", "value": CAPTION_PROMPT},
                {"from": "gpt", "value": meta.get("caption", caption)}]
    else:
        conv, kind = None, MALFORMED_JSON
    if conv is None:
        what = "of the wrong type" if kind == WRONG_FIELD_TYPE else "missing or unusable"
        return bad_row(key, source, kind, f"`conversations` {what}")
    try:
        return make_row(key, source, image, conv, extra)
    except (RecursionError, TypeError, ValueError):  # e.g. a metadata value nested too deeply
        return bad_row(key, source, MALFORMED_JSON, "metadata nested too deeply to re-encode")
