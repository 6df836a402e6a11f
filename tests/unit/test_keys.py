"""Stage keys derive from code, libraries, resources and input files; YAML aliases never share
state; leases hand a key to one driver and free it when that driver dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.keys import code_fingerprint, explain_change
from orchestrator.lease import Lease
from orchestrator.plan import pipeline_keys
from orchestrator.loader import load_pipeline
from orchestrator.spec import PipelineError

ROOT = Path(__file__).resolve().parents[2]


def test_set_on_an_anchored_stage_changes_only_that_stage():
    # llava_kd.yaml: student_sft and baseline_sft share `<<: *sft`
    base, _ = pipeline_keys(load_pipeline(ROOT / "pipelines/llava_kd.yaml"), offline=True)
    pipe = load_pipeline(ROOT / "pipelines/llava_kd.yaml", ["stages.student_sft.params.lr=0.005"])
    assert pipe.stages["baseline_sft"].params["lr"] != 0.005
    keys, _ = pipeline_keys(pipe, offline=True)
    changed = {n for n in base if base[n] != keys[n]}
    assert changed == {"student_sft", "student_dft", "evaluate"}


def _write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_billion_laughs_and_recursive_aliases_are_rejected(tmp_path):
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = _write(tmp_path, "\n".join(rows) + "\nname: x\nstages: {s: {workload: noop}}\n")
    start = time.monotonic()
    with pytest.raises(PipelineError, match="expands to more than"):
        load_pipeline(path)
    assert time.monotonic() - start < 10
    path = _write(tmp_path, "name: x\nstages: &s\n  a: {workload: noop, inputs: *s}\n")
    with pytest.raises(PipelineError, match="recursive"):
        load_pipeline(path)


def test_code_fingerprint_follows_imports_within_the_package():
    found = code_fingerprint("workloads.merge")
    assert "workloads.merge" in found and "workloads.merging.registry" in found
    # the merging package imports its method files by scanning its folder: all of them count
    assert {"workloads.merging.ties", "workloads.merging.dare"} <= set(found)
    assert not any(m.startswith(("orchestrator", "torch")) for m in found)


def test_parsed_modules_are_remembered_by_their_bytes_and_never_stale(tmp_path, monkeypatch):
    """``code_fingerprint`` with a cache: the same hashes as parsing every module, read back
    without parsing; a module whose source changed is parsed again; a damaged entry is parsed
    again too."""
    import ast

    import orchestrator.keys as keys

    pkg = tmp_path / "mmkdcachepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mmkdcachepkg import b\n\ndef f():\n    return 1\n")
    (pkg / "b.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cache = tmp_path / "code_cache"
    plain = code_fingerprint("mmkdcachepkg.a")
    keys._module_summary.cache_clear()
    assert code_fingerprint("mmkdcachepkg.a", cache) == plain
    entries = sorted(cache.rglob("*.json"))
    assert len(entries) == 3  # __init__, a, b

    def no_parse(*args, **kw):
        raise AssertionError("parsed although remembered")

    keys._module_summary.cache_clear()  # as a new process
    monkeypatch.setattr(ast, "parse", no_parse)
    assert code_fingerprint("mmkdcachepkg.a", cache) == plain
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path))

    (pkg / "b.py").write_text("X = 2\n")  # an edit: new bytes, a new entry, a new hash
    keys._module_summary.cache_clear()
    edited = code_fingerprint("mmkdcachepkg.a", cache)
    assert edited["mmkdcachepkg.b"] != plain["mmkdcachepkg.b"]
    assert edited["mmkdcachepkg.a"] == plain["mmkdcachepkg.a"]
    keys._module_summary.cache_clear()
    assert edited == code_fingerprint("mmkdcachepkg.a")
    for entry in cache.rglob("*.json"):
        entry.write_text("{not json")
    keys._module_summary.cache_clear()
    assert code_fingerprint("mmkdcachepkg.a", cache) == edited


def _keys_in_copy(copy: Path, pipeline: str, offline: bool = True, overrides=()) -> dict:
    """Keys (and key parts) as a new `mmkd` process computes them, in project folder ``copy``."""
    code = ("import json; from orchestrator.plan import pipeline_keys; "
            "from orchestrator.loader import load_pipeline; "
            f"k, p = pipeline_keys(load_pipeline({pipeline!r}, {list(overrides)!r}), {offline}); "
            "print(json.dumps(k if " + str(offline) + " else [k, p]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editing_a_function_body_changes_that_stage_and_its_downstream_only(tmp_path):
    copy = tmp_path / "project"
    for part in ("orchestrator", "workloads", "pipelines"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = str(copy / "pipelines/llava_kd.yaml")
    before = _keys_in_copy(copy, pipeline)
    module = copy / "workloads/distill_loss.py"  # the distill workload's loss strategy
    text = module.read_text()
    edited = text.replace("    def setup(self", "    def unused(self):\n        return 1\n\n"
                                                  "    def setup(self", 1)
    assert edited != text
    module.write_text(edited)
    after = _keys_in_copy(copy, pipeline)
    # the distill stages and everything downstream of them; nothing else
    pipe = load_pipeline(pipeline)
    distill = {n for n, s in pipe.stages.items() if s.workload == "distill"}
    assert distill == {"student_dpt", "student_dft"}
    assert {n for n in before if before[n] != after[n]} == pipe.downstream_of(distill)
    assert before["teacher_sft"] == after["teacher_sft"]
    # a comment is not code
    module.write_text(edited + "\n# a comment\n")
    assert _keys_in_copy(copy, pipeline) == after


def test_touching_an_image_under_image_root_changes_the_key(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "data" / "train.json").write_text(json.dumps(
        [{"id": "1", "image": "a.png", "conversations": conv}]))
    path = _write(tmp_path, f"""
        name: llava_folder
        stages:
          sft:
            workload: sft
            params:
              model: {{preset: tiny-student}}
              data: {{format: llava_json, paths: {tmp_path / 'data' / 'train.json'},
                      image_root: {images}}}
              max_steps: 1
    """)
    keys, parts = _keys_in_copy(ROOT, str(path), offline=False)
    assert _keys_in_copy(ROOT, str(path), offline=False)[0] == keys  # nothing changed yet
    st = os.stat(images / "a.png")
    os.utime(images / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again, again_parts = _keys_in_copy(ROOT, str(path), offline=False)
    assert again["sft"] != keys["sft"]
    assert explain_change(parts["sft"], again_parts["sft"]) == "files of data changed"
    # and the thread count is part of the key
    more, _ = _keys_in_copy(ROOT, str(path), offline=False,
                            overrides=["stages.sft.resources.cpus_per_worker=2"])
    assert more["sft"] != again["sft"]


def test_explain_change_names_params_libraries_and_upstream():
    old = {"workload": "sft", "code": {"m": "1"}, "params": {"lr": 0.001, "opt": {"b": 1}},
           "libraries": {"torch": "2.12.0"}, "inputs": {"init": [["k1", "model"]]}}
    new = {"workload": "sft", "code": {"m": "2"}, "params": {"lr": 0.005, "opt": {"b": 1}},
           "libraries": {"torch": "2.13.0"}, "inputs": {"init": [["k2", "model"]]}}
    text = explain_change(old, new, {"init": ["student_pt"]})
    assert text == ("code changed: m; params.lr 0.001 -> 0.005; torch \"2.12.0\" -> \"2.13.0\"; "
                    "upstream student_pt changed")


# -- leases ----------------------------------------------------------------------------------

def _lease(tmp_path, ttl=60.0, run="r"):
    import pyarrow.fs as pafs

    return Lease(pafs.LocalFileSystem(), str(tmp_path), "stage-abc", {"run_id": run},
                 local=True, ttl=ttl)


def test_a_lease_is_exclusive_and_released(tmp_path):
    a, b = _lease(tmp_path, run="a"), _lease(tmp_path, run="b")
    assert a.try_acquire() and not b.try_acquire()
    assert "run a" in b.describe_holder()
    a.release()
    assert b.try_acquire() and b.still_held()


def test_a_sigkilled_holder_frees_the_lease_at_once(tmp_path):
    code = ("import sys, time, pyarrow.fs as f; from orchestrator.lease import Lease; "
            f"l = Lease(f.LocalFileSystem(), {str(tmp_path)!r}, 'stage-abc', {{}}, local=True); "
            "assert l.try_acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert not _lease(tmp_path).try_acquire()  # its owner is alive
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _lease(tmp_path).try_acquire()


def test_a_lease_of_another_host_expires_after_its_ttl(tmp_path):
    (tmp_path / "leases").mkdir()
    path = tmp_path / "leases" / "stage-abc.lease"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "run_id": "o"}))
    assert not _lease(tmp_path, ttl=30).try_acquire()  # fresh: its owner may be alive
    old = time.time() - 31
    os.utime(path, (old, old))
    lease = _lease(tmp_path, ttl=30)
    assert lease.try_acquire() and json.loads(path.read_text())["token"] == lease.token


def _race_worker(root: str, barrier, results, reps: int) -> None:
    import pyarrow.fs as pafs

    for rep in range(reps):
        barrier.wait()  # the stale lease is in place
        lease = Lease(pafs.LocalFileSystem(), root, "stage-abc", {"run_id": f"r{rep}"},
                      local=True, ttl=30, keep_alive=False)
        results.put((rep, lease.try_acquire(), lease.token))
        barrier.wait()  # everyone tried; the parent checks and plants the next stale lease


def test_drivers_racing_for_a_stale_lease_never_both_win(tmp_path):
    """4 processes take over the same stale lease at once, 200 times: exactly one wins each
    time, and the file on disk is the winner's (before the takeover lock, a slow taker could
    rename away the fresh lease of a fast one, and both trained into one folder)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n, reps = 4, 200
    barrier, results = ctx.Barrier(n + 1, timeout=120), ctx.Queue()
    (tmp_path / "leases").mkdir()
    path = tmp_path / "leases" / "stage-abc.lease"

    def plant():
        path.unlink(missing_ok=True)
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "dead"}))
        old = time.time() - 3600
        os.utime(path, (old, old))

    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, results, reps))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for rep in range(reps):
            plant()
            barrier.wait()
            barrier.wait()
            got = [results.get(timeout=60) for _ in range(n)]
            winners = [token for r, won, token in got if won]
            assert all(r == rep for r, _, _ in got)
            assert len(winners) == 1, f"repetition {rep}: {len(winners)} drivers hold the lease"
            assert json.loads(path.read_text())["token"] == winners[0]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _hung_mlflow_server():
    """An HTTP server that answers ``/health`` (so the driver connects) and then never
    answers an API call: an MLflow server hung mid-run. Returns (port, stop)."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            request = conn.recv(65536)
            if request.startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                conn.close()
            else:
                held.append(conn)  # read, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join()
        for c in held:
            c.close()
        sock.close()

    return sock.getsockname()[1], close


def test_a_hung_mlflow_server_slows_the_driver_but_never_costs_its_lease(tmp_path,
                                                                         monkeypatch):
    """A real MLflow client against a server that stops answering: the driver's tracking call
    ends within the bound mmkd sets on MLflow's requests (timeout x attempts), much longer than
    the lease's ttl, the call is journaled for `mmkd relog`, and through all of it the lease
    stays fresh: another driver cannot take the stage."""
    from orchestrator.tracking import Tracker

    # the same knobs mmkd bounds (orchestrator/tracking.py), smaller so the test is short
    timeout_s, retries = 4, 1
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    port, close = _hung_mlflow_server()
    holder = _lease(tmp_path, ttl=4.0, run="a")  # beats every 1 s; the hang lasts ~8 s
    assert holder.try_acquire()
    journal = tmp_path / "run" / "tracking_journal.jsonl"
    try:
        tracker = Tracker("hung", journal, uri=f"http://127.0.0.1:{port}")
        t0 = time.monotonic()
        tracker.start_pipeline("hung · seed 0", {"seed": 0}, {})
        took = time.monotonic() - t0
        bound = (retries + 1) * (timeout_s + 5)  # every attempt times out; 5 s slack each
        assert holder.ttl < took < bound, (took, bound)
        assert not tracker.online and "Timeout" in tracker.offline_reason, tracker.offline_reason
        assert json.loads(journal.read_text().splitlines()[0])["op"] == "start_pipeline"
        other = Lease(holder.fs, str(tmp_path), "stage-abc", {"run_id": "b"}, local=True,
                      ttl=4.0, keep_alive=False)
        other.owner["host"] = "elsewhere"
        assert not other.try_acquire(), "the lease went stale while MLflow hung"
        assert holder.still_held()
    finally:
        holder.release()
        close()


def test_a_driver_stuck_in_a_slow_call_keeps_its_lease(tmp_path):
    """Heartbeats run on the lease's own thread: while this (driver) thread makes no call for
    longer than the ttl (as when a hung MLflow server blocks the driver loop) the lease is
    refreshed, and another driver cannot take it."""
    holder = _lease(tmp_path, ttl=4.0, run="a")
    assert holder.try_acquire()
    path = tmp_path / "leases" / "stage-abc.lease"
    try:
        beats, last = 0, path.stat().st_mtime
        deadline = time.monotonic() + 60
        while beats < 5:  # 5 beats = 1.25 ttl without a call from this thread
            assert time.monotonic() < deadline, f"only {beats} heartbeats within 60 s"
            time.sleep(0.05)
            if path.stat().st_mtime != last:
                beats, last = beats + 1, path.stat().st_mtime
        other = Lease(holder.fs, str(tmp_path), "stage-abc", {"run_id": "b"}, local=True,
                      ttl=4.0, keep_alive=False)
        other.owner["host"] = "elsewhere"
        assert not other.try_acquire()
        assert holder.heartbeat() and holder.still_held()
    finally:
        holder.release()
    assert not path.exists()
