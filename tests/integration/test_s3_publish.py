"""Publishes on an object store (moto S3 on 127.0.0.1) with injected faults (#23 item 3): the
result lives under a version prefix a pointer object names, so an upload that fails mid
``--force`` or a driver killed before the pointer flips leaves the old result current; a torn
download is fetched again; a result changed in the store is refused."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
from moto_server import moto_s3

import orchestrator.artifact_store as cache
from orchestrator.artifact_store import POINTER, ArtifactStore, StoreIntegrityError

KEY = "cd" * 32


@pytest.fixture(scope="module")
def s3_uri(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as uri:
        yield uri


def _publish(store, text, replace=False, key=KEY):
    with store.writer("noop", key, {"stage": "x"}, replace=replace) as out:
        with open(f"{out}/weights.bin", "w") as f:
            f.write(text)
        with open(f"{out}/metrics.json", "w") as f:
            f.write('{"loss": 1.0}')


def _read(store, key=KEY):
    return open(f"{store.local_dir('noop', key)}/weights.bin").read()


def _versions(store, key=KEY):
    infos = store.fs.get_file_info(pafs.FileSelector(store.stage_path("noop", key)))
    return sorted(i.base_name for i in infos)


def test_force_publishes_a_new_version_then_flips_the_pointer(s3_uri, tmp_path):
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    _publish(store, "first")
    first = store.uri("noop", KEY)
    assert "/v-" in first and _read(store) == "first"
    _publish(store, "second", replace=True)
    assert store.uri("noop", KEY) != first and _read(store) == "second"
    names = _versions(store)
    assert names[0] == POINTER and len(names) == 2, names  # the old version is gone


def test_an_upload_failing_mid_force_keeps_the_old_result(s3_uri, tmp_path, monkeypatch):
    key = "e1" * 32
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    _publish(store, "old result", key=key)
    real_copy = pafs.copy_files

    def copy_then_fail(src, dst, **kw):  # part of the new version lands, then the link dies
        real_copy(src, dst, **kw)
        raise OSError("connection reset during upload")

    monkeypatch.setattr(cache.pafs, "copy_files", copy_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        _publish(store, "new result", replace=True, key=key)
    monkeypatch.undo()
    assert store.is_complete("noop", key) and _read(store, key) == "old result"
    _publish(store, "new result", replace=True, key=key)  # the next publish sweeps the orphan
    assert _read(store, key) == "new result" and len(_versions(store, key)) == 2


def test_a_driver_killed_before_the_pointer_flip_leaves_the_old_result(s3_uri, tmp_path,
                                                                       monkeypatch):
    key = "e2" * 32
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    _publish(store, "old result", key=key)

    class Killed(BaseException):
        pass

    def killed(self, final, publish_id):  # the process dies here: uploaded, not yet current
        raise Killed()

    monkeypatch.setattr(ArtifactStore, "_flip_pointer", killed)
    with pytest.raises(Killed):
        _publish(store, "new result", replace=True, key=key)
    monkeypatch.undo()
    reader = ArtifactStore(s3_uri, local_cache=tmp_path / "cache2")
    assert reader.is_complete("noop", key) and _read(reader, key) == "old result"
    assert len(_versions(reader, key)) == 3  # pointer, the current version, the orphan


def test_a_torn_download_is_fetched_again_and_a_changed_result_is_refused(s3_uri, tmp_path):
    key = "e3" * 32
    store = ArtifactStore(s3_uri, local_cache=tmp_path / "cache")
    _publish(store, "0123456789", key=key)
    local = store.local_dir("noop", key)
    with open(f"{local}/weights.bin", "r+") as f:  # a copy cut short (killed, disk full)
        f.truncate(3)
    assert _read(store, key) == "0123456789"  # detected by size, downloaded again
    # the store's copy changes under the manifest: same size, other bytes
    remote = f"{store.result_path('noop', key)}/weights.bin"
    with store.fs.open_output_stream(remote) as f:
        f.write(b"9876543210")
    fresh = ArtifactStore(s3_uri, local_cache=tmp_path / "cache3")
    with pytest.raises(StoreIntegrityError, match="does not match its manifest"):
        fresh.local_dir("noop", key)
    with store.fs.open_output_stream(remote) as f:  # truncated in the store: not a result
        f.write(b"0123")
    assert not fresh.is_complete("noop", key)


def test_credentials_in_values_reach_no_record(ray_session, s3_uri, tmp_path, monkeypatch):
    """Secrets by value (#23 item 6): a store URI with userinfo, a parameter holding a URL with
    a password and a signature, and the value of a secret-named variable inside a parameter;
    after the run, none of them is in the store, the MLflow database, the run record, the
    journal, or the environment stage tasks carry."""
    import textwrap

    import boto3

    from orchestrator.loader import load_pipeline
    from orchestrator.ray_setup import forwarded_env
    from orchestrator.runner import PipelineRunner

    home = tmp_path / "home"
    monkeypatch.setenv("MMKD_HOME", str(home))
    monkeypatch.setenv("MY_SERVICE_TOKEN", "EnvSecretValue456")
    monkeypatch.setenv("MMKD_NOTE", "https://carol:ForwardSecret11@example.org/")
    secrets = ["StoreSecret123", "ParamSecret789", "SigSecret000", "EnvSecretValue456",
               "ForwardSecret11"]
    store = s3_uri.replace("s3://", "s3://testing:StoreSecret123@")
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        name: secrets_pipe
        stages:
          a:
            workload: noop
            params:
              value: 3
              fail_if_exists: https://bob:ParamSecret789@example.org/x?sig=SigSecret000&n=EnvSecretValue456
    """))
    rec = PipelineRunner(load_pipeline(path), store_root=store,
                         tracking_uri=f"sqlite:///{home / 'mlflow.db'}").run()
    assert rec.status == "success", rec.error
    written = [p.read_bytes() for p in home.rglob("*") if p.is_file()]
    endpoint = s3_uri.split("endpoint_override=")[1].split("&")[0]
    s3 = boto3.session.Session().client("s3", endpoint_url=f"http://{endpoint}")
    for obj in s3.list_objects_v2(Bucket="mmkd-test").get("Contents", []):
        written.append(s3.get_object(Bucket="mmkd-test", Key=obj["Key"])["Body"].read())
    written.append(json.dumps(forwarded_env()).encode())
    assert len(written) > 10 and any(b"https://***@example.org/x?sig=***" in w for w in written)
    for secret in secrets:
        hits = sum(w.count(secret.encode()) for w in written)
        assert hits == 0, f"{secret} written {hits} time(s)"
