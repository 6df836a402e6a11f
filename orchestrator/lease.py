"""Per-key leases: one driver at a time computes and publishes a stage key in a store.

Two `mmkd run` (or `mmkd tune`) processes on one store may reach the same key together. The one
that takes the key's lease runs the stage; the other waits, and finds the result published
(cached) or, if the first failed, takes the lease and runs it itself. The stage task publishes
only while its driver still holds the lease (``ArtifactStore.writer`` checks), so a driver that
lost its lease (suspended past the expiry, say) never publishes over the new holder's work.

- Local store (a path or a shared mount): ``leases/<name>.lease`` created whole by ``link``ing
  a written temp file to its name (fails if it exists: never a half-written lease), holding the
  owner (host, pid, run, token); the holder refreshes its mtime every ``ttl / 4`` seconds from a
  thread of its own, so a driver loop stuck in a slow call (a hung MLflow server) never makes a
  live driver look dead. A lease is stale when its mtime is older than ``ttl`` or, on the same
  host, when its owner's process is gone (a SIGKILLed driver frees its keys at once). A stale
  lease is taken over under a POSIX lock (``fcntl.lockf`` on ``<name>.lease.lock``, which NFS
  honours too): the taker re-reads the record under the lock and removes it only if it is still
  the very stale record it saw (same token), so a fresh lease written meanwhile by another
  taker is never removed; creation is then the same exclusive link.
- Object stores (s3://, gs://): a lease object with an expiry. pyarrow.fs offers no
  conditional write, so a driver writes its lease, waits ``settle_s`` and reads it back: of two
  writers the last one wins and both see who it is. A writer slower than ``settle_s`` can still
  race; the publish-time token check then keeps a mixed directory out.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any

import pyarrow.fs as pafs

DEFAULT_TTL_S = 60.0


def lease_ttl() -> float:
    return float(os.environ.get("MMKD_LEASE_TTL_S", DEFAULT_TTL_S))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, fs: pafs.FileSystem, base: str, name: str, owner: dict[str, Any],
                 local: bool, ttl: float | None = None, settle_s: float = 0.5,
                 keep_alive: bool = True):
        self.fs, self.local = fs, local
        self.path = f"{base}/leases/{name}.lease"
        self.ttl = lease_ttl() if ttl is None else ttl
        self.settle_s = settle_s
        self.token = secrets.token_hex(8)
        self.owner = {**owner, "host": socket.gethostname(), "pid": os.getpid(),
                      "token": self.token}
        self.held = False
        self._beat = 0.0
        self.keep_alive = keep_alive  # heartbeats from a thread while held
        self._io = threading.Lock()  # heartbeat and release never interleave
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        """The current lease record (with ``age_s``), or None when nobody holds it."""
        try:
            if self.local:
                with open(self.path) as f:
                    record = json.load(f)
                record["age_s"] = time.time() - os.stat(self.path).st_mtime
            else:
                with self.fs.open_input_stream(self.path) as f:
                    record = json.loads(f.read().decode())
                record["age_s"] = time.time() - record.get("beat", 0.0)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        except OSError as e:  # pyarrow raises OSError subclasses for a missing object
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise e
        return record

    def _stale(self, record: dict[str, Any]) -> bool:
        if record["age_s"] > self.ttl:
            return True
        same_host = self.local and record.get("host") == socket.gethostname()
        return bool(same_host and not pid_alive(int(record.get("pid", 0))))

    # -- taking and keeping ----------------------------------------------------------------
    def try_acquire(self) -> bool:
        if self.held:
            return True
        self.held = self._acquire_local() if self.local else self._acquire_object()
        self._beat = time.monotonic()
        if self.held and self.keep_alive:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                            name=f"mmkd-lease-{os.path.basename(self.path)}")
            self._thread.start()
        return self.held

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.heartbeat(force=True):
                    return
            except OSError:  # a store that failed once: try again at the next beat
                continue

    def _create_local(self) -> bool:
        """Create the lease file whole, or fail if it exists (``link`` is atomic)."""
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.owner, "time": time.time()}, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _acquire_local(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if self._create_local():
            return True
        record = self.holder()
        if record is None or not self._stale(record):
            return False
        return self._take_over_local(record.get("token")) and self._create_local()

    def _take_over_local(self, seen_token: str | None) -> bool:
        """Remove the stale lease ``seen_token`` names, under the takeover lock; False if the
        file now holds another record (someone took over first)."""
        import fcntl

        with open(f"{self.path}.lock", "a") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                record = self.holder()
                if record is None:
                    return not os.path.exists(self.path)
                if record.get("token") != seen_token or not self._stale(record):
                    return False
                os.unlink(self.path)
                return True
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)

    def _write_object(self) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({**self.owner, "beat": time.time()}).encode())

    def _acquire_object(self) -> bool:
        record = self.holder()
        if record is not None and not self._stale(record):
            return False
        self.fs.create_dir(os.path.dirname(self.path), recursive=True)
        self._write_object()
        time.sleep(self.settle_s)
        record = self.holder()
        return record is not None and record.get("token") == self.token

    def still_held(self) -> bool:
        record = self.holder()
        return record is not None and record.get("token") == self.token

    def heartbeat(self, force: bool = False) -> bool:
        """Keep the lease fresh (at most every ttl/4 s); False if another driver took it.
        With ``keep_alive`` a thread beats; a call without ``force`` only reports."""
        if not self.held:
            return False
        if not force and (self._thread is not None
                          or time.monotonic() - self._beat < self.ttl / 4):
            return self.held
        with self._io:
            if not self.held:
                return False
            self._beat = time.monotonic()
            if not self.still_held():
                self.held = False
                return False
            if self.local:
                os.utime(self.path)
            else:
                self._write_object()
            return True

    def release(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._io:
            if not self.held:
                return
            self.held = False
            if not self.still_held():
                return
            try:
                if self.local:
                    os.unlink(self.path)
                else:
                    self.fs.delete_file(self.path)
            except (FileNotFoundError, OSError):
                pass

    def describe_holder(self) -> str:
        record = self.holder()
        if record is None:
            return "nobody"
        return (f"run {record.get('run_id', '?')} (pid {record.get('pid')} on "
                f"{record.get('host')}, heartbeat {record['age_s']:.0f} s ago)")
