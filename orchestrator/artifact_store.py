"""The artifact store: where stage results live, under their keys.

A stage's key is sha256 over what determines its result (``orchestrator.keys``: the code it
runs, library versions, params, upstream keys, resources that change numerics, a fingerprint of
the external files it reads). The same key with a `_SUCCESS` marker means the stage is done: it
is skipped, never retrained.

The store is a directory tree reached through `pyarrow.fs`, so a local path, a shared mount or
an `s3://` URI serve alike. Outputs are written to a staging directory and only become visible
under their key when complete; `_SUCCESS` is written last. Nothing a publish does can lose the
result it replaces:

- ``_mmkd.json`` lists every file's size and sha256. Readers check the sizes whenever they ask
  whether a key is complete (a truncated file under ``_SUCCESS``, e.g. after a power loss, makes
  the result incomplete: it is recomputed, with a warning), and the hashes of every download.
- Local store: every file and folder is fsynced before ``_SUCCESS``; the finished folder replaces
  an old one by rename (old renamed away first, removed last).
- Object stores cannot rename a folder: a result lives under ``<key>/v-<publish id>/`` and the
  small pointer object ``<key>/_CURRENT.json`` names the current one. A publish uploads the new
  version beside the old, flips the pointer (one PUT), then removes the old version; an upload
  that fails, or a driver killed before the flip, leaves the old result current. Results of
  older mmkd versions (files straight under ``<key>/``) are still read.
- A download lands in a temporary folder, is checked against the manifest and only then moved
  into the cache; a cached copy whose sizes no longer match is fetched again.
- Leftovers of crashed writers and downloads (``.staging/*``, ``.dl-*``, ``*.old-*``, orphaned
  versions) are swept when their owner process is gone (or, for a store shared by hosts, when
  they are old).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from orchestrator.keys import key_of, library_versions
from orchestrator.lease import Lease
from orchestrator.spec import Stage
from orchestrator.store_files import (MANIFEST, SUCCESS, StoreIntegrityError, digest_mismatch,
                                      disk_error, file_digests, fsync_dir, fsync_tree,
                                      local_sizes, owner_tag, size_mismatch, sweep_local)

__all__ = ["ArtifactStore", "LeaseLost", "StoreIntegrityError", "SUCCESS", "MANIFEST",
           "POINTER", "mmkd_home", "stage_key", "compute_keys", "compute_key_parts",
           "key_parts", "sweep_local"]

POINTER = "_CURRENT.json"  # object stores: which version of a key's result is current

logger = logging.getLogger("mmkd")


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
        self._matched: set[tuple[str, str]] = set()  # (result path, publish id) sizes checked

    # -- layout ---------------------------------------------------------------------------
    def stage_path(self, workload: str, key: str) -> str:
        return f"{self.base}/stages/{workload}-{key[:16]}"

    def checkpoint_storage(self) -> str:
        """Where in-stage checkpoints live (Ray Train's storage_path)."""
        path = f"{self.base}/checkpoints"
        return path if self.is_local else f"{self.root.split('://')[0]}://{path}"

    # -- queries --------------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_json_at(self, path: str) -> dict[str, Any] | None:
        try:
            if not self._exists(path):
                return None
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None

    def result_path(self, workload: str, key: str) -> str:
        """The folder holding the key's current result (it may not be complete): the key's
        folder in a local store; on an object store the version its pointer names, or the key's
        folder itself for a result published by an older mmkd."""
        final = self.stage_path(workload, key)
        if self.is_local:
            return final
        pointer = self._read_json_at(f"{final}/{POINTER}")
        if pointer and isinstance(pointer.get("publish_id"), str):
            return f"{final}/v-{pointer['publish_id']}"
        return final

    def _sizes(self, path: str) -> dict[str, int]:
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return {os.path.relpath(i.path, path): i.size for i in infos
                if i.type == pafs.FileType.File}

    def damage(self, workload: str, key: str) -> str | None:
        """Why the key's published files do not match its manifest, or None (no manifest
        file list, as written by an older mmkd, counts as matching). A publish whose sizes
        matched once is not listed again by this store object (the runner asks for every
        waiting stage twice a second)."""
        path = self.result_path(workload, key)
        manifest = self._read_json_at(f"{path}/{MANIFEST}") or {}
        seen = (path, manifest.get("publish_id"))
        if seen in self._matched:
            return None
        problem = size_mismatch(manifest.get("files"), self._sizes(path), path)
        if problem is None and seen[1]:
            self._matched.add(seen)
        return problem

    def is_complete(self, workload: str, key: str) -> bool:
        path = self.result_path(workload, key)
        if not self._exists(f"{path}/{SUCCESS}"):
            return False
        damage = self.damage(workload, key)
        if damage:
            logger.warning("the stored result of %s-%s is damaged (%s): it is not used and "
                           "will be computed again", workload, key[:16], damage)
            return False
        return True

    def read_json(self, workload: str, key: str, name: str) -> dict[str, Any] | None:
        path = f"{self.result_path(workload, key)}/{name}"
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def uri(self, workload: str, key: str) -> str:
        path = self.result_path(workload, key)
        return path if self.is_local else f"{self.root.split('://')[0]}://{path}"

    def local_dir(self, workload: str, key: str) -> str:
        """A local directory holding the stage's outputs (downloaded once if remote).

        The download folder is named after the result's publish id: a forced rerun publishes
        a new id, so a reader of the previous copy is never pulled from under (nothing here
        deletes a complete copy). A download is checked against the manifest (sizes and
        sha256) before it is used; a torn one is fetched again."""
        if self.is_local:
            return self.stage_path(workload, key)
        self.local_cache.mkdir(parents=True, exist_ok=True)
        sweep_local(self.local_cache, ".dl-")
        for attempt in range(3):
            path = self.result_path(workload, key)
            manifest = self._read_json_at(f"{path}/{MANIFEST}") or {}
            publish = manifest.get("publish_id", "0")
            local = self.local_cache / f"{workload}-{key[:16]}-{publish}"
            files = manifest.get("files")
            if (local / SUCCESS).exists():
                if not size_mismatch(files, local_sizes(local), str(local)):
                    return str(local)
                shutil.rmtree(local, ignore_errors=True)  # a damaged copy: fetch it again
            tmp = Path(tempfile.mkdtemp(dir=self.local_cache, prefix=f".dl-@{owner_tag()}@"))
            try:
                (tmp / "d").mkdir()
                pafs.copy_files(path, str(tmp / "d"), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                problem = digest_mismatch(files, tmp / "d") if files is not None else None
                if problem is None and not (tmp / "d" / SUCCESS).exists():
                    problem = f"{SUCCESS} missing"
                if problem:
                    logger.warning("download of %s was torn (%s); fetching it again", path,
                                   problem)
                    continue
                try:
                    os.rename(tmp / "d", local)
                except OSError:  # another stage downloaded it meanwhile: use that copy
                    if not (local / SUCCESS).exists():
                        raise
                return str(local)
            except FileNotFoundError:  # the version was replaced while we copied it
                continue
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise StoreIntegrityError(
            f"{workload}-{key[:16]}: the stored result at {self.uri(workload, key)} does not "
            f"match its manifest after 3 downloads (files changed or truncated in the store); "
            f"rerun the stage that produced it with --force")

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
        ``replace`` (``--force``): the new result replaces a complete one; until the new one is
        published the previous result stays untouched (and stays if publishing fails)."""
        if self.is_local:
            staging_root = Path(self.base) / ".staging"
        else:
            staging_root = self.local_cache / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        sweep_local(staging_root)
        staging = staging_root / f"{workload}-{key[:16]}@{owner_tag()}@{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield str(staging)
            self._commit(staging, workload, key, manifest, lease_token, replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, workload: str, key: str, manifest: dict[str, Any],
                lease_token: str | None = None, replace: bool = False) -> None:
        publish_id = uuid.uuid4().hex[:12]
        try:
            (staging / MANIFEST).write_text(json.dumps(
                {"key": key, "workload": workload, "publish_id": publish_id, **manifest,
                 "files": file_digests(staging)}, indent=2, default=str))
            if self.is_local:
                fsync_tree(staging)
        except OSError as e:
            raise disk_error(e, staging) from e
        if lease_token is not None and self.lease_token(workload, key) != lease_token:
            raise LeaseLost(
                f"{workload}-{key[:16]}: this run no longer holds the key's lease (another "
                f"driver took it over after this one missed its heartbeats); the result was "
                f"not published")
        final = self.stage_path(workload, key)
        if self.is_complete(workload, key) and not replace:
            return  # another run produced the same key meanwhile; keep the first
        if self.is_local:
            self._commit_local(staging, final)
        else:
            self._commit_object(staging, final, publish_id)

    def _commit_local(self, staging: Path, final: str) -> None:
        parent = Path(final).parent
        parent.mkdir(parents=True, exist_ok=True)
        sweep_local(parent, Path(final).name + ".old")
        old = None
        if self._exists(final):  # a result being replaced, or leftovers of a crash
            old = f"{final}.old@{owner_tag()}@{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.replace(staging, final)
        with open(f"{final}/{SUCCESS}", "wb") as f:
            os.fsync(f.fileno())
        fsync_dir(final)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _commit_object(self, staging: Path, final: str, publish_id: str) -> None:
        version = f"{final}/v-{publish_id}"
        pafs.copy_files(str(staging), version, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{version}/{SUCCESS}") as f:
            f.write(b"")
        self._flip_pointer(final, publish_id)
        self._remove_other_versions(final, keep=f"v-{publish_id}")

    def _flip_pointer(self, final: str, publish_id: str) -> None:
        """One PUT of a small object: before it the old result is current, after it the new."""
        with self.fs.open_output_stream(f"{final}/{POINTER}") as f:
            f.write(json.dumps({"publish_id": publish_id, "time": time.time()}).encode())

    def _remove_other_versions(self, final: str, keep: str) -> None:
        """Everything in the key's folder but the pointer and the current version: the
        replaced version, orphans of failed publishes, an older mmkd's flat layout (marker
        first, so no reader takes it while it goes)."""
        infos = self.fs.get_file_info(pafs.FileSelector(final, recursive=False))
        flat = [i for i in infos if i.base_name not in (POINTER, keep)
                and not i.base_name.startswith("v-")]
        if any(i.base_name == SUCCESS for i in flat):
            self.fs.delete_file(f"{final}/{SUCCESS}")
        for info in infos:
            if info.base_name in (POINTER, keep, SUCCESS):
                continue
            try:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
            except OSError as e:  # swept again at the next publish of this key
                logger.warning("could not remove %s: %s", info.path, e)

    # -- why a key is not cached ------------------------------------------------------------
    def _index_path(self, pipeline: str, stage: str) -> str:
        return f"{self.base}/index/{pipeline}/{stage}.json"

    def read_index(self, pipeline: str, stage: str) -> dict[str, Any] | None:
        """Key and key parts of the last result this pipeline's stage used."""
        return self._read_json_at(self._index_path(pipeline, stage))

    def write_index(self, pipeline: str, stage: str, key: str, parts: dict[str, Any]) -> None:
        path = self._index_path(pipeline, stage)
        self.fs.create_dir(os.path.dirname(path), recursive=True)
        from orchestrator.secret_env import redact

        blob = json.dumps({"key": key, "parts": redact(parts)}, default=str).encode()
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(blob)
        self.fs.move(tmp, path)

    def invalidate(self, workload: str, key: str) -> None:
        """Forget a stage's result: pointer or marker first, so no reader sees half a dir."""
        final = self.stage_path(workload, key)
        for marker in (POINTER, SUCCESS):
            if self._exists(f"{final}/{marker}"):
                self.fs.delete_file(f"{final}/{marker}")
        if self._exists(final):
            self.fs.delete_dir(final)
