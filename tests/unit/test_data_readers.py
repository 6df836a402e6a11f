"""Readers without Ray: webdataset, LLaVA JSON (real layout), parquet; validation; eval examples."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from workloads.data.eval_examples import iter_eval_examples
from workloads.data.readers import CAPTION_PROMPT, iter_rows
from workloads.data.preflight import validate_source
from workloads.data.source import DataSource, fingerprint_source, resolve_files


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


CONV = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]


@pytest.fixture()
def wds(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    _tar(d / "a-000.tar", {
        "s1.png": _png(), "s1.json": json.dumps({"conversations": CONV, "answer": "A",
                                                 "question_type": "color"}).encode(),
        "s2.jpg": b"not really a jpeg", "s2.txt": b"a green square\n",
        "s3.png": _png(), "s3.json": b"{broken",
    })
    _tar(d / "a-001.tar", {"s4.json": json.dumps({"conversations": CONV[:1] + [
        {"from": "gpt", "value": "B"}, {"from": "human", "value": "more?"},
        {"from": "gpt", "value": "C"}]}).encode()})
    (d / "README.md").write_text("not a shard")  # non-tar files are ignored
    return d


def test_webdataset_rows(wds):
    rows = list(iter_rows(DataSource(format="webdataset", paths=str(wds))))
    assert [(r["source"], r["key"]) for r in rows] == [
        ("a-000.tar", "s1"), ("a-000.tar", "s2"), ("a-000.tar", "s3"), ("a-001.tar", "s4")]
    s1, s2, s3, s4 = rows
    assert s1["image"] == _png() and json.loads(s1["conversations"]) == CONV
    assert json.loads(s1["extra"]) == {"answer": "A", "question_type": "color"}
    assert s1["bad"] == "" and s2["bad"] == ""
    assert json.loads(s2["conversations"]) == [{"from": "human", "value": CAPTION_PROMPT},
                                               {"from": "gpt", "value": "a green square"}]
    assert s3["bad"] == "malformed_json"
    assert s4["image"] is None and len(json.loads(s4["conversations"])) == 4
    glob_rows = list(iter_rows(DataSource(format="webdataset", paths=[str(wds / "*-001.tar")])))
    assert [r["key"] for r in glob_rows] == ["s4"]
    assert len(list(iter_rows(DataSource(format="webdataset", paths=str(wds), max_samples=2)))) == 2


def test_eval_examples(wds):
    examples = list(iter_eval_examples(DataSource(format="webdataset", paths=str(wds))))
    # s2's image is corrupt and s3's JSON is malformed: both skipped.
    assert [e.key for e in examples] == ["s1", "s4"]
    s1, s4 = examples
    assert (s1.answer, s1.question_type, s1.image.size) == ("A", "color", (8, 8))
    assert s1.prompt_conversation == CONV[:1]
    assert (s4.answer, s4.question_type, s4.image) == ("C", "unknown", None)
    assert [t["value"] for t in s4.prompt_conversation] == ["<image>\nQ?", "B", "more?"]


@pytest.fixture()
def llava(tmp_path):
    # LLaVA's layout: one JSON list, `image` relative to an image folder (coco/train2017/...).
    (tmp_path / "images" / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "images" / "coco" / "train2017" / "000000033471.jpg").write_bytes(_png())
    entries = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "text_only_1", "conversations": [{"from": "human", "value": "Hi"},
                                                {"from": "gpt", "value": "Hello!"}]},
        {"id": "gone", "image": "coco/train2017/missing.jpg", "conversations": CONV},
        {"id": "noconv", "image": "coco/train2017/000000033471.jpg"},
    ]
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(entries))
    (tmp_path / "extra.jsonl").write_text(json.dumps(entries[1]) + "\n{oops\n")
    return tmp_path


def test_llava_json_rows(llava):
    src = DataSource(format="llava_json", paths=str(llava / "llava_v1_5_mix665k.json"),
                     image_root=str(llava / "images"))
    rows = {r["key"]: r for r in iter_rows(src)}
    assert list(rows) == ["000000033471", "text_only_1", "gone", "noconv"]
    bus = rows["000000033471"]
    assert bus["image"] == _png() and bus["bad"] == ""
    assert len(json.loads(bus["conversations"])) == 4
    assert json.loads(bus["extra"]) == {"image": "coco/train2017/000000033471.jpg"}
    assert rows["text_only_1"]["image"] is None and rows["text_only_1"]["bad"] == ""
    assert rows["gone"]["bad"] == "missing_image"
    assert rows["noconv"]["bad"] == "malformed_json"
    jsonl = list(iter_rows(DataSource(format="llava_json", paths=str(llava / "extra.jsonl"))))
    assert [(r["key"], r["bad"]) for r in jsonl] == [("text_only_1", ""), ("line2", "malformed_json")]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1", "p2"], "image": [_png(), None],
                             "conversations": [json.dumps(CONV), "[]"], "answer": ["A", "B"]}),
                   tmp_path / "a.parquet")
    # HF datasets style: image as {bytes, path} struct, conversations as a list of structs.
    pq.write_table(pa.table({"image": [{"bytes": _png(), "path": "x.png"}],
                             "conversations": [CONV]}), tmp_path / "b.parquet")
    rows = list(iter_rows(DataSource(format="parquet", paths=str(tmp_path))))
    assert [(r["source"], r["key"], r["bad"]) for r in rows] == [
        ("a.parquet", "p1", ""), ("a.parquet", "p2", "malformed_json"), ("b.parquet", "0", "")]
    assert rows[0]["image"] == rows[2]["image"] == _png()
    assert json.loads(rows[0]["extra"]) == {"answer": "A"}
    assert json.loads(rows[2]["conversations"]) == CONV


def test_validate_source_names_the_problem(tmp_path, wds):
    assert validate_source(DataSource(format="webdataset", paths=str(wds))) == []
    missing = validate_source(DataSource(format="webdataset", paths=str(tmp_path / "nope")))
    assert len(missing) == 1 and "nope" in missing[0] and "does not exist" in missing[0]
    (tmp_path / "empty").mkdir()
    none = validate_source(DataSource(format="webdataset", paths=str(tmp_path / "empty")))
    assert "no .tar files found" in none[0] and "empty" in none[0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tar").write_bytes(b"\0garbage" * 100)
    unreadable = validate_source(DataSource(format="webdataset", paths=str(tmp_path / "bad")))
    assert "x.tar" in unreadable[0]
    (tmp_path / "bad" / "x.tar").write_bytes(b"")
    empty = validate_source(DataSource(format="webdataset", paths=str(tmp_path / "bad")))
    assert "x.tar" in empty[0]
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_files(DataSource(format="webdataset", paths=str(tmp_path / "nope")))


def test_fingerprint_changes_with_the_data(wds):
    src = DataSource(format="webdataset", paths=str(wds))
    before = fingerprint_source(src)
    assert fingerprint_source(src) == before
    _tar(wds / "a-002.tar", {"s9.txt": b"new"})
    assert fingerprint_source(src) != before


def test_registry_hooks_for_configs_with_sources(tmp_path, wds):
    from workloads.data.preflight import validate_config_sources
    from workloads.data.source import fingerprint_config_sources
    from orchestrator.plugin import WorkloadConfig

    class Cfg(WorkloadConfig):
        train: DataSource
        extra: list[DataSource] = []

    good = Cfg(train=DataSource(format="webdataset", paths=str(wds)))
    assert validate_config_sources(good, {}) == []
    bad = Cfg(train=good.train, extra=[DataSource(format="parquet", paths=str(tmp_path / "x"))])
    problems = validate_config_sources(bad, {})
    assert len(problems) == 1 and problems[0].startswith("extra: ") and "x" in problems[0]
    assert fingerprint_config_sources(good) == fingerprint_config_sources(good)
