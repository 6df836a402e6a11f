"""The files of a stored result: checksums for its manifest, durable writes, integrity checks
of what is read back, and sweeping what crashed writers and downloads left behind (see
``orchestrator/artifact_store.py`` for how a publish uses them)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
MANIFEST = "_mmkd.json"
STALE_LEFTOVER_S = 24 * 3600.0  # a leftover of another host is swept after this long


class StoreIntegrityError(RuntimeError):
    """A result's files do not match its manifest (sizes or sha256)."""


def file_digests(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` but the markers."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel in (SUCCESS, MANIFEST):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = {"size": os.path.getsize(path), "sha256": h.hexdigest()}
    return out


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (and ``root``): durable before ``_SUCCESS``."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner_tag() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def owner_gone(name: str, mtime: float) -> bool:
    """A leftover named ``...@<host>.<pid>@...`` whose process is gone (or another host's,
    older than ``STALE_LEFTOVER_S``)."""
    from orchestrator.lease import pid_alive

    parts = name.split("@")
    if len(parts) < 3:
        return time.time() - mtime > STALE_LEFTOVER_S
    host, _, pid = parts[1].rpartition(".")
    if host == socket.gethostname() and pid.isdigit():
        return not pid_alive(int(pid))
    return time.time() - mtime > STALE_LEFTOVER_S


def sweep_local(folder: str | os.PathLike, prefix: str = "") -> list[str]:
    """Remove leftovers in ``folder`` (names starting with ``prefix``) whose owner is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or "@" not in entry.name:
            continue
        try:
            if owner_gone(entry.name, entry.stat().st_mtime):
                if entry.is_dir():
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:
            continue
    return removed


def local_sizes(root: Path) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(root) for n in names}


def size_mismatch(files: dict[str, Any] | None, sizes: dict[str, int], where: str
                   ) -> str | None:
    """The first file whose size differs from the manifest's (or that is missing)."""
    if not files:
        return None
    for rel, want in sorted(files.items()):
        got = sizes.get(rel)
        if got != want["size"]:
            what = "missing" if got is None else f"{got} bytes, the manifest says {want['size']}"
            return f"{where}/{rel}: {what}"
    return None


def digest_mismatch(files: dict[str, Any], root: Path) -> str | None:
    problem = size_mismatch(files, local_sizes(root), str(root))
    if problem:
        return problem
    got = file_digests(root)
    for rel, want in sorted(files.items()):
        if got[rel]["sha256"] != want["sha256"]:
            return f"{rel}: sha256 differs from the manifest"
    return None


def disk_error(e: OSError, where: Path) -> OSError:
    import errno

    if e.errno == errno.ENOSPC:
        return OSError(e.errno, f"disk full at {where}: the stage's result was not published "
                                f"(nothing already published was changed); free space and "
                                f"run again")
    return e
