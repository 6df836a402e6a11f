"""What identifies a teacher service, and where it lives in the Ray cluster.

One service per (teacher model, payload, resources) per Ray cluster session: a detached named
actor in namespace ``mmkd`` whose name is a hash of the teacher dir (its path and its files'
sizes and mtimes, so a rewritten dir gets a new service), ``top_k``, precision and replica
resources. Stages, pipeline runs and tune trials that name the same teacher find it by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NAMESPACE", "SERVICE_PREFIX", "ServiceSpec"]

NAMESPACE = "mmkd"
SERVICE_PREFIX = "mmkd-teacher-"


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a service is started with (picklable; travels to the actors and workers)."""

    teacher_dir: str
    top_k: int | None = None      # logits kept per position; None = the full vocabulary
    precision: str = "fp32"       # teacher forward dtype: fp32 | bf16 | fp16
    replicas: int = 1
    cpus: float = 1.0             # per replica (also its torch thread count)
    gpus: float = 0.0             # per replica
    # settings of a running service: the first user's win (not part of the name)
    max_restarts: int = 3         # per replica, after a crash or a kill
    restart_wait_s: float = 600.0  # how long a request waits for its dead replica to return
    max_inflight: int = 2         # requests a replica works on at once (back-pressure)
    cache_mb: float = 1024.0      # LRU cache of per-row payloads, by row digest
    lease_s: float = 30.0         # a user that sends nothing for this long is dropped
    linger_s: float = 0.0         # stay up this long after the last user left

    @classmethod
    def of_stage(cls, config: Any, teacher: Any, precision: str = "fp32") -> "ServiceSpec":
        """The service of a ``distill`` stage with ``teacher: service``: its teacher (a path,
        or at plan time the reference to it), ``top_k``, the stage's precision (the teacher's
        forward dtype, as online) and ``teacher_resources``."""
        r = config.teacher_resources
        teacher = teacher[0] if isinstance(teacher, list) and len(teacher) == 1 else teacher
        return cls(teacher_dir=teacher, top_k=config.top_k, precision=precision,
                   replicas=r.replicas, cpus=r.cpus, gpus=r.gpus, max_restarts=r.max_restarts,
                   max_inflight=r.max_inflight, cache_mb=r.cache_mb, lease_s=r.lease_s,
                   linger_s=r.linger_s)

    @property
    def shared_key(self) -> str:
        """What stages that share one service (and its reserved resources) have in common."""
        return json.dumps(["teacher-service", self.teacher_dir, self.top_k, self.replicas,
                           self.cpus, self.gpus])

    @property
    def name(self) -> str:
        ident = {"teacher": os.path.abspath(self.teacher_dir),
                 "files": _dir_stamp(self.teacher_dir),
                 "top_k": self.top_k, "precision": self.precision, "replicas": self.replicas,
                 "cpus": self.cpus, "gpus": self.gpus}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return f"{SERVICE_PREFIX}{digest[:16]}"

    def entries(self, logits: Any, batch: dict[str, Any], vocab_size: int,
                image_token_id: int) -> list[dict[str, Any]]:
        """What a replica sends for teacher ``logits`` of a collated ``batch``: the payload's
        entries (``teacher.payload``) at this service's k, every logit when ``top_k`` is
        None."""
        from workloads.teacher.payload import teacher_entries

        return teacher_entries(logits, batch, vocab_size, image_token_id,
                               self.top_k or vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


def _dir_stamp(path: str) -> list[list]:
    """(name, size, mtime_ns) of the files directly in ``path``: cheap, and changes when the
    model is rewritten in place."""
    if not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path)):
        st = os.stat(os.path.join(path, name))
        out.append([name, st.st_size, st.st_mtime_ns])
    return out
