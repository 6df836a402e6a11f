"""Readers: every format becomes the same normalized rows, lazily and file by file.

The row schema is ``rows.py``'s (``ROW_SCHEMA``).

Readers never raise for a bad input: they flag it in ``bad`` (and say what was wrong in
``extra["bad_detail"]``) so preprocessing can count it — a counted skip, not a dead dataset.
That covers a shard cut short (``truncated_shard``: the samples before the cut still come out),
a record that is not UTF-8, JSON that is malformed or nested too deeply, fields of the wrong
type, ``image`` paths that would leave ``image_root`` (refused, never opened) and images over
``MAX_IMAGE_BYTES`` (never read). Files are streams: a tar shard member by member, LLaVA
JSON/JSONL record by record (``json_records.py``), so memory does not grow with the file.

Benchmark question files (``llava_eval``; parquet with a ``question`` but no conversations
column) become the same rows: the prompt as the human turn, the reference answer as the gpt
turn, question id, answers and options in ``extra`` (``eval_formats.question_record``).

One parser per format works on an open file, shared by the Ray datasource (``datasource.py``:
parallel, streaming, several tasks for one large LLaVA file) and the plain iterator used by
eval/tokenizer code.
"""

from __future__ import annotations

import functools
import json
import posixpath
import random
import tarfile
import zlib
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from workloads.data import json_records
from workloads.data.eval_formats import (QUESTION_FIELDS, Answers, EvalRecordError,
                                         load_answers, question_id_of, question_record)
from workloads.data.json_records import ByteRange, Record
from workloads.data.rows import (CAPTION_PROMPT, ROW_SCHEMA, bad_detail, bad_row, make_row,
                                 normalize_conversations, row_from_metadata)
from workloads.data.quality import (MALFORMED_JSON, MAX_IMAGE_BYTES, MAX_MEMBER_BYTES,
                                    MISSING_IMAGE, NON_UTF8,
                                    OVERSIZE_IMAGE, TRUNCATED_SHARD, UNSAFE_PATH,
                                    WRONG_FIELD_TYPE)
from workloads.data.source import DataSource, filesystem, resolve_files

__all__ = ["ROW_SCHEMA", "iter_file_rows", "iter_rows", "sample_file_rows",
           "CAPTION_PROMPT", "SPLIT_BYTES", "bad_detail"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
BLOCK_ROWS = 128
# LLaVA JSON/JSONL files larger than this are read by several tasks, one byte range each.
SPLIT_BYTES = 64 << 20


# ---- webdataset ---------------------------------------------------------------------------

def _split_member(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the path up to the first dot of the basename.
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _webdataset_sample(key: str, source: str, files: dict[str, bytes],
                       oversize: str = "") -> dict[str, Any]:
    if oversize:
        return bad_row(key, source, OVERSIZE_IMAGE, oversize)
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    try:
        caption = files["txt"].decode("utf-8").strip() if "txt" in files else None
        text = files["json"].decode("utf-8-sig") if "json" in files else None
    except UnicodeDecodeError as e:
        return bad_row(key, source, NON_UTF8, f"not UTF-8 ({e})")
    meta = None
    if text is not None:
        try:
            meta = json.loads(text)
        except RecursionError:
            return bad_row(key, source, MALFORMED_JSON, "JSON nested too deeply")
        except ValueError as e:
            return bad_row(key, source, MALFORMED_JSON, f"not valid JSON ({e})")
    elif caption is None:
        return bad_row(key, source, MALFORMED_JSON, "no .json or .txt member")
    return row_from_metadata(key, source, image, meta, caption)


def _tar_ended_cleanly(tar: tarfile.TarFile) -> bool:
    # The stream stops at the first header it cannot read. A real end reads a whole zero
    # block there; a shard cut off at (or inside) a header reads less, and tarfile says nothing.
    try:
        return tar.fileobj.tell() - tar.offset >= tarfile.BLOCKSIZE
    except (AttributeError, OSError):
        return True


def _read_webdataset(f: Any, path: str, source: DataSource) -> Iterator[dict[str, Any]]:
    name = posixpath.basename(path)
    # A truncated shard (a copy cut short) fails mid-stream: the samples before it still come
    # out, the one in progress and everything after is one counted `truncated_shard` row.
    tar_errors = (tarfile.TarError, EOFError, zlib.error)
    try:
        # "r|*": a forward-only stream, so a shard is never loaded whole.
        tar = tarfile.open(fileobj=f, mode="r|*")
    except tar_errors as e:
        yield bad_row("", name, TRUNCATED_SHARD, f"not a readable tar archive ({e})")
        return
    key, files, oversize, member_name, in_member = None, {}, "", None, False
    with tar:
        try:
            for member in tar:
                tar.members = []  # a stream keeps every header otherwise
                if not member.isfile():
                    continue
                member_name = member.name
                k, ext = _split_member(member.name)
                if k != key and key is not None:
                    yield _webdataset_sample(key, name, files, oversize)
                    files, oversize = {}, ""
                key = k
                limit, limit_name = ((MAX_IMAGE_BYTES, "MAX_IMAGE_BYTES")
                                     if ext in IMAGE_EXTENSIONS
                                     else (MAX_MEMBER_BYTES, "MMKD_MAX_TAR_MEMBER_BYTES"))
                if member.size > limit:  # never read whole: a 20 GB member would kill the task
                    oversize = (f"{member.name}: {member.size} bytes, over {limit_name}="
                                f"{limit} (not read)")
                    continue
                in_member = True
                files[ext] = tar.extractfile(member).read()
                in_member = False
            if not _tar_ended_cleanly(tar):
                raise tarfile.ReadError("the archive ends inside a header")
        except tar_errors as e:
            if in_member:  # cut inside this sample's data: the sample is lost with the rest
                where, lost, row_key = f"inside member {member_name}", f"sample {key!r} and ", key
            else:  # cut at a header: every member read so far is whole
                if key is not None:
                    yield _webdataset_sample(key, name, files, oversize)
                where = f"after member {member_name}" if member_name else "at its start"
                lost, row_key = "", ""
            yield bad_row(row_key or "", name, TRUNCATED_SHARD,
                       f"shard {name} is truncated {where} ({e}); {lost}the rest of the shard "
                       f"is lost")
            return
        if key is not None:
            yield _webdataset_sample(key, name, files, oversize)


# ---- LLaVA JSON / JSONL -------------------------------------------------------------------

def _safe_image_path(root: str, rel: str) -> str | None:
    """``root/rel``, or None when ``rel`` could leave ``root`` (absolute, URI, ``..``)."""
    if "\0" in rel or rel.startswith(("/", "\\")) or "://" in rel:
        return None
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        return None
    return posixpath.join(root, norm)


def _read_image(fs: pafs.FileSystem, path: str) -> tuple[bytes | None, str, str]:
    """(bytes, bad kind, detail): at most MAX_IMAGE_BYTES + 1 bytes are ever read."""
    try:
        with fs.open_input_stream(path) as img:
            data = img.read(MAX_IMAGE_BYTES + 1)
    except (FileNotFoundError, OSError) as e:
        return None, MISSING_IMAGE, f"cannot open {path} ({type(e).__name__})"
    if len(data) > MAX_IMAGE_BYTES:
        return None, OVERSIZE_IMAGE, f"{path}: over MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}"
    return data, "", ""


def _image_root(source: DataSource, path: str) -> str:
    return source.image_root if source.image_root is not None else posixpath.dirname(path)


def _question_row(key: str, name: str, image: bytes | None, entry: dict,
                  answers: Answers | None) -> dict[str, Any]:
    """A row of a benchmark question record (``llava_eval``, question parquet); see
    ``eval_formats.question_record``."""
    try:
        qid, conv, extra = question_record(entry, answers, key)
    except EvalRecordError as e:
        return bad_row(key, name, e.kind, str(e))
    try:
        return make_row(qid, name, image, conv, extra)
    except (RecursionError, TypeError, ValueError):
        return bad_row(qid, name, MALFORMED_JSON, "metadata nested too deeply to re-encode")


def _eval_answers(source: DataSource) -> Answers | None:
    return load_answers(source.answers) if source.answers else None


def _llava_row(rec: Record, name: str, jsonl: bool, fs: pafs.FileSystem, root: str,
               key: str | None = None, questions: bool = False,
               answers: Answers | None = None) -> dict[str, Any]:
    """One normalized row of a LLaVA record (``questions``: of an eval question file, with
    ``answers`` from ``DataSource.answers``); never raises for bad data."""
    if key is None:
        key = f"line{rec.index + 1}" if jsonl else str(rec.index)
    if rec.non_utf8:
        return bad_row(key, name, NON_UTF8, "invalid UTF-8 bytes in the record")
    if rec.error:
        return bad_row(key, name, MALFORMED_JSON, rec.error)
    try:
        entry = json.loads(rec.text[1:] if rec.text.startswith("\ufeff") else rec.text)
    except RecursionError:
        return bad_row(key, name, MALFORMED_JSON, "JSON nested too deeply")
    except ValueError as e:
        return bad_row(key, name, MALFORMED_JSON, f"not valid JSON ({e})")
    if not isinstance(entry, dict):
        return bad_row(key, name, MALFORMED_JSON, f"a {type(entry).__name__}, not a JSON object")
    if isinstance(entry.get("id"), (str, int)):
        key = str(entry["id"])
    elif key.startswith("line"):
        key = str(rec.index)
    if questions:
        key = question_id_of(entry, key)
    image, bad, detail = None, "", ""
    field = entry.get("image")
    if field is not None and field != "":
        if not isinstance(field, str):
            bad, detail = WRONG_FIELD_TYPE, f"`image` is a {type(field).__name__}, not a path"
        else:
            full = _safe_image_path(root, field)
            if full is None:
                bad, detail = UNSAFE_PATH, f"`image` {field!r} is outside image_root (refused)"
            else:
                image, bad, detail = _read_image(fs, full)
    if questions:
        row = _question_row(key, name, image, entry, answers)
    else:
        row = row_from_metadata(key, name, image, {k: v for k, v in entry.items() if k != "id"},
                             None)
    if bad and not row["bad"]:
        row = bad_row(key, name, bad, detail, image=field)  # the path, for validate's hints
    return row


def _llava_records(read: Any, path: str, part: ByteRange | None) -> Iterator[Record]:
    if part is None:
        part = ByteRange(0, None, 0, True)
    limit = None if part.end is None else part.end - part.start
    if path.endswith(".jsonl"):
        return json_records.iter_jsonl(read, part.first_index, limit)
    return json_records.iter_json_array(read, part.first_index, limit, opening=part.first)


def read_llava_json(f: Any, path: str, source: DataSource,
                     part: ByteRange | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a LLaVA JSON/JSONL file (conversations, or ``llava_eval`` questions), or of
    one byte range of it, as a stream."""
    name = posixpath.basename(path)
    fs, root = filesystem(_image_root(source, path))
    jsonl = path.endswith(".jsonl")
    questions = source.format == "llava_eval"
    answers = _eval_answers(source) if questions else None
    for rec in _llava_records(f.read, path, part):
        yield _llava_row(rec, name, jsonl, fs, root, questions=questions, answers=answers)


# ---- parquet ------------------------------------------------------------------------------

def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value and not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"image column holds a {type(value).__name__}, not bytes")
    return bytes(value) if value else None


def _parquet_image(rec: dict, key: str, name: str, source: DataSource
                   ) -> tuple[bytes | None, dict[str, Any] | None]:
    """(image bytes, None), or (None, the bad row) for a wrong type or an oversize image."""
    try:
        image = _image_bytes(rec.get(source.image_column))
    except TypeError as e:
        return None, bad_row(key, name, WRONG_FIELD_TYPE, str(e))
    if image is not None and len(image) > MAX_IMAGE_BYTES:
        return None, bad_row(key, name, OVERSIZE_IMAGE,
                          f"{len(image)} bytes, over MAX_IMAGE_BYTES")
    return image, None


def _parquet_row(rec: dict, key: str, name: str, source: DataSource) -> dict[str, Any]:
    image, bad = _parquet_image(rec, key, name, source)
    if bad is not None:
        return bad
    conv, kind = normalize_conversations(rec.get(source.conversations_column))
    if conv is None:
        return bad_row(key, name, kind, f"`{source.conversations_column}` unusable")
    extra = {k: v for k, v in rec.items()
             if k not in (source.image_column, source.conversations_column, "id", "key")
             and not isinstance(v, (bytes, bytearray))}
    return make_row(key, name, image, conv, extra)


def _parquet_question_row(rec: dict, key: str, name: str, source: DataSource,
                          answers: Answers | None) -> dict[str, Any]:
    image, bad = _parquet_image(rec, key, name, source)
    if bad is not None:
        return bad
    entry = {k: v for k, v in rec.items() if k != source.image_column}
    return _question_row(key, name, image, entry, answers)


def _read_parquet(f: Any, path: str, source: DataSource) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    name = posixpath.basename(path)
    pf = pq.ParquetFile(f)
    columns = pf.schema_arrow.names
    # No conversations but a question column: a benchmark as HF datasets export it.
    questions = (source.conversations_column not in columns
                 and any(q in columns for q in QUESTION_FIELDS))
    if source.conversations_column not in columns and not questions:
        raise ValueError(f"{path}: no column {source.conversations_column!r} (nor a "
                         f"`question` column of an eval benchmark); it has {columns}. Set "
                         f"DataSource.conversations_column")
    answers = _eval_answers(source) if questions else None
    index = 0
    for batch in pf.iter_batches(batch_size=BLOCK_ROWS):
        for rec in batch.to_pylist():
            key = str(rec.get("id", rec.get("key", index)))
            yield (_parquet_question_row(rec, key, name, source, answers) if questions
                   else _parquet_row(rec, key, name, source))
            index += 1


PARSERS = {"webdataset": _read_webdataset, "llava_json": read_llava_json,
            "llava_eval": read_llava_json, "parquet": _read_parquet}


def iter_file_rows(source: DataSource, path: str) -> Iterator[dict[str, Any]]:
    """Normalized rows of one data file, read in this process."""
    fs, local = filesystem(path)
    opener = fs.open_input_file if source.format == "parquet" else fs.open_input_stream
    with opener(local) as f:
        yield from PARSERS[source.format](f, path, source)


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


def sample_file_rows(source: DataSource, path: str, k: int,
                     rng: random.Random) -> Iterator[dict[str, Any]]:
    """About ``k`` rows of one file without reading it whole, for ``mmkd validate``: the first
    record, then (LLaVA JSON/JSONL) records at random byte offsets; webdataset shards and
    parquet files are sequential or row-grouped, so their first ``k`` rows."""
    if source.format not in ("llava_json", "llava_eval"):
        for i, row in enumerate(iter_file_rows(source, path)):
            if i >= k:
                return
            yield row
        return
    fs, local = filesystem(path)
    name, jsonl = posixpath.basename(path), path.endswith(".jsonl")
    ifs, root = filesystem(_image_root(source, path))
    size = fs.get_file_info(local).size or 0
    questions = source.format == "llava_eval"
    to_row = functools.partial(_llava_row, questions=questions,
                               answers=_eval_answers(source) if questions else None)
    seen: set[str] = set()
    with fs.open_input_file(local) as f:
        first = next(iter(_llava_records(f.read, path, None)), None)
        if first is None:
            return
        seen.add(first.text)
        yield to_row(first, name, jsonl, ifs, root)
        if first.error and not first.text:  # not a JSON list at all: nothing else will read
            return
        window = 4 << 20  # bytes read at each random offset
        for offset in sorted(rng.randrange(size) for _ in range(max(k - 1, 0))):
            f.seek(offset)
            if jsonl:  # the first whole line after the offset
                data = f.read(window)
                a = data.find(b"\n")
                b = data.find(b"\n", a + 1) if a >= 0 else -1
                text = data[a + 1:b].decode("utf-8", "surrogateescape") if b >= 0 else None
            else:
                text = json_records.find_array_record(json_records._limited(f.read, window),
                                                      max_record_bytes=window)
            if text is None or not text.strip() or text in seen:
                continue
            seen.add(text)
            yield to_row(Record(-1, text), name, jsonl, ifs, root, key=f"byte{offset}")


