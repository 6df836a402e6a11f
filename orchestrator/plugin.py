"""The plugin contract: what a workload is, what it receives, and how mmkd finds it.

A workload is a function ``fn(config, ctx) -> dict | None`` plus a typed config class::

    from orchestrator.plugin import StageContext, WorkloadConfig, workload

    class MyConfig(WorkloadConfig):
        alpha: float = 1.0

    @workload("my_stage", config=MyConfig, outputs=("model",), distributed=True)
    def my_stage(config: MyConfig, ctx: StageContext) -> dict[str, float]:
        ...  # write ctx.output_dir/model; return final metrics

Pipeline files name workloads only by their registry key (``workload: my_stage``). mmkd finds
them through the Python entry-point group ``mmkd.workloads``: an entry point's name is a
workload's name and its value the module whose import registers it (mmkd's own are declared in
its pyproject.toml exactly like a user's package declares its own)::

    [project.entry-points."mmkd.workloads"]
    my_stage = "my_package.stages"

Only the modules of the workloads a pipeline names are imported (a cached rerun of a small
pipeline never imports torch). ``MMKD_PLUGINS=pkg.module,...`` imports further modules without
packaging (a notebook, a benchmark); it reaches stage tasks with the driver's env.

After a stage, the engine checks that every declared output exists in ``ctx.output_dir``; a
``summary.md`` the stage writes there is printed by ``mmkd run`` and ``mmkd show``.
Stage keys follow the workload's code, library versions and the external files its config
names (``orchestrator/keys.py``); ``version`` is an optional salt.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict

__all__ = ["WorkloadConfig", "WorkloadInfo", "workload", "get_workload", "list_workloads",
           "UnknownWorkloadError", "PluginError", "Resources", "StageContext", "ENTRY_POINTS",
           "load_entry_points", "missing_outputs", "SUMMARY_FILE", "HEADLINE_FILE", "StageError",
           "iter_causes", "root_stage_error", "root_cause", "SideResources"]

logger = logging.getLogger("mmkd")

ENTRY_POINTS = "mmkd.workloads"
SUMMARY_FILE = "summary.md"  # optional: a stage's markdown summary (a results table), printed
# optional: a stage's headline for the pipeline's MLflow run, so the runs table and chart view
# compare pipeline runs: {"metrics": {"teacher/accuracy": 0.57, ...}, "artifacts": ["results/
# results.md", ...]} (artifact paths relative to the stage output)
HEADLINE_FILE = "headline.json"


class WorkloadConfig(BaseModel):
    """Base class for workload configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class SideResources:
    """Resources a stage holds outside its own workers (or task) while it runs, e.g. the
    replicas of a teacher service. Stages running at once with the same ``key`` share them:
    the runner and ``mmkd tune`` count them once per key. ``what`` names them in messages
    ("teacher service replicas (`teacher_resources`)"); ``hint`` says how to lower them.

    A stage told that later stages of its run share its side resources (``ctx.side_later``)
    may keep them for those (a teacher service stays loaded); ``release(run_id)`` (a module-level
    function) is called by the runner, or ``mmkd tune``, when the run ends, to free what was
    kept for it."""

    key: str
    cpus: float = 0.0
    gpus: float = 0.0
    what: str = "side resources"
    hint: str = ""
    release: Callable[[str], None] | None = None


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
    # fn(config) -> {field: hash} of the external files the stage reads; None: the engine's
    # ``orchestrator.fingerprint.config_fingerprint`` (manifests of the paths the config names).
    fingerprint: Callable[[Any], dict[str, str]] | None = None
    # Optional fn(config, inputs: dict[str, list[str] | str]) -> list[str] of problems, run by
    # `mmkd validate` before Ray starts (paths exist, vocabularies match, ...).
    validate: Callable[..., list[str]] | None = None
    # Optional fn(config, inputs) -> SideResources | None: what the stage holds beside its
    # workers while it runs (admission control, the cluster-fit check, tune's concurrency).
    side_resources: Callable[..., SideResources | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.fn.__module__

    @property
    def source(self) -> str:
        """The installed distribution (or module) the workload comes from."""
        return _SOURCES.get(self.module) or f"module {self.module}"


_REGISTRY: dict[str, WorkloadInfo] = {}
_SOURCES: dict[str, str] = {}  # module -> distribution that declared it as an entry point


class UnknownWorkloadError(KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown workload {self.name!r}; registered workloads: {', '.join(self.known)}"


class PluginError(ImportError):
    """A plugin module named by an entry point (or MMKD_PLUGINS) failed to import."""


def workload(
    name: str,
    *,
    config: type[BaseModel],
    version: str = "1",
    outputs: tuple[str, ...] = (),
    distributed: bool = False,
    streams_data: bool = False,
    fingerprint: Callable[[Any], dict[str, str]] | None = None,
    validate: Callable[..., list[str]] | None = None,
    side_resources: Callable[..., SideResources | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the workload ``name`` (snake_case)."""
    if not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"workload names are snake_case, got {name!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            old = _REGISTRY[name]
            raise PluginError(f"workload {name!r} is registered twice: by {old.module} "
                              f"({old.source}) and by {fn.__module__}; rename one of them")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = WorkloadInfo(
            name=name, fn=fn, config=config, version=str(version), outputs=tuple(outputs),
            distributed=distributed, streams_data=streams_data or distributed,
            description=doc[0] if doc else "", fingerprint=fingerprint, validate=validate,
            side_resources=side_resources)
        return fn

    return register


def _entry_points(group: str) -> list[tuple[str, str, str]]:
    """(name, module, distribution) of every entry point of ``group``."""
    return [(ep.name, ep.value.split(":")[0], ep.dist.name if ep.dist else "?")
            for ep in importlib.metadata.entry_points(group=group)]


def _import_plugin(module: str, dist: str, group: str) -> None:
    _SOURCES.setdefault(module, dist)
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback
        raise PluginError(f"plugin module {module!r} (from {dist}, entry-point group "
                          f"{group!r}) failed to import: {type(e).__name__}: {e}") from e


def env_plugins() -> list[str]:
    """The modules ``MMKD_PLUGINS`` names."""
    return [m.strip() for m in os.environ.get("MMKD_PLUGINS", "").split(",") if m.strip()]


def plugin_env() -> dict[str, str]:
    """What another process needs to import the ``MMKD_PLUGINS`` modules as this one does:
    the variable itself and ``PYTHONPATH`` with the folder each module was found in (a
    one-file plugin beside the pipeline is on the driver's path, not on a Ray worker's)."""
    import importlib.util

    plugins = env_plugins()
    if not plugins:
        return {}
    folders = []
    for module in plugins:
        try:
            spec = importlib.util.find_spec(module.split(".")[0])
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None) if spec else None
        if origin and origin not in ("built-in", "frozen"):
            top = os.path.dirname(origin)
            if spec.submodule_search_locations:  # a package: its parent folder
                top = os.path.dirname(top)
            folders.append(top)
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path += [f for f in dict.fromkeys(folders) if f not in path]
    return {"MMKD_PLUGINS": ",".join(plugins), **({"PYTHONPATH": os.pathsep.join(path)}
                                                   if path else {})}


def load_entry_points(group: str, names: set[str] | None = None) -> list[str]:
    """Import the modules the entry-point ``group`` names (only those of ``names`` when
    given) and the ``MMKD_PLUGINS`` modules (for every group: such a module may register a
    workload, a divergence, a merge method...); returns the module names. Every process that
    resolves a plugin calls this (the driver, stage tasks, Ray Train workers, tune trials,
    the teacher service), and stage tasks carry the driver's ``MMKD_PLUGINS`` and the folders
    those modules were found in (``plugin_env``)."""
    found = [(module, dist) for name, module, dist in _entry_points(group)
             if names is None or name in names]
    found += [(m, "MMKD_PLUGINS") for m in env_plugins()]
    for module, dist in found:
        _import_plugin(module, dist, group)
    return [m for m, _ in found]


_loaded_all = False


def get_workload(name: str) -> WorkloadInfo:
    global _loaded_all
    if name not in _REGISTRY:
        load_entry_points(ENTRY_POINTS, {name})
    if name not in _REGISTRY and not _loaded_all:  # a module that registers it under no name
        _loaded_all = True
        load_entry_points(ENTRY_POINTS)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownWorkloadError(name, sorted(_REGISTRY)) from None


def list_workloads() -> list[WorkloadInfo]:
    global _loaded_all
    if not _loaded_all:
        _loaded_all = True
        load_entry_points(ENTRY_POINTS)
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def missing_outputs(info: WorkloadInfo, output_dir: str) -> list[str]:
    """Declared outputs the stage did not write."""
    return [o for o in info.outputs if not os.path.exists(os.path.join(output_dir, o))]


# -- errors -----------------------------------------------------------------------------------

class StageError(RuntimeError):
    """Deterministic: the stage's inputs or config are wrong; retrying gives the same error."""

    deterministic = True


def iter_causes(exc: BaseException | None, _seen: set[int] | None = None
                ) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: ``__cause__``/``__context__``, Ray's ``.cause``, and
    each worker's error of a Ray Train ``WorkerGroupError``."""
    seen = _seen if _seen is not None else set()
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    inner: list[Any] = [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner += [failures[k] for k in sorted(failures)]
    for e in inner:
        if isinstance(e, BaseException):
            yield from iter_causes(e, seen)


def _ray_wrapper(e: BaseException) -> bool:
    # RayTaskError(X) is made a subclass of X (as_instanceof_cause): it looks like the stage's
    # own error but its text is Ray's traceback; the original is its .cause
    return type(e).__module__.startswith("ray.")


def root_stage_error(exc: BaseException) -> BaseException | None:
    """The first deterministic stage error inside ``exc`` (not a Ray wrapper of it), or None."""
    for e in iter_causes(exc):
        if getattr(e, "deterministic", False) and not _ray_wrapper(e):
            return e
    return None


def root_cause(exc: BaseException) -> BaseException:
    """What a user should read of a stage failure: its deterministic stage error if there is
    one, else the outermost exception that is not one of Ray's wrappers (RayTaskError,
    WorkerGroupError, UserCodeException)."""
    found = root_stage_error(exc)
    if found is not None:
        return found
    return next((e for e in iter_causes(exc) if not _ray_wrapper(e)), exc)


# -- what a workload receives ------------------------------------------------------------------
# The context is a plain picklable dataclass: it travels into Ray tasks and into every Ray Train
# worker inside the worker's config dict.


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class StageContext:
    pipeline: str
    stage: str
    key: str
    # Local directory the workload writes its outputs into (``model/``, data files, ...).
    # The runner moves it into the artifact store only after the workload returns.
    output_dir: str
    # Input name -> local path (or list of paths) of the referenced upstream outputs.
    inputs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # Persistent storage for in-stage checkpoints (a local path or a pyarrow.fs URI). Together
    # with ``run_name`` (derived from the stage key) a restarted stage finds its checkpoints.
    checkpoint_storage: str = ""
    run_name: str = ""
    seed: int = 0
    # Ray actor handle of the driver's progress hub; None outside a pipeline run.
    reporter: Any = None
    # Metrics reported while running without a reporter (unit tests, local calls).
    local_metrics: list[dict[str, Any]] = field(default_factory=list)
    # Input name -> the upstream stage names behind it, in the order of ``inputs`` (a matrix
    # reference lists every member: ``sft_seed-0``, ``sft_seed-1``, ...).
    input_stages: dict[str, list[str]] = field(default_factory=dict)
    # The pipeline run's id (``run-...``; ``tune-<name>`` for a tune's trials); "" outside runs.
    run_id: str = ""
    # Stages of this run, not started yet, that share this stage's side resources (the same
    # ``SideResources.key``): a workload may keep them for those (see ``SideResources``).
    side_later: int = 0

    def report(self, metrics: dict[str, float], step: int | None = None,
               total_steps: int | None = None) -> None:
        """Send per-step metrics to the driver (MLflow + live view). Call from one rank only."""
        event = {"stage": self.stage, "step": step, "total_steps": total_steps,
                 "metrics": {k: float(v) for k, v in metrics.items()}, "time": time.time()}
        if self.reporter is None:
            self.local_metrics.append(event)
            return
        self.reporter.report.remote(event)

    def log(self, message: str, level: str = "info") -> None:
        """A line for the driver's console (warnings about skipped samples, etc.)."""
        getattr(logger, level)("[%s] %s", self.stage, message)
        if self.reporter is not None:
            self.reporter.log.remote({"stage": self.stage, "level": level, "message": message,
                                      "time": time.time()})

    def input(self, name: str) -> Any:
        try:
            return self.inputs[name]
        except KeyError:
            raise KeyError(
                f"stage {self.stage!r} needs input {name!r}; it has {sorted(self.inputs)}. "
                f"Add `inputs: {{{name}: <stage>.<output>}}` to the stage in the pipeline file."
            ) from None
