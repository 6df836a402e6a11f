"""`mmkd tune`: Ray Tune over one stage's params, upstream stages reused from the cache.

A tune spec is a YAML file (or a `tune:` block inside a pipeline file)::

    pipeline: llava_kd.yaml          # relative to this file (omit inside a pipeline's tune block)
    stage: dft                       # the stage whose params are searched
    space:
      alpha: {uniform: [0.0, 2.0]}
      temperature: {choice: [1.0, 2.0, 4.0]}
      gamma: {loguniform: [0.01, 1.0]}
      beta: {grid: [0.0, 1.0]}
    metric: loss                     # reported by the stage
    mode: min
    num_samples: 8
    search: optuna                   # or random
    scheduler: {type: asha, grace_period: 3, reduction_factor: 2}

Each trial runs the stage exactly as `mmkd run` would (same task, same artifact store, keyed by
the trial's params), forwarding the stage's per-step metrics to Tune so ASHA can stop it early.
The best trial's output is therefore cached: the printed `mmkd run ... --set` line reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.artifact_store import compute_keys
from orchestrator.loader import load_pipeline
from orchestrator.spec import Pipeline
from orchestrator.yaml_lines import YamlError, load_yaml_with_lines

_KINDS = ("uniform", "loguniform", "choice", "grid", "randint")


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="steps every trial runs before it may stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, description="budget in steps (default: the stage's steps)")


class SelectSpec(BaseModel):
    """Pick the best trial by an evaluation stage that consumes the tuned stage."""
    model_config = ConfigDict(extra="forbid")
    stage: str = Field(description="a stage that takes the tuned stage's output as an input")
    metric: str = Field(description="a metric that stage returns, e.g. kd/accuracy")
    mode: Literal["min", "max"] = "max"
    split: Literal["val", "as_written"] = Field(
        "val", description="val: the select stage reads the validation split wherever its "
                           "pipeline gives it a held-out `eval` output that has a `val` twin "
                           "(shapes.eval -> shapes.val), so trials are chosen on validation "
                           "and the held-out set only reports; as_written: the pipeline's inputs")


class TuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: str | None = Field(None, description="pipeline file, relative to the tune file")
    stage: str
    space: dict[str, dict[str, Any]] = Field(min_length=1)
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    smooth: int = Field(10, ge=1, description=(
        "trials report the mean of `metric` over their last N steps (one batch's loss is too "
        "noisy for ASHA to compare trials by); 1 = the raw per-step value"))
    num_samples: int = Field(8, ge=1)
    search: Literal["random", "optuna"] = "random"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    select: SelectSpec | None = Field(
        None, description="choose the best trial by this evaluation (default: by `metric`)")
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0
    name: str | None = Field(None, description="tune name (default: <pipeline>-<stage>-<hash>): "
                                               "a folder name, letters, digits, '_', '.', '-'")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value):
            raise ValueError(f"{value!r} names the tune's results folder: start with a letter "
                             f"or digit, then letters, digits, '_', '.' or '-' (no '/', no '..')")
        return value


class TuneError(ValueError):
    pass


def load_tune(path: str, overrides: list[str] = ()) -> tuple[TuneSpec, Pipeline]:
    """A tune file or a pipeline file with a `tune:` block; errors name the file and the entry."""
    try:
        raw, _ = load_yaml_with_lines(path)
    except YamlError as e:
        raise TuneError(str(e)) from None
    if isinstance(raw, dict) and "stages" in raw:
        if not raw.get("tune"):
            raise TuneError(f"{path}: a pipeline file needs a `tune:` block to be tuned")
        block, pipeline_path = raw["tune"], path
    else:
        block = raw
        rel = (raw or {}).get("pipeline") if isinstance(raw, dict) else None
        if not rel:
            raise TuneError(f"{path}: field 'pipeline': name the pipeline file to tune")
        pipeline_path = str((Path(path).parent / rel).resolve())
    try:
        spec = TuneSpec.model_validate(block)
    except ValidationError as e:
        msgs = [f"field {'.'.join(map(str, x['loc']))!r}: {x['msg']}" for x in e.errors()]
        raise TuneError(f"{path}: " + "; ".join(msgs)) from None
    pipeline = load_pipeline(pipeline_path, list(overrides))
    if spec.select is not None and spec.select.split == "val":
        to_val = _validation_inputs(pipeline, spec.select.stage)
        if to_val:
            pipeline = load_pipeline(pipeline_path, list(overrides) + to_val)
    target = _target(spec, pipeline, path)
    problems = [p for name, entry in spec.space.items()
                for p in _check_entry(name, entry, pipeline.stages[target].config)]
    if spec.select is not None:
        sel = pipeline.stages.get(spec.select.stage)
        if sel is None:
            problems.append(f"select.stage: no stage {spec.select.stage!r}")
        elif spec.select.stage == target or \
                spec.select.stage not in pipeline.downstream_of({target}):
            problems.append(f"select.stage: {spec.select.stage!r} does not depend on {target!r}, "
                            f"so it cannot rank its trials; name a stage downstream of it")
    if problems:
        raise TuneError(f"{path}: " + "; ".join(problems))
    return spec, pipeline


def _validation_inputs(pipeline: Pipeline, select: str) -> list[str]:
    """``--set`` overrides pointing the select stage's held-out inputs at their validation
    twins: ``<stage>.eval`` becomes ``<stage>.val`` where that stage's workload writes both."""
    from orchestrator.plugin import get_workload

    stage = pipeline.stages.get(select)
    raw = ((pipeline.raw.get("stages") or {}).get(select) or {}).get("inputs") or {}
    if stage is None:
        return []
    out = []
    for name, value in raw.items():
        refs = value if isinstance(value, list) else [value]
        new = []
        for ref in refs:
            src, _, output = str(ref).rpartition(".")
            wl = pipeline.stages[src].workload if src in pipeline.stages else None
            if output == "eval" and wl and "val" in get_workload(wl).outputs:
                new.append(f"{src}.val")
            else:
                new.append(ref)
        if new != refs:
            shown = new if isinstance(value, list) else new[0]
            out.append(f"stages.{select}.inputs.{name}={json.dumps(shown)}")
    return out


def _target(spec: TuneSpec, pipeline: Pipeline, path: str) -> str:
    if spec.stage in pipeline.stages:
        return spec.stage
    raise TuneError(f"{path}: field 'stage': no stage {spec.stage!r} in {pipeline.path} "
                    f"(stages: {', '.join(pipeline.stages)})")


def _check_entry(name: str, entry: dict[str, Any], config: BaseModel) -> list[str]:
    where = f"space.{name}"
    if name not in type(config).model_fields:
        return [f"{where}: the stage's workload has no param {name!r} "
                f"(params: {', '.join(type(config).model_fields)})"]
    if len(entry) != 1 or next(iter(entry)) not in _KINDS:
        return [f"{where}: write exactly one of {', '.join(_KINDS)}, e.g. {{uniform: [0, 1]}}"]
    kind, args = next(iter(entry.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            return [f"{where}.{kind}: needs a non-empty list of values"]
        values = args
    else:
        if not (isinstance(args, list) and len(args) == 2
                and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1]):
            return [f"{where}.{kind}: needs [low, high] numbers with low < high"]
        if kind == "loguniform" and args[0] <= 0:
            return [f"{where}.loguniform: bounds must be > 0"]
        values = args
    problems = []
    for v in values:  # every value must be a valid param value
        try:
            type(config).model_validate({**config.model_dump(), name: v})
        except ValidationError as e:
            problems.append(f"{where}: value {v!r} is invalid for the stage: "
                            f"{e.errors()[0]['msg']}")
    return problems


def param_space(spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    out = {}
    for name, entry in spec.space.items():
        kind, args = next(iter(entry.items()))
        out[name] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                     "randint": lambda a: tune.randint(*a), "choice": tune.choice,
                     "grid": tune.grid_search}[kind](args)
    return out


def tune_name(spec: TuneSpec, pipeline: Pipeline) -> str:
    """Deterministic, so `--resume` finds the sweep; no timestamps."""
    if spec.name:
        return spec.name
    blob = json.dumps([spec.model_dump(mode="json"), compute_keys(pipeline.stages)], sort_keys=True)
    return f"{pipeline.name}-{spec.stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def upstream_pipeline(pipeline: Pipeline, stage: str, select: str | None = None) -> Pipeline:
    """What the trials depend on, other than the tuned stage itself: run once, then cached."""
    needed = {stage} | ({select} if select else set())
    for name in reversed(list(pipeline.stages)):
        if name in needed:
            needed.update(pipeline.stages[name].upstream)
    needed -= pipeline.downstream_of({stage})
    sub = copy.copy(pipeline)
    sub.stages = {n: s for n, s in pipeline.stages.items() if n in needed}
    return sub


def select_chain(pipeline: Pipeline, stage: str, select: str) -> list[Any]:
    """The stages a trial runs after the tuned one, in order, ending with ``select``: those
    downstream of ``stage`` that ``select`` (transitively) needs."""
    needed = {select}
    for name in reversed(list(pipeline.stages)):
        if name in needed:
            needed.update(pipeline.stages[name].upstream)
    down = pipeline.downstream_of({stage}) - {stage}
    return [s for n, s in pipeline.stages.items() if n in needed and n in down]


def default_concurrency(pipeline: Pipeline, stage: str) -> int:
    """Trials that fit at once: the cluster's CPUs over what one trial's stage occupies
    (workers, plus a CPU for its data pipeline: ``executor.own_cpus``), after what the trials
    share once (a teacher service's replicas: ``Stage.side``)."""
    import ray

    from orchestrator.executor import own_cpus

    s = pipeline.stages[stage]
    shared = s.side.cpus if s.side else 0.0
    need = max(own_cpus(s), 0.1)
    return max(1, int((ray.cluster_resources().get("CPU", 1) - shared) // need))
