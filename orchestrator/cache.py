"""Stage keys (content hashes) and the artifact store.

A stage's key is sha256 over what determines its result (``orchestrator.keys``: the code it
runs, library versions, params, upstream keys, resources that change numerics, a fingerprint of
the external files it reads). The same key with a `_SUCCESS` marker means the stage is done: it
is skipped, never retrained.

The store is a directory tree reached through `pyarrow.fs`, so a local path, a shared mount or
an `s3://` URI serve alike. Outputs are written to a staging directory and only become visible
under their key when complete; `_SUCCESS` is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from orchestrator.keys import key_of, library_versions
from orchestrator.lease import Lease
from orchestrator.spec import Stage

SUCCESS = "_SUCCESS"
MANIFEST = "_mmkd.json"


class LeaseLost(RuntimeError):
    """The driver lost a key's lease before its stage could publish."""


def mmkd_home() -> Path:
    """mmkd's working directory: MLflow db, default artifact store, run manifests."""
    return Path(os.environ.get("MMKD_HOME", ".mmkd")).resolve()


def key_parts(stage: Stage, upstream_keys: dict[str, str], external: dict[str, str] | None = None,
              code: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a stage's result depends on (see ``orchestrator.keys``)."""
    r = stage.resources
    resources: dict[str, Any] = {"cpus_per_worker": r.cpus_per_worker,  # sets the thread count
                                 "gpus_per_worker": r.gpus_per_worker}
    if stage.distributed:  # the global batch, sharding and collectives
        resources["num_workers"] = r.num_workers
        resources["deepspeed"] = stage.deepspeed.model_dump(mode="json")
    return {
        "workload": stage.workload,
        "salt": stage.version,
        "code": dict(code or {}),
        "libraries": library_versions(),
        "params": stage.params,
        "inputs": {name: [[upstream_keys[s], out] for s, out in refs]
                   for name, refs in sorted(stage.resolved_inputs.items())},
        "resources": resources,
        "external": dict(external or {}),
    }


def stage_key(stage: Stage, upstream_keys: dict[str, str], external: dict[str, str] | None = None,
              code: dict[str, str] | None = None) -> str:
    return key_of(key_parts(stage, upstream_keys, external, code))


def compute_key_parts(stages: dict[str, Stage], externals: dict[str, dict[str, str]] | None = None,
                      codes: dict[str, dict[str, str]] | None = None
                      ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Keys and key parts of every stage; ``stages`` must be in topological order."""
    keys: dict[str, str] = {}
    parts: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        parts[name] = key_parts(stage, keys, (externals or {}).get(name),
                                (codes or {}).get(name))
        keys[name] = key_of(parts[name])
    return keys, parts


def compute_keys(stages: dict[str, Stage], externals: dict[str, dict[str, str]] | None = None,
                 codes: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Keys for every stage; ``stages`` must be in topological order."""
    return compute_key_parts(stages, externals, codes)[0]


class ArtifactStore:
    def __init__(self, root: str, local_cache: str | os.PathLike | None = None):
        self.root = root
        if "://" in root and not root.startswith("file://"):
            self.fs, self.base = pafs.FileSystem.from_uri(root)
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = os.path.abspath(root.removeprefix("file://"))
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.local_cache = Path(local_cache or mmkd_home() / "cache")

    # -- layout ---------------------------------------------------------------------------
    def stage_path(self, workload: str, key: str) -> str:
        return f"{self.base}/stages/{workload}-{key[:16]}"

    def uri(self, workload: str, key: str) -> str:
        path = self.stage_path(workload, key)
        return path if self.is_local else f"{self.root.split('://')[0]}://{path}"

    def checkpoint_storage(self) -> str:
        """Where in-stage checkpoints live (Ray Train's storage_path)."""
        path = f"{self.base}/checkpoints"
        return path if self.is_local else f"{self.root.split('://')[0]}://{path}"

    # -- queries --------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_complete(self, workload: str, key: str) -> bool:
        return self._exists(f"{self.stage_path(workload, key)}/{SUCCESS}")

    def read_json(self, workload: str, key: str, name: str) -> dict[str, Any] | None:
        path = f"{self.stage_path(workload, key)}/{name}"
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def local_dir(self, workload: str, key: str) -> str:
        """A local directory holding the stage's outputs (downloaded once if remote).

        The download folder is named after the result's publish id: a forced rerun publishes
        a new id, so a reader of the previous copy is never pulled from under (nothing here
        deletes a complete copy)."""
        if self.is_local:
            return self.stage_path(workload, key)
        publish = (self.read_json(workload, key, MANIFEST) or {}).get("publish_id", "0")
        local = self.local_cache / f"{workload}-{key[:16]}-{publish}"
        if not (local / SUCCESS).exists():
            self.local_cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.local_cache, prefix=".dl-"))
            try:
                (tmp / "d").mkdir()
                pafs.copy_files(self.stage_path(workload, key), str(tmp / "d"),
                                source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                try:
                    os.rename(tmp / "d", local)
                except OSError:  # another stage downloaded it meanwhile: use that copy
                    if not (local / SUCCESS).exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(local)

    # -- leases ---------------------------------------------------------------------------
    def lease(self, workload: str, key: str, owner: dict[str, Any]) -> Lease:
        return Lease(self.fs, self.base, f"{workload}-{key[:16]}", owner, local=self.is_local)

    def lease_token(self, workload: str, key: str) -> str | None:
        record = self.lease(workload, key, {}).holder()
        return record.get("token") if record else None

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def writer(self, workload: str, key: str, manifest: dict[str, Any],
               lease_token: str | None = None, replace: bool = False) -> Iterator[str]:
        """Yield a fresh local staging dir; on success publish it under the key atomically.

        ``lease_token``: publish only while that lease holds the key (else LeaseLost).
        ``replace`` (``--force``): the new result replaces a complete one; until the stage has
        succeeded the previous result stays untouched."""
        if self.is_local:
            staging_root = Path(self.base) / ".staging"
        else:
            staging_root = self.local_cache / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = staging_root / f"{workload}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield str(staging)
            self._commit(staging, workload, key, manifest, lease_token, replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, workload: str, key: str, manifest: dict[str, Any],
                lease_token: str | None = None, replace: bool = False) -> None:
        (staging / MANIFEST).write_text(json.dumps(
            {"key": key, "workload": workload, "publish_id": uuid.uuid4().hex[:12], **manifest},
            indent=2, default=str))
        if lease_token is not None and self.lease_token(workload, key) != lease_token:
            raise LeaseLost(
                f"{workload}-{key[:16]}: this run no longer holds the key's lease (another "
                f"driver took it over after this one missed its heartbeats); the result was "
                f"not published")
        final = self.stage_path(workload, key)
        complete = self.is_complete(workload, key)
        if complete and not replace:
            return  # another run produced the same key meanwhile; keep the first
        if self.is_local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            old = None
            if self._exists(final):  # a result being replaced, or leftovers of a crash
                old = f"{final}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            os.replace(staging, final)
            with open(f"{final}/{SUCCESS}", "wb"):
                pass
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        # Object stores cannot rename a folder: the old result goes only now, after the new
        # one was computed, marker first so no reader takes the folder while it changes.
        if complete:
            self.fs.delete_file(f"{final}/{SUCCESS}")
        if self._exists(final):
            self.fs.delete_dir(final)
        pafs.copy_files(str(staging), final, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{SUCCESS}") as f:
            f.write(b"")

    # -- why a key is not cached ------------------------------------------------------------
    def _index_path(self, pipeline: str, stage: str) -> str:
        return f"{self.base}/index/{pipeline}/{stage}.json"

    def read_index(self, pipeline: str, stage: str) -> dict[str, Any] | None:
        """Key and key parts of the last result this pipeline's stage used."""
        path = self._index_path(pipeline, stage)
        try:
            if not self._exists(path):
                return None
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None

    def write_index(self, pipeline: str, stage: str, key: str, parts: dict[str, Any]) -> None:
        path = self._index_path(pipeline, stage)
        self.fs.create_dir(os.path.dirname(path), recursive=True)
        blob = json.dumps({"key": key, "parts": parts}, default=str).encode()
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(blob)
        self.fs.move(tmp, path)

    def invalidate(self, workload: str, key: str) -> None:
        """Forget a stage's result (``--force``): marker first, so no reader sees half a dir."""
        final = self.stage_path(workload, key)
        if self._exists(f"{final}/{SUCCESS}"):
            self.fs.delete_file(f"{final}/{SUCCESS}")
        if self._exists(final):
            self.fs.delete_dir(final)
