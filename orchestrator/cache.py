"""Stage keys (content hashes) and the artifact store.

A stage's key is sha256 over what determines its result: workload name and version, resolved
params, upstream keys, the fingerprint of external data it reads and, for distributed stages,
the worker count and DeepSpeed settings (they change the global batch and numerics). The same
key with a `_SUCCESS` marker means the stage is done: it is skipped, never retrained.

The store is a directory tree reached through `pyarrow.fs`, so a local path, a shared mount or
an `s3://` URI serve alike. Outputs are written to a staging directory and only become visible
under their key when complete; `_SUCCESS` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from orchestrator.spec import Stage

SUCCESS = "_SUCCESS"
MANIFEST = "_mmkd.json"


def mmkd_home() -> Path:
    """mmkd's working directory: MLflow db, default artifact store, run manifests."""
    return Path(os.environ.get("MMKD_HOME", ".mmkd")).resolve()


def stage_key(stage: Stage, upstream_keys: dict[str, str], fingerprint: str = "") -> str:
    payload: dict[str, Any] = {
        "workload": stage.workload,
        "version": stage.version,
        "params": stage.params,
        "inputs": {name: [[upstream_keys[s], out] for s, out in refs]
                   for name, refs in sorted(stage.resolved_inputs.items())},
        "fingerprint": fingerprint,
    }
    if stage.distributed:
        payload["num_workers"] = stage.resources.num_workers
        payload["deepspeed"] = stage.deepspeed.model_dump(mode="json")
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def compute_keys(stages: dict[str, Stage], fingerprints: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """Keys for every stage; ``stages`` must be in topological order."""
    keys: dict[str, str] = {}
    for name, stage in stages.items():
        keys[name] = stage_key(stage, keys, (fingerprints or {}).get(name, ""))
    return keys


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
        """A local directory holding the stage's outputs (downloaded once if remote)."""
        if self.is_local:
            return self.stage_path(workload, key)
        local = self.local_cache / f"{workload}-{key[:16]}"
        if not (local / SUCCESS).exists():
            self.local_cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.local_cache, prefix=".dl-"))
            (tmp / "d").mkdir()
            pafs.copy_files(self.stage_path(workload, key), str(tmp / "d"),
                            source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp / "d", local)
            shutil.rmtree(tmp, ignore_errors=True)
        return str(local)

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def writer(self, workload: str, key: str, manifest: dict[str, Any]) -> Iterator[str]:
        """Yield a fresh local staging dir; on success publish it under the key atomically."""
        if self.is_local:
            staging_root = Path(self.base) / ".staging"
        else:
            staging_root = self.local_cache / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = staging_root / f"{workload}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield str(staging)
            self._commit(staging, workload, key, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, workload: str, key: str, manifest: dict[str, Any]) -> None:
        (staging / MANIFEST).write_text(json.dumps({"key": key, "workload": workload,
                                                    **manifest}, indent=2, default=str))
        final = self.stage_path(workload, key)
        if self.is_complete(workload, key):
            return  # another run produced the same key meanwhile; keep the first
        if self._exists(final):
            self.fs.delete_dir(final)  # leftovers of an interrupted commit, never complete
        if self.is_local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
        else:
            pafs.copy_files(str(staging), final, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{SUCCESS}") as f:
            f.write(b"")

    def invalidate(self, workload: str, key: str) -> None:
        """Forget a stage's result (``--force``): marker first, so no reader sees half a dir."""
        final = self.stage_path(workload, key)
        if self._exists(f"{final}/{SUCCESS}"):
            self.fs.delete_file(f"{final}/{SUCCESS}")
        if self._exists(final):
            self.fs.delete_dir(final)
