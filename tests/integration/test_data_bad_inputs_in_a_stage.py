"""Every bad input is counted by kind through the real Ray Data path training uses (read ->
preprocess -> the quality actor), and the pass finishes within its budget: a shard set with a
tar cut mid-member and at a header, non-UTF-8 members, malformed/deeply nested JSON, wrong
field types and a pixel bomb; and a LLaVA JSON array read in several byte-range tasks with a
non-UTF-8 record, `../` and absolute image paths, an oversize and a missing image."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from mmkd_test_plugins.bad_data import bomb_png, png, tar_bytes
from mmkd_test_plugins.data_tiny import build_tiny_data

from workloads.data import readers
from workloads.data.dataset import build_train_dataset
from workloads.data.datasource import SampleDatasource
from workloads.data.quality import BAD_KINDS, MAX_IMAGE_BYTES, SampleQuality
from workloads.data.source import DataSource

CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]


def good_members(prefix: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}{i}.png", png(i)),
                (f"{prefix}{i}.json", json.dumps({"conversations": CONV}).encode())]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny"), num_samples=20)


def run_and_count(ds) -> int:
    return sum(len(b["input_ids"]) for b in ds.iter_batches(batch_size=16))


def test_every_bad_shard_input_is_counted_by_kind(ray_session, tiny, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(tiny["captions"], d)
    good = 20  # the tiny captions
    planted: Counter = Counter()

    # cut inside a member: the 4 samples before it are fine, one truncation is counted
    whole = tar_bytes(good_members("cut", 6))
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        m = t.getmember("cut4.png")
    (d / "x-cut-member.tar").write_bytes(whole[:m.offset_data + m.size // 2])
    good += 4
    planted["truncated_shard"] += 1
    # cut at a header: the 3 whole samples before it are fine
    whole = tar_bytes(good_members("hdr", 5))
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        m = t.getmember("hdr3.png")
    (d / "x-cut-header.tar").write_bytes(whole[:m.offset + 200])
    good += 3
    planted["truncated_shard"] += 1

    deep = b'{"conversations": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    bad = [("u1.png", png(1)), ("u1.json", b'{"conversations": "caf\xe9"}'),
           ("u2.png", png(2)), ("u2.txt", b"\xff\xfe a caption"),
           ("m1.png", png(3)), ("m1.json", b'{"conversations": [}'),
           ("m2.png", png(4)), ("m2.json", deep),
           ("w1.png", png(5)), ("w1.json", json.dumps({"conversations": 42}).encode()),
           ("o1.png", bomb_png(9_000, 9_000)),
           ("o1.json", json.dumps({"conversations": CONV}).encode())]
    (d / "x-kinds.tar").write_bytes(tar_bytes(bad + good_members("ok", 2)))
    good += 2
    planted.update(non_utf8=2, malformed_json=2, wrong_field_type=1, oversize_image=1)

    # the budget is judged on the whole pass (quality.check() below), not while streaming:
    # x-kinds.tar alone is 5 of 8 bad, and whether it comes first is the seed's file order
    quality = SampleQuality.create(max_bad_fraction=0.5, min_samples=1000, name="shards")
    ds = build_train_dataset(DataSource(format="webdataset", paths=str(d)), tiny["processor"],
                             max_length=64, seed=0, quality=quality, batch_size=8)
    rows = run_and_count(ds)
    m = quality.metrics()
    assert {k: m[f"data/skipped_{k}"] for k in BAD_KINDS} == \
        {k: float(planted[k]) for k in BAD_KINDS}
    assert rows == good and m["data/seen"] == good + sum(planted.values())
    quality.check()  # within budget: the pass finished and the stage would go on
    warnings = "\n".join(quality.warnings())
    assert "x-cut-member.tar" in warnings and "truncated inside member cut4.png" in warnings


def llava_array(root: Path) -> tuple[DataSource, Counter, int]:
    (root / "images").mkdir(parents=True)
    (root / "secret.png").write_bytes(png(99))
    with open(root / "images" / "huge.png", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse
    good = 60
    filler = "x" * 400  # makes records big enough that the file spans several ranges
    elements = []
    for i in range(good):
        (root / "images" / f"{i}.png").write_bytes(png(i))
        elements.append(json.dumps({"id": f"g{i}", "image": f"{i}.png", "note": filler,
                                    "conversations": CONV}).encode())
    planted: Counter = Counter()

    def plant(kind: str, raw: bytes) -> None:
        planted[kind] += 1
        elements.insert(random.Random(len(elements)).randrange(len(elements)), raw)

    plant("non_utf8", b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"},'
                      b' {"from": "gpt", "value": "ok"}]}')
    plant("malformed_json", b'{"id": "broken",, "conversations": []}')
    plant("malformed_json", b'{"id": "deep", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    plant("wrong_field_type", json.dumps({"id": "list", "image": ["0.png", "1.png"],
                                          "conversations": CONV}).encode())
    plant("unsafe_path", json.dumps({"id": "up", "image": "../secret.png",
                                     "conversations": CONV}).encode())
    plant("unsafe_path", json.dumps({"id": "abs", "image": str(root / "secret.png"),
                                     "conversations": CONV}).encode())
    plant("oversize_image", json.dumps({"id": "huge", "image": "huge.png",
                                        "conversations": CONV}).encode())
    plant("missing_image", json.dumps({"id": "gone", "image": "none.png",
                                       "conversations": CONV}).encode())
    (root / "train.json").write_bytes(b"[\n" + b",\n".join(elements) + b"\n]")
    return (DataSource(format="llava_json", paths=str(root / "train.json"),
                       image_root=str(root / "images")), planted, good)


def test_a_llava_array_read_in_byte_ranges_counts_every_bad_record(ray_session, tiny, tmp_path,
                                                                  monkeypatch):
    src, planted, good = llava_array(tmp_path / "llava")
    size = Path(src.paths[0]).stat().st_size
    monkeypatch.setattr(readers, "SPLIT_BYTES", size // 5)
    tasks = SampleDatasource(src, [src.paths[0]], split_bytes=size // 5) \
        .get_read_tasks(parallelism=16)
    assert len(tasks) >= 5  # one file, several read tasks

    quality = SampleQuality.create(max_bad_fraction=0.5, min_samples=1, name="llava")
    ds = build_train_dataset(src, tiny["processor"], max_length=64, seed=1, quality=quality,
                             batch_size=8, keep_keys=True)
    keys = [k for b in ds.iter_batches(batch_size=16) for k in b["key"]]
    m = quality.metrics()
    assert {k: m[f"data/skipped_{k}"] for k in BAD_KINDS} == \
        {k: float(planted[k]) for k in BAD_KINDS}
    assert sorted(keys) == sorted(f"train.json/g{i}" for i in range(good))  # each once
    quality.check()
    assert any("../secret.png" in w and "unsafe_path" in w for w in quality.warnings())
