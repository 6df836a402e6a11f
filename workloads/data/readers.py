"""Readers: every format becomes the same normalized rows, lazily and file by file.

Row schema (one sample each):
    key            str    sample id, unique within its file
    source         str    file the sample came from (shard, JSON or parquet file)
    image          bytes  raw encoded image, or None (text-only sample / missing image)
    conversations  str    JSON list of {"from": "human"|"gpt"|"system", "value": str}
    extra          str    JSON dict of every other metadata field (answer, question_type, ...)
    bad            str    "" when fine, else a bad-sample kind (see ``quality.py``)

Readers never raise for a bad sample: they flag it in ``bad`` so preprocessing can count it
(a counted skip, not a dead dataset). One parser per format works on an open file, shared by
the Ray ``Datasource`` (parallel, streaming) and the plain iterator used by eval/tokenizer code.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from workloads.data.quality import MALFORMED_JSON, MISSING_IMAGE
from workloads.data.source import FORMAT_EXTENSIONS, DataSource, _filesystem, resolve_files

__all__ = ["ROW_SCHEMA", "iter_file_rows", "iter_rows", "read_source", "CAPTION_PROMPT"]

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("image", pa.binary()),
    ("conversations", pa.string()), ("extra", pa.string()), ("bad", pa.string()),
])
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# A bare caption (`{key}.txt`) becomes this one-turn conversation, as in LLaVA pre-training.
CAPTION_PROMPT = "<image>\nDescribe the image."
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
          "system": "system"}
_BLOCK_ROWS = 128


def _row(key: str, source: str, image: bytes | None, conversations: list | None,
         extra: dict | None, bad: str = "") -> dict[str, Any]:
    return {"key": key, "source": source, "image": image,
            "conversations": json.dumps(conversations or []),
            "extra": json.dumps(extra or {}, sort_keys=True), "bad": bad}


def _normalize_conversations(conv: Any) -> list[dict[str, str]] | None:
    """LLaVA's conversation list with roles normalized, or None when it is not one."""
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            return None
    if not isinstance(conv, list) or not conv:
        return None
    out = []
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            return None
        out.append({"from": role, "value": turn["value"]})
    return out


def _from_metadata(key: str, source: str, image: bytes | None, meta: Any,
                   caption: str | None) -> dict[str, Any]:
    """A row from a parsed metadata dict (webdataset .json) and/or a caption (.txt)."""
    if meta is None and caption is not None:
        conv = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption}]
        return _row(key, source, image, conv, {})
    if not isinstance(meta, dict):
        return _row(key, source, image, None, None, MALFORMED_JSON)
    extra = {k: v for k, v in meta.items() if k not in ("conversations", "caption")}
    if "conversations" in meta:
        conv = _normalize_conversations(meta["conversations"])
    elif isinstance(meta.get("caption", caption), str):
        conv = [{"from": "human", "value": CAPTION_PROMPT},
                {"from": "gpt", "value": meta.get("caption", caption)}]
    else:
        conv = None
    return _row(key, source, image, conv, extra, "" if conv else MALFORMED_JSON)


# ---- webdataset ---------------------------------------------------------------------------

def _split_member(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the path up to the first dot of the basename.
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _webdataset_sample(key: str, source: str, files: dict[str, bytes]) -> dict[str, Any]:
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _row(key, source, image, None, None, MALFORMED_JSON)
    elif caption is None:
        return _row(key, source, image, None, None, MALFORMED_JSON)
    return _from_metadata(key, source, image, meta, caption)


def _read_webdataset(f: Any, path: str, source: DataSource) -> Iterator[dict[str, Any]]:
    name = posixpath.basename(path)
    # "r|*": a forward-only stream, so a shard is never loaded whole.
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if k != key and key is not None:
                yield _webdataset_sample(key, name, files)
                files = {}
            key = k
            files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield _webdataset_sample(key, name, files)


# ---- LLaVA JSON / JSONL -------------------------------------------------------------------

def _read_llava_json(f: Any, path: str, source: DataSource) -> Iterator[dict[str, Any]]:
    name = posixpath.basename(path)
    text = f.read().decode("utf-8")
    if path.endswith(".jsonl"):
        entries: list[Any] = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                entries.append(("__bad__", f"line{i + 1}"))
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); LLaVA data is one JSON list of "
                             f"samples (use .jsonl for one sample per line)") from None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of samples, got "
                             f"{type(entries).__name__}")
    image_root = source.image_root if source.image_root is not None else posixpath.dirname(path)
    fs, root = _filesystem(image_root)
    for i, entry in enumerate(entries):
        if isinstance(entry, tuple):
            yield _row(entry[1], name, None, None, None, MALFORMED_JSON)
            continue
        key = str(entry.get("id", i)) if isinstance(entry, dict) else str(i)
        if not isinstance(entry, dict):
            yield _row(key, name, None, None, None, MALFORMED_JSON)
            continue
        image, bad = None, ""
        if entry.get("image"):
            try:
                with fs.open_input_stream(posixpath.join(root, entry["image"])) as img:
                    image = img.read()
            except (FileNotFoundError, OSError):
                bad = MISSING_IMAGE
        meta = {k: v for k, v in entry.items() if k != "id"}
        row = _from_metadata(key, name, image, meta, None)
        if bad and not row["bad"]:
            row["bad"] = bad
        yield row


# ---- parquet ------------------------------------------------------------------------------

def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return bytes(value) if value else None


def _read_parquet(f: Any, path: str, source: DataSource) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    name = posixpath.basename(path)
    pf = pq.ParquetFile(f)
    missing = {source.conversations_column} - set(pf.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: no column {sorted(missing)[0]!r}; it has "
                         f"{pf.schema_arrow.names}. Set DataSource.conversations_column")
    index = 0
    for batch in pf.iter_batches(batch_size=_BLOCK_ROWS):
        for rec in batch.to_pylist():
            key = str(rec.get("id", rec.get("key", index)))
            image = _image_bytes(rec.get(source.image_column))
            conv = _normalize_conversations(rec.get(source.conversations_column))
            extra = {k: v for k, v in rec.items()
                     if k not in (source.image_column, source.conversations_column, "id", "key")
                     and not isinstance(v, (bytes, bytearray))}
            yield _row(key, name, image, conv, extra, "" if conv else MALFORMED_JSON)
            index += 1


_PARSERS = {"webdataset": _read_webdataset, "llava_json": _read_llava_json,
            "parquet": _read_parquet}


def iter_file_rows(source: DataSource, path: str) -> Iterator[dict[str, Any]]:
    """Normalized rows of one data file, read in this process."""
    fs, local = _filesystem(path)
    opener = fs.open_input_file if source.format == "parquet" else fs.open_input_stream
    with opener(local) as f:
        yield from _PARSERS[source.format](f, path, source)


def iter_rows(source: DataSource) -> Iterator[dict[str, Any]]:
    """Normalized rows of the whole source in file order, no Ray (eval sets, tokenizer corpus,
    the benchmark's single-process baseline). Honors ``max_samples``."""
    n = 0
    for path in resolve_files(source):
        for row in iter_file_rows(source, path):
            if source.max_samples is not None and n >= source.max_samples:
                return
            yield row
            n += 1


def read_source(source: DataSource, seed: int | None = None) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Ray dataset of normalized rows, one read task per file.

    ``seed`` shuffles the file order deterministically and differently on every execution
    (every epoch), through Ray's ``FileShuffleConfig(seed, reseed_after_execution=True)``;
    ``None`` keeps the sorted file order.
    """
    import ray.data

    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else None
    ds = ray.data.read_datasource(_SampleDatasource(source, resolve_files(source),
                                                    shuffle=shuffle))
    return ds.limit(source.max_samples) if source.max_samples is not None else ds


def _datasource_base():
    from ray.data.datasource import FileBasedDatasource

    return FileBasedDatasource


class _SampleDatasource(_datasource_base()):
    """Ray file datasource around the parsers above: streams each file into row blocks."""

    def __init__(self, source: DataSource, files: list[str], shuffle: Any = None):
        exts = [e.lstrip(".") for e in FORMAT_EXTENSIONS[source.format]]
        super().__init__(files, shuffle=shuffle, file_extensions=exts)
        self._source = source

    def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any):
        if self._source.format == "parquet":  # parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        for row in _PARSERS[self._source.format](f, path, self._source):
            rows.append(row)
            if len(rows) >= _BLOCK_ROWS:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

