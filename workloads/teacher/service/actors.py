"""The teacher service's actors: ``TeacherReplica`` (the frozen teacher, loaded once per replica
process) and ``TeacherService`` (one per teacher per cluster: users, leases, the per-row cache,
dispatch to replicas with retries).

Data path of one request (nothing passes through any driver)::

    student worker --ray.put(batch)--> object store
    student worker --request(user, digests, [ref])--> TeacherService   (the ref, not the data)
    TeacherService --forward(ref, rows)--> TeacherReplica      (reads the batch from the store)
    TeacherReplica --entries--> TeacherService (cache) --entries--> student worker

The payload per row is exactly what the offline ``teacher_logits`` stage stores
(``teacher/payload.py``): top-k values + indices at response and image-token
positions and the image tokens' Gram matrix, so the student computes its KD terms with
``payload.stored_rows`` either way.

Sharing: rows are keyed by ``payload.row_digests`` (token ids, labels, image), so the
same sample tokenized the same way costs one teacher forward whoever asks, while it stays in
the LRU cache or is still being computed (a second request for it waits on the first).

Lifetime: the service is a detached actor, so it outlives the stage that started it and serves
later stages and trials; it ends itself when its last user unregisters, or when its users stop
heartbeating for ``lease_s`` (a killed driver) — then, ``linger_s`` later (0: at once; more
keeps the teacher loaded between a pipeline's consecutive stages), it kills its replicas and
itself.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np

from workloads.teacher.service.spec import ServiceSpec

__all__ = ["TeacherReplica", "TeacherService"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TeacherReplica:
    """One copy of the frozen teacher; answers ``forward(batch, rows)`` with per-row entries."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from workloads.families import image_token_id
        from workloads.models import load_model

        torch.set_num_threads(max(1, int(spec["cpus"])))
        self.device = torch.device("cuda" if spec["gpus"] > 0 and torch.cuda.is_available()
                                   else "cpu")
        self.dtype = getattr(torch, _DTYPES[spec["precision"]])
        model, processor = load_model(spec["teacher_dir"])
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.vocab_size = len(processor.tokenizer)
        self.image_token_id = image_token_id(model.config)
        self.spec = ServiceSpec(**spec)
        self.load_id = uuid.uuid4().hex  # a restarted replica is a new load

    def info(self) -> dict[str, Any]:
        return {"load_id": self.load_id, "vocab_size": self.vocab_size,
                "image_token_id": self.image_token_id, "pid": os.getpid()}

    def forward(self, request: dict[str, np.ndarray], rows: list[int] | None
                ) -> tuple[str, list[dict[str, np.ndarray]]]:
        """Entries for ``rows`` of the collated batch ``request`` (all rows when None)."""
        import torch

        from workloads.train_loop_parts import model_inputs

        batch = {k: torch.tensor(v) for k, v in request.items()}
        if rows is not None:
            batch = {k: v[rows] for k, v in batch.items()}
        on_device = {k: v.to(self.device) for k, v in batch.items()}
        if on_device.get("pixel_values") is not None and \
                torch.is_floating_point(on_device["pixel_values"]):
            on_device["pixel_values"] = on_device["pixel_values"].to(self.dtype)
        with torch.no_grad():
            logits = self.model(**model_inputs(on_device)).logits
        return self.load_id, self.spec.entries(logits, on_device, self.vocab_size,
                                               self.image_token_id)


class TeacherService:
    """Coordinator of one teacher's replicas (an async actor: requests wait concurrently)."""

    def __init__(self, spec: dict[str, Any], name: str):
        import ray

        self.spec, self.name = spec, name
        replica = ray.remote(TeacherReplica).options(
            num_cpus=spec["cpus"], num_gpus=spec["gpus"], max_restarts=spec["max_restarts"],
            max_task_retries=0, name=None)  # retried here, where the cache and counters are
        self._replicas = [replica.remote(spec) for _ in range(spec["replicas"])]
        self._self = ray.get_runtime_context().current_actor
        self._lock = threading.Lock()  # users/closing: shared with the lease watcher thread
        self._users: dict[str, float] = {}  # user -> last heartbeat (monotonic)
        self._ttl: dict[str, float] = {}    # user -> its lease if not lease_s (a run's hold)
        self._closing = False
        self._empty_since = time.monotonic()  # when the last user left (here: none came yet)
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cache_bytes = 0
        self._pending: dict[str, asyncio.Future] = {}
        self._slots: asyncio.Queue | None = None
        self._info: dict[str, Any] | None = None
        self._load_ids: set[str] = set()
        self._stats = dict.fromkeys(("requests", "rows_requested", "rows_forwarded",
                                     "dedup_hits", "forwards", "retries", "users_seen",
                                     "expired_users"), 0)
        # a restarted coordinator (counters, cache and users start again; users re-register)
        self._stats["restarted"] = int(ray.get_runtime_context().was_current_actor_reconstructed)
        self._wake = threading.Event()
        threading.Thread(target=self._watch_leases, daemon=True).start()

    # ------------------------------------------------------------------ users and leases

    def register(self, user: str, ttl_s: float | None = None) -> bool:
        """Add ``user`` (dropped after ``ttl_s`` without a heartbeat, default ``lease_s``: a
        run's hold on the service for its later stages uses its own); False while the service
        is shutting down (start a new one)."""
        with self._lock:
            if self._closing:
                return False
            if user not in self._users:
                self._stats["users_seen"] += 1
            self._users[user] = time.monotonic()
            if ttl_s is not None:
                self._ttl[user] = float(ttl_s)
            self._empty_since = None
            return True

    def heartbeat(self, user: str) -> bool:
        """Renew ``user``'s lease; False when it had expired (the caller registers again)."""
        with self._lock:
            if user not in self._users or self._closing:
                return False
            self._users[user] = time.monotonic()
            return True

    def unregister(self, user: str) -> dict[str, float]:
        """Remove ``user``; the last one out shuts the service down (after ``linger_s``).
        Returns the metrics."""
        with self._lock:
            self._users.pop(user, None)
            self._ttl.pop(user, None)
            if not self._users:
                self._empty_since = time.monotonic()
                self._closing = self.spec["linger_s"] <= 0
        out = self.metrics()
        self._wake.set()
        return out

    def _watch_leases(self) -> None:
        period = max(0.2, min(2.0, self.spec["lease_s"] / 4))
        while True:
            self._wake.wait(period)
            self._wake.clear()
            with self._lock:
                now = time.monotonic()
                for user, seen in list(self._users.items()):
                    if now - seen > self._ttl.get(user, self.spec["lease_s"]):
                        del self._users[user]
                        self._ttl.pop(user, None)
                        self._stats["expired_users"] += 1
                        if not self._users:
                            self._empty_since = now
                # no users for linger_s; never used within a lease: its creator died first
                grace = self.spec["linger_s"] if self._stats["users_seen"] else \
                    max(self.spec["lease_s"], self.spec["linger_s"])
                if not self._users and now - self._empty_since >= grace:
                    self._closing = True
                closing = self._closing
            if closing:
                time.sleep(0.2)  # let the last unregister's reply go out
                self._shutdown()
                return

    def _shutdown(self) -> None:
        import ray

        for r in self._replicas:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        ray.kill(self._self, no_restart=True)  # a detached actor frees its name when dead

    # ------------------------------------------------------------------ requests

    async def ready(self) -> dict[str, Any]:
        """Wait until every replica has loaded the teacher; its vocabulary size, k, image token."""
        if self._info is None:
            infos = await asyncio.gather(*[r.info.remote() for r in self._replicas])
            self._load_ids.update(i["load_id"] for i in infos)
            self._info = {k: infos[0][k] for k in ("vocab_size", "image_token_id")}
            self._info["name"] = self.name
        return dict(self._info)

    async def request(self, user: str, digests: list[str], wrapped: list[Any],
                      sliceable: bool = True) -> list[dict[str, np.ndarray]]:
        """Entries for the rows of the batch in ``wrapped[0]`` (an ObjectRef, kept wrapped so
        that it is resolved by the replica, not here), in ``digests`` order. ``sliceable``:
        rows can be forwarded alone (LLaVA batches); otherwise the whole batch is."""
        with self._lock:
            if user in self._users:
                self._users[user] = time.monotonic()  # a request renews the lease too
        self._stats["requests"] += 1
        self._stats["rows_requested"] += len(digests)
        found: dict[str, Any] = {}
        waits: dict[str, asyncio.Future] = {}
        need: dict[str, int] = {}
        for i, d in enumerate(digests):
            if d in found or d in waits or d in need:
                self._stats["dedup_hits"] += 1
            elif d in self._cache:
                self._cache.move_to_end(d)
                found[d] = self._cache[d]
                self._stats["dedup_hits"] += 1
            elif d in self._pending:
                waits[d] = self._pending[d]
                self._stats["dedup_hits"] += 1
            else:
                need[d] = i
        if need:
            loop = asyncio.get_running_loop()
            futs = {d: loop.create_future() for d in need}
            self._pending.update(futs)
            try:
                got = await self._forward(wrapped[0], digests, need, sliceable)
            except BaseException as e:  # incl. cancellation: never leave waiters hanging
                for f in futs.values():
                    if not f.done():
                        f.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
                        f.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                for d in futs:
                    self._pending.pop(d, None)
            for d, f in futs.items():
                f.set_result(got[d])
            found.update(got)
        for d, f in waits.items():
            found[d] = await f
        return [found[d] for d in digests]

    async def _forward(self, ref: Any, digests: list[str], need: dict[str, int],
                       sliceable: bool) -> dict[str, dict[str, np.ndarray]]:
        import ray

        if self._slots is None:  # bounded in-flight per replica: the back-pressure
            self._slots = asyncio.Queue()
            for _ in range(self.spec["max_inflight"]):
                for i in range(len(self._replicas)):
                    self._slots.put_nowait(i)
        rows = sorted(need.values()) if sliceable else None
        t0, attempt = time.monotonic(), 0
        while True:
            i = await self._slots.get()
            try:
                load_id, entries = await self._replicas[i].forward.remote(ref, rows)
            except ray.exceptions.RayActorError as e:  # died or restarting: try again
                self._stats["retries"] += 1
                waited = time.monotonic() - t0
                if waited > self.spec["restart_wait_s"] or _dead_for_good(self._replicas[i]):
                    raise RuntimeError(
                        f"teacher service {self.name}: replica {i} died "
                        f"({type(e).__name__}) and is not back after {waited:.0f}s; replicas "
                        f"restart at most {self.spec['max_restarts']} times "
                        f"(`teacher_resources.max_restarts`)") from e
                attempt += 1
                await asyncio.sleep(min(0.25 * 2 ** attempt, 2.0))
                continue
            finally:
                self._slots.put_nowait(i)
            self._load_ids.add(load_id)
            self._stats["forwards"] += 1
            picked = rows if rows is not None else range(len(digests))
            got = {digests[r]: e for r, e in zip(picked, entries)}
            self._stats["rows_forwarded"] += len(got)
            for d, e in got.items():
                self._cache_put(d, e)
            return {d: got[d] for d in need}

    def _cache_put(self, digest: str, entry: dict[str, np.ndarray]) -> None:
        budget = self.spec["cache_mb"] * 2**20
        size = sum(a.nbytes for a in entry.values())
        if size > budget or digest in self._cache:
            return
        self._cache[digest] = entry
        self._cache_bytes += size
        while self._cache_bytes > budget:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= sum(a.nbytes for a in old.values())

    # ------------------------------------------------------------------ ops and tests

    def metrics(self) -> dict[str, float]:
        """Counters: ``loads`` (teacher loads, restarts included), ``requests``,
        ``rows_requested``, ``rows_forwarded``, ``dedup_hits`` (rows served from the cache or
        from another request's forward), ``forwards``, ``retries``, users and cache size;
        ``restarted``: 1 in a coordinator that Ray restarted (the counters started again)."""
        with self._lock:
            users = len(self._users)
        return {**{k: float(v) for k, v in self._stats.items()},
                "loads": float(len(self._load_ids)), "users": float(users),
                "replicas": float(len(self._replicas)), "cache_rows": float(len(self._cache)),
                "cache_mb": self._cache_bytes / 2**20}

    def replicas(self) -> list[Any]:
        return list(self._replicas)


def _dead_for_good(handle: Any) -> bool:
    """Whether a replica is DEAD (its restarts used up), not RESTARTING; False when the state
    API cannot tell (no dashboard): the caller then waits up to ``restart_wait_s``."""
    try:
        from ray.util.state import get_actor

        state = get_actor(handle._actor_id.hex(), timeout=10)
        return state is not None and state.state == "DEAD"
    except Exception:  # noqa: BLE001
        return False
