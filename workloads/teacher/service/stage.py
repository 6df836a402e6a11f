"""A ``distill`` stage's side of ``teacher: service``: its ``teacher_resources`` config, the
``SideResources`` the runner counts for it, and running the stage's training as a user of the
service (``serve``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.plugin import SideResources, StageContext

__all__ = ["TeacherResources", "side_resources", "service_spec", "serve", "release_holds"]


class TeacherResources(BaseModel):
    """The teacher service's replicas (``teacher: service``) and how it serves them."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, description="teacher copies answering requests")
    cpus: float = Field(1.0, ge=0, description="CPUs per replica (its torch threads)")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    max_restarts: int = Field(3, ge=-1, description="restarts of a replica (or the service's "
                              "coordinator) that died (-1: unlimited); its requests are retried "
                              "meanwhile")
    cache_mb: float = Field(1024.0, ge=0, description="LRU cache of per-row teacher outputs, by "
                            "row digest: a row asked again (another stage, trial or epoch) "
                            "costs no forward")
    max_inflight: int = Field(2, ge=1, description="requests one replica works on at once; "
                              "more wait in the service (back-pressure)")
    lease_s: float = Field(30.0, gt=0, description="a stage that stops heartbeating (a killed "
                           "driver) is dropped after this long; the service stops with no users")
    linger_s: float = Field(0.0, ge=0, description="keep the service (and its loaded teacher) "
                            "this long after its last user left")
    hold_s: float = Field(600.0, ge=0, description="a pipeline run (or tune) whose later stages "
                          "(trials) use the same service keeps it loaded between them, at most "
                          "this long after a stage ends; the run's end frees it at once. 0: off")


def side_resources(config: Any, inputs: dict) -> SideResources | None:
    """``teacher: service``: the replicas the stage holds beside its workers, shared by the
    stages that name the same teacher with the same service settings."""
    if config.teacher != "service":
        return None
    from workloads.teacher.service.spec import ServiceSpec

    r = config.teacher_resources
    return SideResources(
        key=ServiceSpec.of_stage(config, inputs.get("teacher")).shared_key,
        cpus=r.replicas * r.cpus, gpus=r.replicas * r.gpus,
        what=f"teacher service: {r.replicas} replica(s) x {r.cpus:g} CPU, {r.gpus:g} GPU "
             f"(`teacher_resources`)",
        hint="its `teacher_resources` (`cpus: 0` lets the replicas run on CPUs Ray does not "
             "reserve for them, beside the student's)", release=release_holds)


def release_holds(run_id: str) -> None:
    """``SideResources.release``: the run has ended, drop its holds on teacher services."""
    from workloads.teacher.service.client import release_run

    release_run(run_id)


def service_spec(config: Any, ctx: StageContext) -> Any:
    """The ``ServiceSpec`` of a ``teacher: service`` stage (``ServiceSpec.of_stage``)."""
    from workloads.teacher.service.spec import ServiceSpec

    return ServiceSpec.of_stage(config, ctx.input("teacher"),
                                precision=(ctx.deepspeed or {}).get("precision", "fp32"))


def serve(config: Any, ctx: StageContext, loss_fn: Any,
          train: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``train(config, ctx, loss_fn=...)`` as a user of the stage's teacher service (started if
    none runs); the service's counters join the final metrics as ``teacher_service/*``. Later
    stages of the run that use it (``ctx.side_later``) find it held for them."""
    from orchestrator.executor import DATA_CPUS
    from workloads.teacher.service.client import ServiceUse

    res = ctx.resources
    with ServiceUse(service_spec(config, ctx), stage=ctx.stage,
                      need_cpus=res.num_workers * res.cpus_per_worker + DATA_CPUS,
                      need_gpus=res.num_workers * res.gpus_per_worker, run_id=ctx.run_id,
                      hold_s=config.teacher_resources.hold_s if ctx.side_later else 0.0) as lease:
        loss_fn = dataclasses.replace(loss_fn, service={"name": lease.name, "user": lease.user})
        metrics = train(config, ctx, loss_fn=loss_fn)
    metrics.update({f"teacher_service/{k}": v for k, v in lease.final_metrics.items()})
    return metrics
