"""Pipeline files: YAML -> pydantic models, `--set` overrides, validation before Ray starts.

A pipeline file::

    name: llava_kd
    defaults:                      # merged into every stage (params: only fields it accepts)
      resources: {num_workers: 1, cpus_per_worker: 1}
      deepspeed: {zero_stage: 2, precision: fp32}
      params: {seed: 0}
    stages:
      teacher_sft:
        workload: sft
        inputs: {init: teacher_pt.model, data: shapes.instruct}
        params: {lr: 1e-3, max_steps: 200}
        resources: {num_workers: 2}
      dft:
        workload: distill
        matrix: {alpha: [0.5, 1.0]}  # one stage per value: dft_alpha-0.5, dft_alpha-1.0

Every problem found is reported at once, each naming the file, line, stage and field.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.yaml_lines import LineIndex

_NAME = r"^[A-Za-z][A-Za-z0-9_\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesSpec(_Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (distributed stages) or 1")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs each worker reserves")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves")


class DeepSpeedSpec(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage 0-3")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16 on GPUs")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer state to CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU")


class StageSpec(_Strict):
    workload: str = Field(description="registered workload name (`mmkd workloads` lists them)")
    description: str = ""
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="name -> `stage.output` reference(s)")
    params: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict)
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="key (param name, or inputs.X / resources.X / deepspeed.X) -> values")


class DefaultsSpec(_Strict):
    resources: dict[str, Any] = Field(default_factory=dict)
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class PipelineSpec(_Strict):
    name: str = Field(pattern=_NAME, description="pipeline name = MLflow experiment name")
    description: str = ""
    store: str | None = Field(None, description="artifact store root: a path or a pyarrow.fs URI")
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    stages: dict[str, StageSpec] = Field(min_length=1)
    tune: dict[str, Any] | None = Field(None, description="optional tune block (`mmkd tune`)")


class PipelineError(ValueError):
    """Every problem of a pipeline file, each naming file:line, stage and field."""

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = errors
        super().__init__(self.__str__())

    def __str__(self) -> str:
        head = f"{self.path}: {len(self.errors)} problem(s) in the pipeline file:"
        return "\n".join([head] + [f"  - {e}" for e in self.errors])


@dataclass
class Stage:
    """One concrete stage after defaults, overrides and matrix expansion."""

    name: str
    base: str  # the stage's name in the file (== name unless expanded from a matrix)
    workload: str
    version: str
    config: BaseModel
    inputs: dict[str, str | list[str]]
    resources: ResourcesSpec
    deepspeed: DeepSpeedSpec
    distributed: bool
    streams_data: bool = False  # runs a Ray Data pipeline that needs a CPU of its own
    side: Any = None  # plugin.SideResources it holds beside its workers while it runs
    matrix_values: dict[str, Any] = field(default_factory=dict)
    upstream: list[str] = field(default_factory=list)
    # input name -> list of (stage, output) it resolves to; single refs are 1-element lists
    resolved_inputs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    input_is_list: dict[str, bool] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")


@dataclass
class Pipeline:
    path: str
    spec: PipelineSpec
    stages: dict[str, Stage]  # in topological order
    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    def upstream_of(self, names: set[str]) -> set[str]:
        """``names`` and every stage they (transitively) consume."""
        out = set(names)
        for name in reversed(list(self.stages)):  # reverse topological order: one pass
            if name in out:
                out.update(self.stages[name].upstream)
        return out

    def match(self, names: list[str], option: str) -> set[str]:
        """Stages named (or matrix base names) on the command line; unknown names are errors."""
        out: set[str] = set()
        for name in names:
            matched = {n for n, s in self.stages.items() if name in (n, s.base)}
            if not matched:
                raise ValueError(f"{option} {name!r}: no such stage in {self.path} "
                                 f"(stages: {', '.join(self.stages)})")
            out |= matched
        return out

    def only(self, targets: list[str]) -> "Pipeline":
        """The sub-pipeline that produces ``targets`` (stage or matrix base names)."""
        keep = self.upstream_of(self.match(targets, "--only"))
        return Pipeline(path=self.path, spec=self.spec, raw=self.raw,
                        stages={n: s for n, s in self.stages.items() if n in keep})

    def downstream_of(self, names: set[str]) -> set[str]:
        """``names`` and every stage that (transitively) consumes them."""
        out = set(names)
        for stage in self.stages.values():  # topological order: one pass suffices
            if any(u in out for u in stage.upstream):
                out.add(stage.name)
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.dft.params.alpha=0.5`` -> (["stages","dft","params","alpha"], 0.5)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. stages.dft.params.alpha=0.5")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides; a path into a stage that does not exist is an error."""
    data = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {'.'.join(parts[:i])} is not a mapping")
            if part not in node:
                if i == 1 and parts[0] == "stages":
                    known = ", ".join(sorted(data.get("stages") or {}))
                    raise ValueError(f"--set {text!r}: no stage {part!r} (stages: {known})")
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"--set {text!r}: {'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = value
    return data


def format_pydantic(e: ValidationError, prefix: tuple, where) -> list[str]:
    msgs = []
    for err in e.errors():
        loc = prefix + tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            what = "unknown key (remove it or check its spelling)"
        elif err["type"] == "missing":
            what = "required field is missing"
        else:
            what = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                what += f" (got {err['input']!r})"
        msgs.append(f"{where(loc)}field {dotted!r}: {what}")
    return msgs


def stage_name_ok(name: str) -> bool:
    return re.match(_NAME, name) is not None


__all__ = [
    "DeepSpeedSpec", "ResourcesSpec", "StageSpec", "PipelineSpec", "Stage", "Pipeline",
    "PipelineError", "apply_overrides", "parse_override", "format_pydantic", "LineIndex",
]
