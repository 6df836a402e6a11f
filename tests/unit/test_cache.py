"""Stage keys and the artifact store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator.artifact_store import SUCCESS, ArtifactStore, compute_keys
from orchestrator.loader import load_pipeline

PIPE = """
name: keys
stages:
  a: {workload: noop, params: {value: 1}}
  b: {workload: noop, inputs: {x: a.result}, params: {value: 2}}
  c: {workload: noop, inputs: {x: b.result}}
  d: {workload: noop, params: {value: 4}}
"""


@pytest.fixture
def pipe_path(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(textwrap.dedent(PIPE))
    return path


def keys_for(path, overrides=()):
    return compute_keys(load_pipeline(path, list(overrides)).stages)


def test_keys_are_stable_across_processes(pipe_path):
    here = keys_for(pipe_path)
    code = ("import json,sys; from orchestrator.artifact_store import compute_keys; "
            "from orchestrator.loader import load_pipeline; "
            f"print(json.dumps(compute_keys(load_pipeline({str(pipe_path)!r}).stages)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert len(set(here.values())) == 4


def test_param_change_invalidates_exactly_the_downstream(pipe_path):
    base = keys_for(pipe_path)
    changed = keys_for(pipe_path, ["stages.b.params.value=3"])
    assert {n for n in base if base[n] != changed[n]} == {"b", "c"}
    changed = keys_for(pipe_path, ["stages.a.params.value=7"])
    assert {n for n in base if base[n] != changed[n]} == {"a", "b", "c"}


def test_input_name_is_part_of_the_key(pipe_path, tmp_path):
    text = textwrap.dedent(PIPE).replace("inputs: {x: b.result}", "inputs: {y: b.result}")
    other = tmp_path / "other.yaml"
    other.write_text(text)
    assert keys_for(pipe_path)["c"] != keys_for(other)["c"]


def test_writer_publishes_atomically_and_marks_success_last(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    key = "ab" * 32
    with store.writer("noop", key, {"stage": "s"}) as out:
        open(os.path.join(out, "x.txt"), "w").write("hi")
        assert not store.is_complete("noop", key)
        assert not os.path.exists(store.stage_path("noop", key))
    final = store.stage_path("noop", key)
    assert store.is_complete("noop", key)
    assert open(os.path.join(final, "x.txt")).read() == "hi"
    assert store.read_json("noop", key, "_mmkd.json")["stage"] == "s"
    assert os.listdir(os.path.join(store.base, ".staging")) == []


def test_failed_writer_leaves_nothing_and_keeps_previous_results(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    good, bad = "aa" * 32, "bb" * 32
    with store.writer("noop", good, {}) as out:
        open(os.path.join(out, "keep.txt"), "w").write("1")
    with pytest.raises(RuntimeError):
        with store.writer("noop", bad, {}) as out:
            open(os.path.join(out, "half.txt"), "w").write("partial")
            raise RuntimeError("workload crashed")
    assert not store.is_complete("noop", bad)
    assert not os.path.exists(store.stage_path("noop", bad))
    assert store.is_complete("noop", good)


def test_invalidate_removes_marker_and_dir(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    key = "cc" * 32
    with store.writer("noop", key, {}):
        pass
    assert os.path.exists(os.path.join(store.stage_path("noop", key), SUCCESS))
    store.invalidate("noop", key)
    assert not store.is_complete("noop", key)
    assert not os.path.exists(store.stage_path("noop", key))

