"""Both ends of a stage's use of the teacher service.

``ServiceUse`` (the stage's driver): find the service by name or start it, register the stage
as a user, heartbeat while the stage runs, unregister at the end (the last user out stops the
service). A driver that dies stops heartbeating; the service drops it after ``lease_s``. A run
whose later stages use the service holds it between them (``release_run`` at the run's end).

``ServiceClient`` (each student worker): send each batch's request one step ahead
(``ahead``), and turn the reply into ``StoredRows`` with the offline path's own code
(``payload.stored_rows``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from typing import Any, Iterable, Iterator

from workloads.teacher.payload import cross_rows, own_batch, row_digests, stored_rows
from workloads.teacher.service.actors import TeacherService
from workloads.teacher.service.spec import NAMESPACE, SERVICE_PREFIX, ServiceSpec

__all__ = ["ServiceUse", "ServiceClient", "TeacherServiceError", "find_service",
           "release_run", "run_user"]

_TEACHER_PREFIX = "teacher_"  # the teacher's own encoding (teacher.online.TEACHER_PREFIX): not sent


class TeacherServiceError(RuntimeError):
    """The teacher service could not be started, reached or asked."""

    deterministic = True  # a gone service stays gone: Ray Train raises it, no group restart


def find_service(name: str) -> Any | None:
    """The running service's handle, or None."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- driver side


class ServiceUse:
    """``with ServiceUse(spec, stage=...) as use:`` — the stage is a user of the service for
    the duration of the block; ``use.final_metrics`` holds the service's counters at exit.

    ``run_id`` with ``hold_s > 0``: later stages of the run use the service too, so at exit the
    run holds it (user ``run/<run_id>``, dropped after ``hold_s``, or by ``release_run`` when
    the run ends) and the next stage finds the teacher loaded. ``run_id`` without ``hold_s``:
    the last such stage, which drops the run's hold as it leaves."""

    def __init__(self, spec: ServiceSpec, *, stage: str, user: str | None = None,
                 need_cpus: float = 0.0, need_gpus: float = 0.0, start_timeout_s: float = 600.0,
                 run_id: str = "", hold_s: float = 0.0):
        self.spec, self.stage, self.name = spec, stage, spec.name
        self.user = user or f"{stage}/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.hold_user, self.hold_s = (run_user(run_id) if run_id else None), hold_s
        self.need_cpus, self.need_gpus = need_cpus, need_gpus
        self.start_timeout_s = start_timeout_s
        self.handle: Any = None
        self.final_metrics: dict[str, float] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "ServiceUse":
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if find_service(self.name) is None:
                self._check_fits(ray.cluster_resources())
            # a coordinator that dies (its node, an OOM) is restarted with new replicas and
            # every call in flight is retried (all its methods are idempotent); its own
            # shutdown is final (ray.kill no_restart)
            self.handle = ray.remote(TeacherService).options(
                name=self.name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_concurrency=256, max_restarts=self.spec.max_restarts,
                max_task_retries=self.spec.max_restarts,
            ).remote(self.spec.to_dict(), self.name)
            try:
                if ray.get(self.handle.register.remote(self.user), timeout=60):
                    break
            except (RayActorError, GetTimeoutError):
                pass  # the service was shutting down: its name frees when it is dead
            if time.monotonic() > deadline:
                raise TeacherServiceError(f"stage {self.stage!r}: could not register with "
                                          f"teacher service {self.name} in "
                                          f"{self.start_timeout_s:.0f}s")
            time.sleep(0.5)
        # heartbeat from now on: loading the replicas can take longer than a lease
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"mmkd-teacher-lease-{self.stage}")
        self._beat.start()
        return self  # no wait for the replicas: they load while the student workers start

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.hold_user and self.hold_s > 0:  # before leaving: the service never empties
            try:
                ray.get(self.handle.register.remote(self.hold_user, self.hold_s), timeout=60)
            except Exception:  # noqa: BLE001 - gone: the next stage starts a new one
                pass
        self._leave()
        if self.hold_user and self.hold_s <= 0:
            self._leave(self.hold_user)

    def _leave(self, user: str | None = None) -> None:
        import ray

        try:
            metrics = ray.get(self.handle.unregister.remote(user or self.user), timeout=60)
        except Exception:  # noqa: BLE001 - gone already: its leases ended it
            return
        if user is None:
            self.final_metrics = metrics

    def _heartbeat(self) -> None:
        import ray

        while not self._stop.wait(self.spec.lease_s / 4):
            try:
                if not ray.get(self.handle.heartbeat.remote(self.user), timeout=self.spec.lease_s):
                    ray.get(self.handle.register.remote(self.user), timeout=self.spec.lease_s)
            except Exception:  # noqa: BLE001 - the workers' requests report a dead service
                pass

    def _check_fits(self, cluster: dict[str, float]) -> None:
        s = self.spec
        need_cpu = s.replicas * s.cpus + self.need_cpus
        need_gpu = s.replicas * s.gpus + self.need_gpus
        problems = []
        if need_cpu > cluster.get("CPU", 0.0):
            problems.append(f"{s.replicas} teacher replica(s) × {s.cpus:g} CPUs + "
                            f"{self.need_cpus:g} for the student workers and their data "
                            f"pipeline = {need_cpu:g} CPUs but the cluster has "
                            f"{cluster.get('CPU', 0.0):g}")
        if need_gpu > cluster.get("GPU", 0.0):
            problems.append(f"{s.replicas} teacher replica(s) × {s.gpus:g} GPUs + "
                            f"{self.need_gpus:g} for the student workers = {need_gpu:g} GPUs but "
                            f"the cluster has {cluster.get('GPU', 0.0):g}")
        if problems:
            raise TeacherServiceError(
                f"stage {self.stage!r}: `teacher: service` cannot start: " + "; ".join(problems)
                + ". Lower `teacher_resources` (replicas, cpus, gpus) or `resources`")


def run_user(run_id: str) -> str:
    """The user name of a run's hold on a service (kept between its stages)."""
    return f"run/{run_id}"


def release_run(run_id: str) -> None:
    """The run ``run_id`` has ended: drop its hold on every teacher service of this Ray cluster
    (a service with no other user shuts down). ``SideResources.release`` of ``teacher: service``."""
    import ray

    if not ray.is_initialized():
        return
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") == NAMESPACE and actor["name"].startswith(SERVICE_PREFIX):
            handle = find_service(actor["name"])
            if handle is not None:
                try:
                    ray.get(handle.unregister.remote(run_user(run_id)), timeout=30)
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass


# ----------------------------------------------------------------------------- worker side


class ServiceClient:
    """A student worker's connection to the service (created in ``DistillLoss.setup``), and
    the ``service`` placement of the ``Teacher`` interface (``workloads/teacher/__init__.py``):
    ``rows`` gives each batch's entries, as the service computed them, as ``StoredRows``."""

    def __init__(self, name: str, user: str, vocab_size: int, start_timeout_s: float = 600.0,
                 cross: tuple[int, Any] | None = None):
        """``cross``: a student with another tokenizer — ``(teacher vocab size, shared
        vocabulary)``; the service then gets the teacher's own encoding of each row (the
        batch's ``teacher_`` columns) and its entries come back as ``CrossRows``."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        self.name, self.user, self.vocab_size, self.cross = name, user, vocab_size, cross
        self.handle = find_service(name)
        if self.handle is None:
            raise TeacherServiceError(f"teacher service {name} is not running (its users' "
                                      f"leases ended, or it was stopped); rerun the stage")
        try:  # the replicas load while the student is built: wait for them here
            self.info = ray.get(self.handle.ready.remote(), timeout=start_timeout_s)
        except GetTimeoutError:
            raise TeacherServiceError(
                f"teacher service {name}: its teacher replicas did not load within "
                f"{start_timeout_s:.0f}s; the cluster may lack free resources for them (lower "
                f"`teacher_resources` or the stage's workers)") from None
        except (RayActorError, ray.exceptions.RayTaskError) as e:
            raise TeacherServiceError(f"teacher service {name}: a teacher replica failed to "
                                      f"load: {e}") from e
        self._ahead: deque = deque()  # (digests, reply ref) of batches sent before their step

    def _teachers(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch the teacher runs on: the student's, or its own encoding (``cross``)."""
        return own_batch(batch) if self.cross is not None else batch

    def submit(self, batch: dict[str, Any]) -> tuple[list[str], Any]:
        """Send ``batch``'s request (the batch itself goes into the object store)."""
        import ray
        import torch

        batch = self._teachers(batch)
        payload = {}
        for k, v in batch.items():
            if k.startswith(_TEACHER_PREFIX):
                continue
            v = v.detach().cpu()
            if v.dtype in (torch.bfloat16, torch.float16):
                v = v.float()  # numpy has no bf16; the replica casts to its own precision
            payload[k] = v.numpy()
        digests = row_digests(batch)
        ref = self.handle.request.remote(self.user, digests, [ray.put(payload)],
                                         "mm_digest" not in batch)
        return digests, ref

    def ahead(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield ``batches`` unchanged, each one's request already sent, and the next batch's
        sent before this one is yielded: the teacher works on batch i+1 during step i."""
        it = iter(batches)
        try:
            nxt = next(it, None)
            if nxt is not None:
                self._ahead.append(self.submit(nxt))
            while nxt is not None:
                cur, nxt = nxt, next(it, None)
                if nxt is not None:
                    self._ahead.append(self.submit(nxt))
                yield cur
        finally:
            self._ahead.clear()  # an unfinished epoch: its replies are not needed

    def rows(self, student_logits: Any, batch: dict[str, Any], inputs: Any, image_mask: Any,
             sctx: Any = None) -> tuple[Any, Any]:
        """The student's logits cut to the vocabulary, and ``batch``'s entries as
        ``StoredRows`` (``CrossRows`` across tokenizers): the offline path's own code, on
        entries served just now."""
        if self.cross is not None:
            return cross_rows(self.entries(batch), student_logits, batch, own_batch(batch),
                              self.vocab_size, self.cross[0], self.cross[1],
                              f"the teacher service {self.name!r}")
        return stored_rows(self.entries(batch), student_logits, batch, image_mask,
                           self.vocab_size, f"the teacher service {self.name!r}")

    def entries(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The teacher's entries for ``batch``'s rows: the reply sent ahead, or a request now."""
        import ray

        digests, ref = row_digests(self._teachers(batch)), None
        while self._ahead and ref is None:
            sent, r = self._ahead.popleft()
            if sent == digests:
                ref = r
        if ref is None:
            ref = self.submit(batch)[1]
        try:
            entries = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise TeacherServiceError(f"teacher service {self.name} is gone ({e}); its users' "
                                      f"leases ended or it was stopped") from e
        except ray.exceptions.RayTaskError as e:  # the service's own error, unwrapped
            msg = str(e.cause)
            if not msg.startswith("teacher service"):
                msg = f"teacher service {self.name}: {msg}"
            raise TeacherServiceError(msg) from e
        return entries
