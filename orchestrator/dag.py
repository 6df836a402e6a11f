"""The static DAG: matrix expansion, reference and cycle lint, topological order.

Everything here runs before Ray starts, so a typo costs a second, not a cluster hour.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from typing import Any, Callable

from pydantic import ValidationError

from orchestrator.spec import (
    DeepSpeedSpec, PipelineSpec, ResourcesSpec, Stage, StageSpec, stage_name_ok,
)
from orchestrator.plugin import UnknownWorkloadError, get_workload

_MATRIX_SECTIONS = ("params", "inputs", "resources", "deepspeed")


# stages one matrix entry may expand to (6 keys x 20 values would be 64M)
MAX_MATRIX_STAGES = int(os.environ.get("MMKD_MAX_MATRIX", 1000))

def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _slug(value: Any) -> str:
    ref = re.match(r"^([A-Za-z][\w\-]*)\.\w+(?:/(.+))?$", value) if isinstance(value, str) else None
    if ref:  # a reference `stage.output[/sub/path]` is named by its stage (and sub path)
        value = ref.group(1) + (f"-{ref.group(2)}" if ref.group(2) else "")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = repr(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-") or "x"


def _split_matrix_key(key: str) -> tuple[str, str]:
    section, _, rest = key.partition(".")
    if section in _MATRIX_SECTIONS and rest:
        return section, rest
    return "params", key


def expand_stage(name: str, spec: StageSpec) -> list[tuple[str, dict[str, Any], StageSpec]]:
    """One (name, matrix values, spec) per combination of the stage's matrix."""
    if not spec.matrix:
        return [(name, {}, spec)]
    keys = list(spec.matrix)
    out = []
    for combo in itertools.product(*(spec.matrix[k] for k in keys)):
        values = dict(zip(keys, combo))
        suffix = "_".join(f"{_split_matrix_key(k)[1].replace('.', '-')}-{_slug(v)}"
                          for k, v in values.items())
        data = spec.model_dump()
        data["matrix"] = {}
        for k, v in values.items():
            section, sub = _split_matrix_key(k)
            data[section] = {**data[section], sub: v}
        out.append((f"{name}_{suffix}", values, StageSpec.model_validate(data)))
    return out


def expand_and_lint(
    spec: PipelineSpec, where: Callable[[tuple], str], fmt: Callable[..., list[str]]
) -> tuple[dict[str, Stage], list[str]]:
    errors: list[str] = []
    stages: dict[str, Stage] = {}
    members: dict[str, list[str]] = {}  # base name -> expanded names
    broken: set[str] = set()  # stages with errors of their own: don't cascade to consumers

    for base, stage_spec in spec.stages.items():
        loc = ("stages", base)
        if not stage_name_ok(base):
            errors.append(f"{where(loc)}stage names start with a letter and use letters, "
                          f"digits, '_' or '-' (got {base!r})")
            broken.add(base)
            continue
        try:
            info = get_workload(stage_spec.workload)
        except UnknownWorkloadError as e:
            errors.append(f"{where(loc + ('workload',))}unknown workload "
                          f"{stage_spec.workload!r}{_suggest(e.name, e.known)}; "
                          f"`mmkd workloads` lists the registered ones")
            broken.add(base)
            continue
        combos = 1
        for values in stage_spec.matrix.values():
            combos *= max(len(values), 1)
        if combos > MAX_MATRIX_STAGES:
            errors.append(f"{where(loc + ('matrix',))}the matrix expands to {combos:,} stages, "
                          f"more than the {MAX_MATRIX_STAGES:,} mmkd runs from one stage entry "
                          f"(set MMKD_MAX_MATRIX to raise the limit, or split the sweep; "
                          f"`mmkd tune` samples a large space instead of running all of it)")
            broken.add(base)
            continue
        empty = [k for k, values in stage_spec.matrix.items() if not values]
        for key in empty:
            errors.append(f"{where(loc + ('matrix', key))}field 'matrix.{key}': "
                          "needs at least one value")
        if empty:
            broken.add(base)
            continue

        accepted = set(info.config.model_fields)
        members[base] = []
        for name, values, concrete in expand_stage(base, stage_spec):
            params = {k: v for k, v in spec.defaults.params.items() if k in accepted}
            params.update(concrete.params)
            try:
                resources = ResourcesSpec.model_validate(
                    {**spec.defaults.resources, **concrete.resources})
                deepspeed = DeepSpeedSpec.model_validate(
                    {**spec.defaults.deepspeed, **concrete.deepspeed})
                config = info.config.model_validate(params)
            except ValidationError as e:
                section = _section_of(e, info.config)
                errors.extend(fmt(e, loc + (section,) if section else loc, where))
                broken.add(base)
                continue
            if not info.distributed and resources.num_workers > 1:
                errors.append(f"{where(loc + ('resources', 'num_workers'))}workload "
                              f"{info.name!r} runs in one process; num_workers must be 1")
                broken.add(base)
                continue
            stages[name] = Stage(
                name=name, base=base, workload=info.name, version=info.version,
                config=config, inputs=dict(concrete.inputs), resources=resources,
                deepspeed=deepspeed, distributed=info.distributed,
                streams_data=info.streams_data, matrix_values=values,
                side=info.side_resources(config, dict(concrete.inputs))
                if info.side_resources else None)
            members[base].append(name)

    for stage in stages.values():
        loc = ("stages", stage.base, "inputs")
        for input_name, value in stage.inputs.items():
            refs = value if isinstance(value, list) else [value]
            resolved: list[tuple[str, str]] = []
            for ref in refs:
                problem, targets = _resolve_ref(ref, stages, members)
                if problem and ref.rsplit(".", 1)[0] in broken:
                    continue  # that stage's own error is already reported
                if problem:
                    errors.append(f"{where(loc + (input_name,))}input {input_name!r}: {problem}")
                    continue
                resolved.extend(targets)
            stage.resolved_inputs[input_name] = resolved
            stage.input_is_list[input_name] = isinstance(value, list) or len(resolved) > 1
            stage.upstream.extend(s for s, _ in resolved if s not in stage.upstream)
        if stage.name in stage.upstream:
            errors.append(f"{where(loc)}stage {stage.name!r} consumes its own output")

    errors = list(dict.fromkeys(errors))  # matrix twins repeat the same problem
    if errors:
        return stages, errors
    order, cycle = toposort({n: s.upstream for n, s in stages.items()})
    if cycle:
        first = stages[cycle[0]].base
        errors.append(f"{where(('stages', first))}the stages form a cycle: "
                      f"{' -> '.join(cycle)}; remove one of these inputs")
        return stages, errors
    return {n: stages[n] for n in order}, errors


def _section_of(e: ValidationError, config_cls) -> str | None:
    """Which block a validation error came from (ResourcesSpec, DeepSpeedSpec or params)."""
    title = e.title
    if title == ResourcesSpec.__name__:
        return "resources"
    if title == DeepSpeedSpec.__name__:
        return "deepspeed"
    return "params"


def _resolve_ref(ref: str, stages: dict[str, Stage], members: dict[str, list[str]]):
    if not isinstance(ref, str) or "." not in ref:
        return (f"{ref!r} is not a reference; write `<stage>.<output>`, e.g. teacher_sft.model",
                [])
    stage_name, output = ref.rsplit(".", 1)
    if "/" in stage_name:  # `stage.output/sub/path`: the split point is the last '.' before '/'
        head, _, tail = ref.partition("/")
        stage_name, output = head.rsplit(".", 1)
        output = f"{output}/{tail}"
        parts = tail.split("/")
        if ".." in parts or tail.startswith("/") or "\\" in tail:
            return (f"{ref!r}: a sub-path stays inside the stage's output folder (no '..', no "
                    f"absolute path); name a file or folder the stage wrote, e.g. "
                    f"{head}/part-0.tar", [])
    if stage_name in stages:
        targets = [stage_name]
    elif stage_name in members:
        targets = members[stage_name]
        if not targets:
            return f"stage {stage_name!r} has errors of its own", []
    else:
        known = sorted(set(stages) | set(members))
        return f"no stage {stage_name!r}{_suggest(stage_name, known)}", []
    outputs = get_workload(stages[targets[0]].workload).outputs
    if outputs and output.split("/", 1)[0] not in outputs:
        return (f"stage {stage_name!r} ({stages[targets[0]].workload}) has no output "
                f"{output!r}; its outputs: {', '.join(outputs)}", [])
    return None, [(t, output) for t in targets]


def toposort(deps: dict[str, list[str]]) -> tuple[list[str], list[str] | None]:
    """Kahn's algorithm in declaration order. Returns (order, None) or ([], cycle path)."""
    remaining = {n: [d for d in ds if d in deps] for n, ds in deps.items()}
    order: list[str] = []
    done: set[str] = set()
    while remaining:
        ready = [n for n, ds in remaining.items() if all(d in done for d in ds)]
        if not ready:
            return [], _find_cycle(remaining)
        for n in ready:
            order.append(n)
            done.add(n)
            del remaining[n]
    return order, None


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    start = next(iter(graph))
    path, seen = [start], {start: 0}
    node = start
    while True:
        node = next(d for d in graph[node] if d in graph)
        if node in seen:
            cycle = path[seen[node]:] + [node]
            return list(reversed(cycle))
        seen[node] = len(path)
        path.append(node)


def ready_stages(stages: dict[str, Stage], done: set[str], started: set[str],
                 failed: set[str]) -> list[str]:
    """Stages not yet started whose upstreams are all done (none failed)."""
    return [n for n, s in stages.items()
            if n not in started and all(u in done for u in s.upstream)
            and not any(u in failed for u in s.upstream)]
