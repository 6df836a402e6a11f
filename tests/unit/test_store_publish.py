"""Publishes that cannot lose a result, on a local store (#23 item 3): a manifest with every
file's size and sha256, a truncated file under ``_SUCCESS`` makes the result incomplete, a
failing ``--force`` keeps the old result, leftovers of dead writers are swept."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from orchestrator.artifact_store import MANIFEST, SUCCESS, ArtifactStore, sweep_local

KEY = "ab" * 32


def _publish(store, text, replace=False, fail=False):
    with store.writer("noop", KEY, {"stage": "x"}, replace=replace) as out:
        os.makedirs(f"{out}/model")
        with open(f"{out}/model/weights.bin", "w") as f:
            f.write(text)
        if fail:
            raise RuntimeError("the stage failed")


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _publish(store, "0123456789")
    folder = store.stage_path("noop", KEY)
    manifest = json.loads(open(f"{folder}/{MANIFEST}").read())
    assert manifest["files"] == {"model/weights.bin": {
        "size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}}
    assert store.is_complete("noop", KEY)


def test_a_truncated_file_under_success_is_not_a_result(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "store"))
    _publish(store, "0123456789")
    weights = f"{store.stage_path('noop', KEY)}/model/weights.bin"
    with open(weights, "r+") as f:  # what a power loss after _SUCCESS can leave
        f.truncate(4)
    with caplog.at_level("WARNING", logger="mmkd"):
        assert not store.is_complete("noop", KEY)
    assert "4 bytes, the manifest says 10" in caplog.text
    _publish(store, "abcdefghij")  # the stage runs again and its result replaces the damage
    assert store.is_complete("noop", KEY)
    assert open(weights).read() == "abcdefghij"


def test_a_failing_force_keeps_the_old_result(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    _publish(store, "old result")
    with pytest.raises(RuntimeError, match="the stage failed"):
        _publish(store, "new", replace=True, fail=True)
    assert store.is_complete("noop", KEY)
    assert open(f"{store.stage_path('noop', KEY)}/model/weights.bin").read() == "old result"
    _publish(store, "new result", replace=True)
    assert open(f"{store.stage_path('noop', KEY)}/model/weights.bin").read() == "new result"
    assert not [p for p in os.listdir(os.path.dirname(store.stage_path("noop", KEY)))
                if ".old" in p]


def test_leftovers_of_a_dead_writer_are_swept(tmp_path):
    """A staging folder owned by a process that is gone goes at the next publish; one owned by
    a live process (a stage still running) stays."""
    store = ArtifactStore(str(tmp_path / "store"))
    staging = tmp_path / "store" / ".staging"
    staging.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket

    host = socket.gethostname()
    (staging / f"noop-aaaa@{host}.{dead}@1234").mkdir()
    (staging / f"noop-bbbb@{host}.{os.getpid()}@5678").mkdir()
    _publish(store, "x")
    assert sorted(p.name for p in staging.iterdir()) == [f"noop-bbbb@{host}.{os.getpid()}@5678"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".dl-@{host}.{dead}@x").mkdir()
    assert sweep_local(cache, ".dl-") == [str(cache / f".dl-@{host}.{dead}@x")]


def test_disk_full_while_publishing_names_the_path_and_publishes_nothing(tmp_path, monkeypatch):
    import errno

    import orchestrator.artifact_store as cache

    store = ArtifactStore(str(tmp_path / "store"))
    _publish(store, "old")

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "file_digests", full)
    with pytest.raises(OSError, match="disk full at .*staging.*nothing already published"):
        _publish(store, "new", replace=True)
    assert open(f"{store.stage_path('noop', KEY)}/model/weights.bin").read() == "old"
    assert os.path.exists(f"{store.stage_path('noop', KEY)}/{SUCCESS}")


def test_headline_artifacts_outside_the_stage_folder_are_not_logged(tmp_path):
    """A result's headline.json naming `../../secret` (or an absolute path) logs nothing from
    outside the stage's folder onto MLflow; its own files are logged."""
    import types

    from mlflow.tracking import MlflowClient

    from orchestrator.plugin import HEADLINE_FILE
    from orchestrator.stage_outcomes import StageOutcomes
    from orchestrator.tracking import PIPELINE, Tracker

    (tmp_path / "secret.txt").write_text("not yours")
    store = ArtifactStore(str(tmp_path / "store"))
    with store.writer("noop", KEY, {"stage": "x"}) as out:
        open(f"{out}/table.md", "w").write("| a |")
        json.dump({"metrics": {"acc": 0.5}, "artifacts": [
            "table.md", "../../../secret.txt", str(tmp_path / "secret.txt")]},
            open(f"{out}/{HEADLINE_FILE}", "w"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("p", tmp_path / "journal.jsonl", uri=uri)
    tracker.start_pipeline("p · test", params={}, tags={})
    runner = types.SimpleNamespace(
        store=store, tracker=tracker,
        record=types.SimpleNamespace(stages={"s": types.SimpleNamespace(workload="noop",
                                                                        key=KEY)}))
    StageOutcomes._headline(runner, "s")
    logged = [a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id(PIPELINE), "s")]
    assert logged == ["s/table.md"]
