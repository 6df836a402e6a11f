"""Fingerprints of the files a stage reads that no upstream stage made, for its key.

Every workload gets ``config_fingerprint`` unless it registers its own hook: it walks the
validated config and, for each field, hashes a manifest of what the field points at —

- a config object with an ``external_paths()`` method (a workload's ``DataSource``: its
  resolved data files and, for LLaVA JSON, its image folder ``image_root``, so adding,
  removing, replacing or touching an image changes the key): every file below each path;
- any other string that names an existing local path (a ``model: {path: ...}`` checkpoint
  folder, a local vision tower or LLM in ``parts``, a tokenizer folder): every file below it.

A manifest holds names, sizes and modification times, not contents: it is cheap (one `stat`
per file, no reads), and it misses an edit that keeps a file's size and mtime (``touch -r``,
some copy tools with ``-p``). Hub ids (``google/siglip-...``) enter the key as text through
the params; the revision a hub id resolves to is not known offline and is not in the key.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel

__all__ = ["config_fingerprint", "path_manifest"]

_CACHE: dict[str, tuple[float, str]] = {}
# Several stages often name the same data or model folder: one key computation stats each file
# once. Short, so a long-lived process (a tune, a notebook) sees later edits.
_CACHE_S = 5.0


def path_manifest(path: str) -> str:
    """Hash of the names, sizes and mtimes of ``path`` (a file, or every file below a folder;
    a local path or a pyarrow.fs URI). ``"missing"`` when it does not exist."""
    hit = _CACHE.get(path)
    if hit and time.monotonic() - hit[0] < _CACHE_S:
        return hit[1]
    if "://" in path and not path.startswith("file://"):
        fs, base = pafs.FileSystem.from_uri(path)
    else:
        fs, base = pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))
    info = fs.get_file_info(base)
    h = hashlib.sha256()
    if info.type == pafs.FileType.NotFound:
        digest = "missing"
    else:
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            entries = sorted((i.path[len(base):], i.size, i.mtime_ns) for i in infos
                             if i.type == pafs.FileType.File)
        else:
            entries = [("", info.size, info.mtime_ns)]
        for rel, size, mtime in entries:
            h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        digest = h.hexdigest()[:16]
    _CACHE[path] = (time.monotonic(), digest)
    return digest


def _looks_local(text: str) -> bool:
    if "://" in text or "\n" in text or len(text) > 4096:
        return False
    if not (os.path.isabs(text) or text.startswith(".") or os.sep in text):
        return False
    return os.path.exists(text)


def _walk(value: Any, name: str, out: dict[str, str]) -> None:
    if callable(getattr(value, "external_paths", None)):
        parts = [f"{p}={path_manifest(p)}" for p in value.external_paths()]
        if isinstance(value, BaseModel):  # its settings (format, max_samples, ...) too
            parts.append(value.model_dump_json())
        out[name] = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            _walk(getattr(value, field), f"{name}.{field}", out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{name}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{name}[{i}]", out)
    elif isinstance(value, str) and _looks_local(value):
        out[name] = path_manifest(value)


def config_fingerprint(config: BaseModel) -> dict[str, str]:
    """``{field path: manifest hash}`` for every external file a workload config names."""
    out: dict[str, str] = {}
    for field in type(config).model_fields:
        _walk(getattr(config, field), field, out)
    return out
