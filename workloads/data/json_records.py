"""LLaVA JSON / JSONL split into records with bounded memory, whatever the file size.

A record comes out as ``Record(index, text, error)``: ``text`` is its raw JSON text (invalid
UTF-8 bytes kept as lone surrogates, so one bad byte spoils one record, not the file) and
``error`` is "" or why the record could not be cut out. Parsing is left to the caller.

* JSONL: line by line; a line longer than ``max_record_bytes`` is skipped to its end.
* JSON array: ``json.JSONDecoder.raw_decode`` cuts each element out of a buffer of at most
  one chunk plus one record. When it fails (malformed, nested too deep, or simply cut off
  by the end of the buffer), a small bracket scanner that skips strings finds where the
  element ends, so one bad element costs one record and the rest of the array still reads.
* Split points: ``split_points`` finds byte offsets that begin a record, so several read
  tasks can each read one byte range. For an array that needs the in-string/nesting state
  at every offset, computed by one vectorized (numpy) pass over the file, chunk by chunk.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

__all__ = ["Record", "ByteRange", "iter_jsonl", "iter_json_array", "split_points",
           "find_array_record", "CHUNK_BYTES", "MAX_RECORD_BYTES"]

CHUNK_BYTES = 1 << 20
# One LLaVA record is a few KB; a "record" this long means a broken file (an unterminated
# string swallowing the rest of it), not data.
MAX_RECORD_BYTES = 64 << 20

Read = Callable[[int], bytes]

_WS = " \t\r\n"
_NON_WS = re.compile(r"[^ \t\r\n]")
_STRUCT = re.compile(r'[\[\]{},"]')
_STRING_TAIL = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # the rest of a string after '"'
_SURROGATE = re.compile("[\udc80-\udcff]")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Record:
    index: int   # position in the file (line number - 1 for JSONL)
    text: str    # raw JSON text of the record ("" when error says it could not be cut out)
    error: str = ""

    @property
    def non_utf8(self) -> bool:
        return bool(_SURROGATE.search(self.text))


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end) of a file that begin and end at record boundaries."""

    start: int
    end: int | None   # None: to the end of the file
    first_index: int  # index of the first record in the range
    first: bool       # holds the file's start (a JSON array's opening '[')


def _limited(read: Read, limit: int | None) -> Read:
    if limit is None:
        return read
    left = [limit]

    def bounded(n: int) -> bytes:
        if left[0] <= 0:
            return b""
        data = read(min(n, left[0]))
        left[0] -= len(data)
        return data

    return bounded


# ---- JSONL --------------------------------------------------------------------------------

def iter_jsonl(read: Read, first_index: int = 0, limit: int | None = None,
               max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Record]:
    """Non-blank lines of a JSONL stream (``limit``: bytes to read at most)."""
    read = _limited(read, limit)
    index, pending, skipping, eof = first_index, b"", False, False
    while not eof:
        chunk = read(CHUNK_BYTES)
        eof = not chunk
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop() if not eof else b""
        for line in lines:
            if skipping:  # the tail of an over-long line
                skipping = False
            elif line.strip():
                yield Record(index, line.decode("utf-8", "surrogateescape"))
            index += 1
        if len(pending) > max_record_bytes:
            if not skipping:
                yield Record(index, "", f"line over {max_record_bytes} bytes")
            pending, skipping = b"", True


# ---- JSON array ---------------------------------------------------------------------------

def _element_end(buf: str, pos: int) -> int | None:
    """Index of the ',' or ']' that ends the array element starting at ``pos``; None when the
    buffer ends first. Strings are skipped whole, so brackets inside them do not count; a
    mismatched closer closes back to its opener (``[}`` closes both), so one typo does not
    swallow the rest of the file."""
    stack, i = [], pos
    while True:
        m = _STRUCT.search(buf, i)
        if m is None:
            return None
        c, i = m.group(), m.end()
        if c == '"':
            s = _STRING_TAIL.match(buf, i)
            if s is None:
                return None
            i = s.end()
        elif c in "[{":
            stack.append(c)
        elif c in "]}":
            opener = "[" if c == "]" else "{"
            if opener in stack:
                del stack[len(stack) - 1 - stack[::-1].index(opener):]
            elif not stack and c == "]":
                return m.start()  # the enclosing array's end
        elif not stack:  # ','
            return m.start()


class _TextBuffer:
    """Decoded text of a byte stream, refilled a chunk at a time; consumed text is dropped."""

    def __init__(self, read: Read):
        self._read = read
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self._read(CHUNK_BYTES)
        self.eof = not data
        self.buf = self.buf[self.pos:] + self._decoder.decode(data, final=self.eof)
        self.pos = 0
        return True

    def skip_ws(self) -> str:
        """The next non-whitespace character ("" at the end), consuming the whitespace."""
        while True:
            m = _NON_WS.search(self.buf, self.pos)
            if m is not None:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.fill():
                return ""


def iter_json_array(read: Read, first_index: int = 0, limit: int | None = None,
                    opening: bool = True,
                    max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Record]:
    """Elements of a JSON array stream. ``opening=False``: the stream starts inside the array
    (a byte range from ``split_points``), and its end need not be the closing ']'."""
    tb = _TextBuffer(_limited(read, limit))
    tb.fill()
    if opening:
        if tb.skip_ws() == "\ufeff":
            tb.pos += 1
        c = tb.skip_ws()
        if c != "[":
            found = f"{c!r}" if c else "an empty file"
            yield Record(first_index, "", f"expected a JSON list of samples, found {found}")
            return
        tb.pos += 1
    index = first_index
    while True:
        c = tb.skip_ws()
        if c in ("", "]"):
            return
        if c == ",":
            tb.pos += 1
            continue
        start, error = tb.pos, ""
        try:
            _, end = _DECODER.raw_decode(tb.buf, start)
            if end == len(tb.buf) and c not in '{["' and not tb.eof:
                raise ValueError("a bare value cut by the buffer end")
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            end = _element_end(tb.buf, start)
            if end is None:
                if len(tb.buf) - start <= max_record_bytes and tb.fill():
                    continue  # cut off by the buffer end: read more, try again
                yield Record(index, tb.buf[start:start + 200],
                             f"record unterminated or over {max_record_bytes} bytes; "
                             f"the rest of the file is skipped")
                return
            error = ("nested too deeply" if isinstance(e, RecursionError)
                     else f"not valid JSON ({e})")
        yield Record(index, tb.buf[start:end], error)
        tb.pos = end
        index += 1


# ---- random access: split points and sampling ---------------------------------------------

_LUT = np.zeros(256, np.int8)
_LUT[ord('"')] = 1
_LUT[[ord("["), ord("{")]] = 2
_LUT[[ord("]"), ord("}")]] = 3
_LUT[ord(",")] = 4


def _array_separators(read: Read) -> Iterator[np.ndarray]:
    """Byte offsets of the ',' between top-level array elements, chunk by chunk.

    Escapes are neutralized first (``\\\\`` then ``\\"``, left to right, as JSON reads them;
    same length, so offsets hold), after which every '"' toggles the in-string state. Broken
    nesting can only cost splits, never misplace them: past a stray closer nothing is cut.
    """
    in_string, depth, base, carry = 0, 0, 0, b""
    while True:
        data = read(4 * CHUNK_BYTES)
        chunk = carry + data
        if data:  # keep a trailing backslash run with what it escapes
            kept = chunk.rstrip(b"\\")
            carry, chunk = chunk[len(kept):], kept
        if not chunk:
            return
        clean = chunk.replace(b"\\\\", b"__").replace(b'\\"', b"__")
        codes = _LUT[np.frombuffer(clean, np.uint8)]
        where = np.flatnonzero(codes)
        kinds = codes[where]
        quote = kinds == 1
        inside = (in_string + np.cumsum(quote) - quote) % 2 == 1
        outside = ~inside & ~quote
        delta = np.where(outside & (kinds == 2), 1, 0) - np.where(outside & (kinds == 3), 1, 0)
        depth_after = depth + np.cumsum(delta)
        is_sep = outside & (kinds == 4) & (depth_after == 1)
        closed = np.flatnonzero(depth_after < 1)
        if len(closed):  # the array closed (its end, or a stray closer): trust nothing after
            yield where[:closed[0]][is_sep[:closed[0]]] + base
            return
        yield where[is_sep] + base
        in_string = (in_string + int(quote.sum())) % 2
        depth = int(depth_after[-1]) if len(depth_after) else depth
        base += len(chunk)
        if not data:
            return


def split_points(read: Read, size: int, parts: int, jsonl: bool) -> list[ByteRange]:
    """``parts`` byte ranges of about ``size / parts`` bytes each, cut at record boundaries,
    with the index of each range's first record. Reads the whole file once, a chunk at a time."""
    targets = [size * k // parts for k in range(1, parts)]
    cuts: list[tuple[int, int]] = []  # (byte offset where a range starts, its first index)
    if jsonl:
        base, lines = 0, 0
        while targets:
            chunk = read(4 * CHUNK_BYTES)
            if not chunk:
                break
            while targets:  # a range starts after the first newline at or past its target
                nl = chunk.find(b"\n", max(targets[0] - base, 0))
                if nl < 0:
                    break
                cuts.append((base + nl + 1, lines + chunk.count(b"\n", 0, nl) + 1))
                targets.pop(0)
            lines += chunk.count(b"\n")
            base += len(chunk)
    else:
        count = 0
        for seps in _array_separators(read):
            while targets and len(seps):
                k = int(np.searchsorted(seps, targets[0]))
                if k == len(seps):
                    break
                cuts.append((int(seps[k]) + 1, count + k + 1))
                targets.pop(0)
                seps, count = seps[k + 1:], count + k + 1
            count += len(seps)
    cuts = [c for i, c in enumerate(cuts) if c[0] < size and (i == 0 or c[0] > cuts[i - 1][0])]
    starts = [(0, 0)] + cuts
    return [ByteRange(s, starts[i + 1][0] if i + 1 < len(starts) else None, idx, i == 0)
            for i, (s, idx) in enumerate(starts)]


def find_array_record(read: Read, max_record_bytes: int = MAX_RECORD_BYTES) -> str | None:
    """Text of the first whole top-level sample found in a JSON array stream that starts at an
    arbitrary offset (used to sample a file at random places): the first ``{`` after a ``,``
    whose object parses, carries ``conversations`` and is followed by ``,`` or ``]``. A
    heuristic for sampling only; reading uses ``split_points``."""
    tb = _TextBuffer(read)
    tb.fill()
    candidate = re.compile(r",\s*\{")
    while True:
        m = candidate.search(tb.buf, tb.pos)
        if m is None:
            if len(tb.buf) > max_record_bytes or not tb.fill():
                return None
            continue
        start = m.end() - 1
        try:
            obj, end = _DECODER.raw_decode(tb.buf, start)
        except (ValueError, RecursionError):
            if _element_end(tb.buf, start) is None and len(tb.buf) <= max_record_bytes \
                    and tb.fill():
                continue
            tb.pos = start + 1
            continue
        after = _NON_WS.search(tb.buf, end)
        if after is None and not tb.eof and tb.fill():
            continue
        if isinstance(obj, dict) and "conversations" in obj and \
                (after is None or tb.buf[after.start()] in ",]"):
            return tb.buf[start:end]
        tb.pos = start + 1
