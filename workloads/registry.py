"""The workload registry: every stage type, registered explicitly by name.

A workload is a function ``fn(config, ctx) -> dict | None`` plus a typed pydantic config
class. Pipeline files name workloads only by their registry key (``workload: sft``); there is
no dotted-import lookup from YAML.

    @workload("sft", config=SFTConfig, version="1", outputs=("model",), distributed=True)
    def sft(config: SFTConfig, ctx: StageContext) -> dict[str, float]:
        ...

``version`` goes into every stage key: bump it when a change to the workload's code changes
its results, so cached outputs of the old code are not reused.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

__all__ = [
    "WorkloadConfig",
    "WorkloadInfo",
    "workload",
    "get_workload",
    "list_workloads",
    "UnknownWorkloadError",
]


class WorkloadConfig(BaseModel):
    """Base class for workload configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    fn: Callable[..., Any]
    config: type[BaseModel]
    version: str
    outputs: tuple[str, ...]
    # True: the workload starts its own Ray Train run (its workers hold the resources), so the
    # stage task itself takes no CPU. False: the stage task does the work and holds the resources.
    distributed: bool = False
    # True: the stage runs a Ray Data pipeline beside its own work (a non-distributed stage that
    # streams a data set); the runner then reserves a CPU for that pipeline, as for Ray Train.
    streams_data: bool = False
    description: str = ""
    # Optional fn(config) -> str hashing external data the stage reads (files named in params).
    fingerprint: Callable[[Any], str] | None = None
    # Optional fn(config, inputs: dict[str, list[str] | str]) -> list[str] of problems, run by
    # `mmkd validate` before Ray starts (paths exist, vocabularies match, ...).
    validate: Callable[..., list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, WorkloadInfo] = {}

# Modules whose import registers workloads. Explicit, so `mmkd workloads` lists everything
# without scanning the file system.
_WORKLOAD_MODULES = (
    "workloads.debug",
    "workloads.data.workloads",
    "workloads.training",
    "workloads.evaluate",
    "workloads.distill",
    "workloads.merge",
)
_loaded = False


class UnknownWorkloadError(KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown workload {self.name!r}; registered workloads: {', '.join(self.known)}"


def workload(
    name: str,
    *,
    config: type[BaseModel],
    version: str = "1",
    outputs: tuple[str, ...] = (),
    distributed: bool = False,
    streams_data: bool = False,
    fingerprint: Callable[[Any], str] | None = None,
    validate: Callable[..., list[str]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the workload ``name`` (snake_case)."""
    if not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"workload names are snake_case, got {name!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"workload {name!r} registered twice ({_REGISTRY[name].fn} and {fn})")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = WorkloadInfo(
            name=name,
            fn=fn,
            config=config,
            version=str(version),
            outputs=tuple(outputs),
            distributed=distributed,
            streams_data=streams_data or distributed,
            description=doc[0] if doc else "",
            fingerprint=fingerprint,
            validate=validate,
        )
        return fn

    return register


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in _WORKLOAD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # Only tolerate the module itself not existing yet; a missing dependency inside it
            # is a real error the user must see.
            if e.name != module:
                raise
    _loaded = True


def get_workload(name: str) -> WorkloadInfo:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownWorkloadError(name, sorted(_REGISTRY)) from None


def list_workloads() -> list[WorkloadInfo]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
