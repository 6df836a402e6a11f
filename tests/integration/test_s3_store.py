"""The artifact store on an S3-compatible server (moto, on 127.0.0.1) through pyarrow.fs."""

from __future__ import annotations

import textwrap

import pytest
from mmkd_test_plugins.gates import wait_until
from moto_server import moto_s3

from orchestrator.artifact_store import ArtifactStore
from orchestrator.runner import PipelineRunner
from orchestrator.loader import load_pipeline


@pytest.fixture(scope="module")
def s3_uri(tmp_path_factory):
    # Stage tasks read the same credential chain on their node; mmkd never forwards secret
    # values (runtime_env is shown in plain text by Ray), only the credentials file's path.
    with moto_s3(tmp_path_factory.mktemp("moto")) as uri:
        yield uri


def test_store_round_trip_on_s3(s3_uri, tmp_path):
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    assert not store.is_local
    key = "de" * 32
    with store.writer("noop", key, {"stage": "x"}) as out:
        (tmp_path / "unused").mkdir()
        open(f"{out}/hello.txt", "w").write("from another node")
    assert store.is_complete("noop", key)
    assert store.uri("noop", key).startswith("s3://mmkd-test/store/stages/noop-")
    local = store.local_dir("noop", key)
    assert open(f"{local}/hello.txt").read() == "from another node"
    assert store.read_json("noop", key, "_mmkd.json")["stage"] == "x"
    store.invalidate("noop", key)
    assert not store.is_complete("noop", key)


def test_pipeline_with_s3_store_passes_outputs_downstream(ray_session, s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        name: s3_pipe
        stages:
          a: {workload: noop, params: {value: 3}}
          b: {workload: noop, inputs: {x: a.result}}
    """))
    rec = PipelineRunner(load_pipeline(path), store_root=s3_uri).run()
    assert rec.status == "success", rec.error
    assert rec.stages["b"].uri.startswith("s3://")
    again = PipelineRunner(load_pipeline(path), store_root=s3_uri).run()
    assert {s.status for s in again.stages.values()} == {"cached"}


def test_leases_on_an_object_store(s3_uri, tmp_path):
    """A lease object with an expiry: exclusive while fresh, taken over once stale, and a
    holder that lost it cannot publish."""
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    key = "ab" * 32
    first = store.lease("noop", key, {"run_id": "first"})
    first.settle_s = second_settle = 0.2
    assert first.try_acquire()
    second = store.lease("noop", key, {"run_id": "second"})
    second.settle_s = second_settle
    assert not second.try_acquire() and "run first" in second.describe_holder()
    # the first driver stops its heartbeats (suspended, say), and its lease goes stale: for
    # `second`, once the record is older than its ttl. No beat can land in between.
    first._stop.set()
    first._thread.join()
    second.ttl = 0.5
    wait_until("the first lease's record to be older than the second's ttl (0.5 s)",
               lambda: second.holder()["age_s"] > second.ttl, interval=0.1)
    assert second.try_acquire() and not first.still_held()
    with pytest.raises(RuntimeError, match="no longer holds the key's lease"):
        with store.writer("noop", key, {"stage": "x"}, lease_token=first.token) as out:
            open(f"{out}/a.txt", "w").write("late")
    assert not store.is_complete("noop", key)
    with store.writer("noop", key, {"stage": "x"}, lease_token=second.token) as out:
        open(f"{out}/a.txt", "w").write("on time")
    assert store.is_complete("noop", key)
    second.release()
    assert store.lease("noop", key, {}).holder() is None
