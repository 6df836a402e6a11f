"""The Ray Data path on a real local Ray: readers, preprocessing, bad-sample budget, sharding."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from workloads.data.dataset import build_train_dataset, iter_train_batches, ordered
from workloads.data.quality import DataQualityError, SampleQuality
from workloads.data.datasource import read_source
from workloads.data.source import DataSource
from mmkd_test_plugins.data_tiny import build_tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny"), num_samples=40)


def _bad_shard(path, n_corrupt: int) -> None:
    """A shard of deliberately broken samples (keys name their defect)."""
    conv = {"conversations": [{"from": "human", "value": "<image>\nQ?"},
                              {"from": "gpt", "value": "A"}]}
    members = {}
    for i in range(n_corrupt):
        members[f"corrupt{i}.png"] = b"\x89PNG\r\n\x1a\n truncated"
        members[f"corrupt{i}.json"] = json.dumps(conv).encode()
    members["badjson.json"] = b"{nope"
    members["noimage.json"] = json.dumps(conv).encode()  # <image> but no image
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def dirty(tiny, tmp_path):
    d = tmp_path / "dirty"
    shutil.copytree(tiny["instruct"], d)
    _bad_shard(d / "zz-bad.tar", n_corrupt=2)
    return d


def test_train_dataset_counts_bad_samples(ray_session, tiny, dirty):
    quality = SampleQuality.create(max_bad_fraction=0.5, min_samples=1, name="dirty")
    ds = build_train_dataset(DataSource(format="webdataset", paths=str(dirty)),
                             tiny["processor"], max_length=64, seed=3, quality=quality,
                             keep_keys=True, batch_size=16)
    rows = 0
    for batch in iter_train_batches(ds, batch_size=8, pad_token_id=1, seed=3, epoch=0):
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["has_image"].all()
        assert (batch["labels"] != -100).any(dim=1).all()
        rows += batch["input_ids"].shape[0]
    m = quality.metrics()
    assert m["data/seen"] == 44 and rows == 40
    assert (m["data/skipped_corrupt_image"], m["data/skipped_malformed_json"],
            m["data/skipped_image_token_mismatch"]) == (2, 1, 1)
    # max_length=64 with 16 image tokens truncates the long multi-turn samples.
    assert m["data/truncated"] > 0
    warnings = quality.warnings()
    assert any("zz-bad.tar:corrupt0" in w and "corrupt_image" in w for w in warnings)
    assert any("zz-bad.tar:badjson" in w for w in warnings)
    quality.check()  # 4/44 is within a 50% budget


def test_exceeding_the_budget_fails_with_the_cause(ray_session, tiny, tmp_path):
    d = tmp_path / "mostly_bad"
    d.mkdir()
    shutil.copy(sorted(Path(tiny["captions"]).glob("*.tar"))[0], d / "good.tar")
    _bad_shard(d / "bad.tar", n_corrupt=10)
    quality = SampleQuality.create(max_bad_fraction=0.05, min_samples=1000, name="captions")
    ds = build_train_dataset(DataSource(format="webdataset", paths=str(d)), tiny["processor"],
                             max_length=64, seed=0, quality=quality)
    for _ in ds.iter_batches(batch_size=16):  # min_samples not reached: no failure mid-epoch
        pass
    with pytest.raises(DataQualityError) as e:
        quality.check()  # the end-of-epoch check
    msg = str(e.value)
    assert "12 of 32 samples were bad" in msg and "'corrupt_image' (10)" in msg
    assert "bad.tar:corrupt" in msg and "max_bad_fraction" in msg

    eager = SampleQuality.create(max_bad_fraction=0.05, min_samples=1, name="captions")
    ds = build_train_dataset(DataSource(format="webdataset", paths=str(d / "bad.tar")),
                             tiny["processor"], max_length=64, seed=0, quality=eager)
    with pytest.raises(Exception, match="over max_bad_fraction"):
        ds.materialize()


def test_two_workers_get_disjoint_complete_shards(ray_session, tiny):
    ds = build_train_dataset(DataSource(format="webdataset", paths=tiny["captions"]),
                             tiny["processor"], max_length=64, seed=1, keep_keys=True,
                             batch_size=8)
    shards = ds.streaming_split(2, equal=False)
    seen: list[list[str]] = [[], []]

    def consume(rank: int) -> None:  # streaming_split needs both consumers running at once
        for batch in shards[rank].iter_batches(batch_size=8):
            seen[rank].extend(batch["key"].tolist())

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(
        f"captions-{i // 20:05d}.tar/captions-{i:07d}" for i in range(40))


def test_ray_readers_for_every_format(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (tmp_path / "a.json").write_text(json.dumps([{"id": f"j{i}", "conversations": conv}
                                                 for i in range(5)]))
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(7)],
                             "conversations": [json.dumps(conv)] * 7}), tmp_path / "b.parquet")
    llava = read_source(DataSource(format="llava_json", paths=str(tmp_path / "a.json")), seed=0)
    assert sorted(r["key"] for r in llava.take_all()) == [f"j{i}" for i in range(5)]
    parquet = read_source(DataSource(format="parquet", paths=str(tmp_path), max_samples=4))
    rows = parquet.take_all()
    assert len(rows) == 4 and all(r["image"] is None and r["bad"] == "" for r in rows)


def test_file_order_is_fixed_per_seed(ray_session, tmp_path):
    # the same order on every execution (a resumed worker must read what the run it continues
    # read), another order for another seed
    d = tmp_path / "many"
    d.mkdir()
    for i in range(8):
        with tarfile.open(d / f"s{i}.tar", "w") as tar:
            data = b"caption"
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = [f"s{i}.tar" for i in range(8)]
    ds = ordered(read_source(DataSource(format="webdataset", paths=str(d)), seed=5))
    runs = [[r["source"] for r in ds.iter_rows()] for _ in range(2)]
    assert runs[0] == runs[1] and sorted(runs[0]) == files and runs[0] != files
    other = ordered(read_source(DataSource(format="webdataset", paths=str(d)), seed=6))
    assert [r["source"] for r in other.iter_rows()] != runs[0]


def test_train_batches_depend_only_on_seed_epoch_and_position(ray_session):
    rows = [{"input_ids": np.array([i, i + 1]), "labels": np.array([i, i + 1]),
             "pixel_values": np.zeros((3, 2, 2), np.float32), "has_image": False}
            for i in range(40)]
    ds = ordered(ray_session.data.from_items(rows, override_num_blocks=5))

    def firsts(epoch: int, skip: int = 0, seed: int = 1) -> list[int]:
        return [int(x) for b in iter_train_batches(ds, 4, 0, seed=seed, epoch=epoch,
                                                   shuffle_window=16, skip_rows=skip)
                for x in b["input_ids"][:, 0]]

    e0 = firsts(0)
    assert sorted(e0) == list(range(40)) and e0 != list(range(40))
    assert sorted(e0[:16]) == list(range(16))  # permuted within windows of 16 rows only
    assert firsts(0) == e0 and firsts(1) != e0 and firsts(0, seed=2) != e0
    # a resumed worker (position: rows taken this epoch) gets what the uninterrupted run got
    assert firsts(0, skip=12) == e0[12:] and firsts(0, skip=20) == e0[20:]
    assert firsts(0, skip=40) == []
