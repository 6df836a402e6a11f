"""Bad inputs are flagged by kind, one row each, never fatal (no Ray); JSON is read as a stream
and in byte ranges; `validate` samples and names a forgotten image_root."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import pytest

from mmkd_test_plugins.bad_data import bomb_png, png, tar_bytes

from workloads.data import json_records
from workloads.data.preprocess import SampleError, decode_image
from workloads.data.quality import MAX_IMAGE_BYTES
from workloads.data.readers import read_llava_json, iter_rows
from workloads.data.preflight import validate_source
from workloads.data.source import DataSource

CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
META = json.dumps({"conversations": CONV}).encode()  # a webdataset sample's .json member


def kinds(rows) -> Counter:
    return Counter(r["bad"] for r in rows if r["bad"])


# ---- JSON streaming and splitting ---------------------------------------------------------

def _records(n: int) -> list[dict]:
    # strings full of what a naive splitter would trip over: brackets, commas, quotes, escapes
    return [{"id": f"r{i}", "image": f"img/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "}, {\"x\": [" * (i % 4) + "\\" * (i % 5)},
        {"from": "gpt", "value": "é ✓ " + "]" * (i % 3)}]} for i in range(n)]


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("parts", [1, 2, 5, 37])
def test_json_array_byte_ranges_hold_every_record_once(indent, parts):
    recs = _records(300)
    data = json.dumps(recs, indent=indent, ensure_ascii=False).encode()
    ranges = json_records.split_points(io.BytesIO(data).read, len(data), parts, jsonl=False)
    assert len(ranges) == parts and ranges[0].start == 0 and ranges[-1].end is None
    got = []
    for r in ranges:
        f = io.BytesIO(data)
        f.seek(r.start)
        limit = None if r.end is None else r.end - r.start
        for rec in json_records.iter_json_array(f.read, r.first_index, limit, opening=r.first):
            assert rec.error == ""
            got.append((rec.index, json.loads(rec.text)))
    assert got == list(enumerate(recs))


@pytest.mark.parametrize("parts", [1, 3, 16])
def test_jsonl_byte_ranges_hold_every_line_once(parts):
    recs = _records(200)
    data = ("\n".join(json.dumps(r) for r in recs[:100]) + "\n\n"
            + "\n".join(json.dumps(r) for r in recs[100:])).encode()  # a blank line in between
    ranges = json_records.split_points(io.BytesIO(data).read, len(data), parts, jsonl=True)
    got = []
    for r in ranges:
        f = io.BytesIO(data)
        f.seek(r.start)
        limit = None if r.end is None else r.end - r.start
        got += [(rec.index, json.loads(rec.text)["id"])
                for rec in json_records.iter_jsonl(f.read, r.first_index, limit)]
    # line numbers (0-based) count the blank line, as a reader's error messages would
    assert got == [(i if i < 100 else i + 1, f"r{i}") for i in range(200)]


def test_one_bad_element_costs_one_record():
    deep = b"[" * 100_000 + b"]" * 100_000
    data = (b'[{"id": "a"}, {"id": "b",, "x": 1}, ' + deep + b', {"id": "c\xff"}, "text", '
            b'{"id": "e", "x": [}, {"id": "f"}, {"id": "d", "s": "unterminated]')
    recs = list(json_records.iter_json_array(io.BytesIO(data).read))
    assert [r.index for r in recs] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert recs[0].error == "" and json.loads(recs[0].text) == {"id": "a"}
    assert "not valid JSON" in recs[1].error
    assert recs[2].error == "nested too deeply"
    assert recs[3].non_utf8 and recs[3].error == ""
    assert recs[4].text == '"text"'
    assert "not valid JSON" in recs[5].error and recs[5].text == '{"id": "e", "x": [}'
    assert recs[6].error == "" and json.loads(recs[6].text) == {"id": "f"}
    assert "unterminated" in recs[7].error and "rest of the file" in recs[7].error


# ---- LLaVA JSON: every bad kind, counted ---------------------------------------------------

def _llava_folder(tmp_path) -> tuple[DataSource, Counter, int]:
    """train.json (raw bytes, so a record can hold a non-UTF-8 byte) + images/; returns the
    source, the planted count of each bad kind and the number of good records."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(99))  # exists, so reading it would succeed if the path were allowed
    good = 7
    for i in range(good):
        (root / "images" / f"img{i}.png").write_bytes(png(i))
    with open(root / "images" / "huge.png", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: big on paper, free on disk
    elements = [json.dumps({"id": f"good{i}", "image": f"img{i}.png", "conversations": CONV})
                .encode() for i in range(good)]
    planted = Counter()

    def add(kind: str, raw: bytes) -> None:
        planted[kind] += 1
        elements.insert(len(elements) * 7 // 11, raw)  # spread between the good ones

    add("non_utf8", b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"},'
                    b' {"from": "gpt", "value": "ok"}]}')
    add("non_utf8", b'{"id": "junk\xff\xfe", "conversations": []}')
    add("malformed_json", b'{"id": "broken", "conversations": [1, 2,, 3]}')
    add("malformed_json", b'{"id": "deep", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    add("malformed_json", b'{"id": "noconv", "image": "img0.png"}')
    add("wrong_field_type", json.dumps({"id": "list_image", "image": ["img0.png", "img1.png"],
                                        "conversations": CONV}).encode())
    add("wrong_field_type", json.dumps({"id": "dict_conv", "conversations": {"from": "gpt"}})
        .encode())
    add("unsafe_path", json.dumps({"id": "climb", "image": "../../secret.png",
                                   "conversations": CONV}).encode())
    add("unsafe_path", json.dumps({"id": "absolute", "image": str(secret),
                                   "conversations": CONV}).encode())
    add("oversize_image", json.dumps({"id": "huge", "image": "huge.png",
                                      "conversations": CONV}).encode())
    add("missing_image", json.dumps({"id": "gone", "image": "nope.png",
                                     "conversations": CONV}).encode())
    (root / "train.json").write_bytes(b"[\n" + b",\n".join(elements) + b"\n]\n")
    src = DataSource(format="llava_json", paths=str(root / "train.json"),
                     image_root=str(root / "images"))
    return src, planted, good


def test_llava_bad_records_are_flagged_one_each_by_kind(tmp_path):
    src, planted, good = _llava_folder(tmp_path)
    rows = list(iter_rows(src))
    assert kinds(rows) == planted
    ok = [r for r in rows if not r["bad"]]
    assert sorted(r["key"] for r in ok) == [f"good{i}" for i in range(good)]
    assert all(r["image"].startswith(b"\x89PNG") for r in ok)
    by_key = {r["key"]: r for r in rows}
    assert "outside image_root" in json.loads(by_key["climb"]["extra"])["bad_detail"]
    assert by_key["climb"]["image"] is None and by_key["absolute"]["image"] is None


def test_llava_byte_ranges_give_the_same_rows_as_one_stream(tmp_path):
    src, _, _ = _llava_folder(tmp_path)
    path = src.paths[0]
    whole = list(iter_rows(src))
    data = open(path, "rb").read()
    ranges = json_records.split_points(io.BytesIO(data).read, len(data), 4, jsonl=False)
    assert len({r.start for r in ranges}) == 4
    split = []
    for r in ranges:
        with open(path, "rb") as f:
            f.seek(r.start)
            split += list(read_llava_json(f, path, src, r))
    assert split == whole


def test_jsonl_bad_lines_are_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    lines = [json.dumps({"id": "ok", "image": "a.png", "conversations": CONV}).encode(),
             b'{"id": "x", "conversations": "\xff"}', b"{oops",
             json.dumps({"id": "t", "image": 5, "conversations": CONV}).encode(),
             json.dumps({"id": "u", "image": "../a.png", "conversations": CONV}).encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = list(iter_rows(DataSource(format="llava_json", paths=str(tmp_path / "d.jsonl"))))
    assert [(r["key"], r["bad"]) for r in rows] == [
        ("ok", ""), ("line2", "non_utf8"), ("line3", "malformed_json"),
        ("t", "wrong_field_type"), ("u", "unsafe_path")]


# ---- webdataset: truncated shards, encodings, oversize -----------------------------------

def _shard(n: int) -> bytes:
    members = []
    for i in range(n):
        members += [(f"k{i}.png", png(i, size=24)),
                    (f"k{i}.json", json.dumps({"conversations": CONV}).encode())]
    return tar_bytes(members)


def test_a_shard_cut_mid_member_keeps_what_came_before_and_counts_one_truncation(tmp_path):
    data = _shard(5)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        member = t.getmember("k3.png")
    cut = member.offset_data + member.size // 2
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    rows = list(iter_rows(DataSource(format="webdataset", paths=str(tmp_path / "cut.tar"))))
    assert [(r["key"], r["bad"]) for r in rows] == [
        ("k0", ""), ("k1", ""), ("k2", ""), ("k3", "truncated_shard")]
    detail = json.loads(rows[-1]["extra"])["bad_detail"]
    assert "cut.tar" in detail and "k3.png" in detail


def test_a_shard_cut_at_a_header_is_also_counted(tmp_path):
    data = _shard(5)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        header = t.getmember("k3.png").offset
    for name, cut in (("at_header.tar", header), ("in_header.tar", header + 100)):
        (tmp_path / name).write_bytes(data[:cut])
        rows = list(iter_rows(DataSource(format="webdataset", paths=str(tmp_path / name))))
        assert [(r["key"], r["bad"]) for r in rows] == [
            ("k0", ""), ("k1", ""), ("k2", ""), ("", "truncated_shard")], name
    (tmp_path / "whole.tar").write_bytes(data)
    assert not kinds(iter_rows(DataSource(format="webdataset", paths=str(tmp_path / "whole.tar"))))


def test_webdataset_member_kinds(tmp_path):
    deep = b'{"conversations": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    (tmp_path / "s.tar").write_bytes(tar_bytes([
        ("a.png", png(1)), ("a.json", json.dumps({"conversations": CONV}).encode()),
        ("b.png", png(2)), ("b.txt", b"caf\xe9 latin-1"),
        ("c.png", png(3)), ("c.json", deep),
        ("d.png", png(4)), ("d.json", json.dumps({"conversations": 42}).encode()),
        ("e.png", bomb_png(9_000, 9_000)), ("e.json", json.dumps({"conversations": CONV}).encode()),
    ]))
    rows = list(iter_rows(DataSource(format="webdataset", paths=str(tmp_path / "s.tar"))))
    assert [(r["key"], r["bad"]) for r in rows] == [
        ("a", ""), ("b", "non_utf8"), ("c", "malformed_json"), ("d", "wrong_field_type"),
        ("e", "")]  # the pixel cap is applied where images are decoded, before decoding
    with pytest.raises(SampleError) as e:
        decode_image(rows[-1]["image"])
    assert e.value.kind == "oversize_image" and "9000x9000" in str(e.value)
    assert decode_image(png(5)).size == (16, 16)


def test_an_image_member_over_the_byte_cap_is_skipped_unread(tmp_path):
    (tmp_path / "big.tar").write_bytes(tar_bytes([
        ("a.png", b"\0" * (MAX_IMAGE_BYTES + 1)), ("a.json", META),
        ("b.png", png(1)), ("b.json", META)]))
    rows = list(iter_rows(DataSource(format="webdataset", paths=str(tmp_path / "big.tar"))))
    assert [(r["key"], r["bad"], r["image"]) for r in rows] == [
        ("a", "oversize_image", None), ("b", "", png(1))]


# ---- validate: a bounded sample, and the forgotten image_root ------------------------------

def _forgotten_root(tmp_path, n: int = 40):
    """LLaVA layout: data/train.json + data/images/coco/*.jpg; `image` relative to images/."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "images" / "coco").mkdir(parents=True)
    (data / "other").mkdir()
    entries = []
    for i in range(n):
        Image.new("RGB", (12, 10), (i * 5, 100, 200)).save(data / "images" / "coco" / f"{i}.jpg")
        entries.append({"id": str(i), "image": f"coco/{i}.jpg", "conversations": CONV})
    (data / "train.json").write_text(json.dumps(entries, indent=1))
    return data


def test_validate_names_image_root_and_suggests_the_folder(tmp_path):
    data = _forgotten_root(tmp_path)
    for image_root in (None, str(data)):  # forgotten, or pointed at the JSON's folder
        problems = validate_source(DataSource(format="llava_json", paths=str(data / "train.json"),
                                              image_root=image_root))
        assert len(problems) == 1, problems
        msg = problems[0]
        assert msg.startswith("0 of ") and f"sampled images found under image_root={data}" in msg
        assert "train.json" in msg and f"did you mean image_root={data / 'images'}?" in msg
    right = DataSource(format="llava_json", paths=str(data / "train.json"),
                       image_root=str(data / "images"))
    assert validate_source(right) == []


def test_validate_reads_a_bounded_sample(tmp_path):
    from workloads.data.readers import sample_file_rows

    data = _forgotten_root(tmp_path, n=200)
    src = DataSource(format="llava_json", paths=str(data / "train.json"),
                     image_root=str(data / "images"))
    rows = list(sample_file_rows(src, str(data / "train.json"), 8, random.Random(0)))
    assert 2 <= len(rows) <= 8 and rows[0]["key"] == "0"
    assert all(r["bad"] == "" for r in rows) and len({r["key"] for r in rows}) == len(rows)


def test_validate_refuses_a_json_file_that_is_not_a_list(tmp_path):
    entries = [{"id": str(i), "conversations": CONV[1:]} for i in range(50)]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": entries}))
    src = DataSource(format="llava_json", paths=str(tmp_path / "wrapped.json"))
    problems = validate_source(src)
    assert len(problems) == 1 and "1 of 1 sampled records are bad" in problems[0]
    assert "expected a JSON list of samples" in problems[0]


def test_validate_reports_a_source_where_every_sample_is_bad(tmp_path):
    (tmp_path / "bad.tar").write_bytes(tar_bytes([(f"k{i}.png", b"\x89PNG not really")
                                                  for i in range(4)]))
    problems = validate_source(DataSource(format="webdataset", paths=str(tmp_path)))
    assert len(problems) == 1 and "4 of 4 sampled records are bad" in problems[0]
    assert "malformed_json" in problems[0] and "bad.tar:k0" in problems[0]
