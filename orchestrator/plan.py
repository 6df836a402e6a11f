"""Planning: every stage's key and key parts, whether its result is cached in the store, and
why a stage will run (which key part changed since its last result)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator.artifact_store import ArtifactStore, compute_key_parts, mmkd_home
from orchestrator.fingerprint import config_fingerprint
from orchestrator.keys import code_fingerprint, explain_change
from orchestrator.plugin import get_workload
from orchestrator.spec import Pipeline, Stage

@dataclass
class PlanRow:
    name: str
    workload: str
    key: str
    status: str  # "cached" | "run" | "forced"
    upstream: list[str]
    resources: str
    uri: str
    reason: str = ""  # why it runs: which key part changed since this stage's last result


def fingerprints(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """Per stage, the fingerprint of the external files it reads (the workload's hook)."""
    out = {}
    for name, stage in pipeline.stages.items():
        hook = get_workload(stage.workload).fingerprint or config_fingerprint
        found = hook(stage.config)
        out[name] = found if isinstance(found, dict) else {"data": str(found)}
    return out


def code_fingerprints(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """Per stage, the hashes of the workload's module and the project modules it imports."""
    by_workload: dict[str, dict[str, str]] = {}
    for stage in pipeline.stages.values():
        if stage.workload not in by_workload:
            by_workload[stage.workload] = code_fingerprint(
                get_workload(stage.workload).fn.__module__, mmkd_home() / "code_cache")
    return {name: by_workload[s.workload] for name, s in pipeline.stages.items()}


def pipeline_keys(pipeline: Pipeline, offline: bool = False
                  ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Keys and key parts of every stage; ``offline`` leaves out the external files."""
    return compute_key_parts(pipeline.stages, {} if offline else fingerprints(pipeline),
                             code_fingerprints(pipeline))


def store_for(pipeline: Pipeline, root: str | None = None) -> ArtifactStore:
    root = (root or os.environ.get("MMKD_STORE") or pipeline.spec.store
            or str(mmkd_home() / "artifacts"))
    return ArtifactStore(root)


def resolve_force(pipeline: Pipeline, force: list[str]) -> set[str]:
    """`--force` stages and everything downstream of them."""
    return pipeline.downstream_of(pipeline.match(force, "--force"))


def make_plan(pipeline: Pipeline, store: ArtifactStore | None, force: list[str] = (),
              offline: bool = False) -> list[PlanRow]:
    """The stages in order with their keys; ``store=None`` (offline) means cache unknown."""
    keys, parts = pipeline_keys(pipeline, offline)
    forced = resolve_force(pipeline, list(force))
    rows = []
    for name, s in pipeline.stages.items():
        cached = store is not None and store.is_complete(s.workload, keys[name])
        status = "forced" if name in forced and cached else ("cached" if cached else "run")
        r = s.resources
        res = (f"{r.num_workers}x({r.cpus_per_worker:g} cpu, {r.gpus_per_worker:g} gpu)"
               + (f" zero{s.deepspeed.zero_stage} {s.deepspeed.precision}" if s.distributed else ""))
        rows.append(PlanRow(name, s.workload, keys[name], status, list(s.upstream), res,
                            store.uri(s.workload, keys[name]) if store else "",
                            _reason(pipeline, s, status, keys[name], parts[name], store)))
    return rows


def _reason(pipeline: Pipeline, stage: Stage, status: str, key: str, parts: dict[str, Any],
            store: ArtifactStore | None) -> str:
    if status == "forced":
        return "--force"
    if status == "cached" or store is None:
        return ""
    previous = store.read_index(pipeline.name, stage.name)
    if previous is None:
        return "no earlier result of this stage"
    if previous.get("key") == key:
        return "its earlier result was removed or never completed"
    inputs = {n: [s for s, _ in refs] for n, refs in stage.resolved_inputs.items()}
    return explain_change(previous.get("parts") or {}, parts, inputs)
