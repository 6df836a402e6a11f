"""The dependency arrows of the layout: the engine never imports the science, no import cycles,
no reaching into another module's private names, and engine files a reader can hold in mind."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "workloads", "mmkd")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for top in PACKAGES:
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement, nested ones too."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names]))
    return found


def test_the_engine_never_imports_the_science():
    offenders = [f"{name} imports {mod}" for name, (path, pkg) in _modules().items()
                 if name.startswith("orchestrator")
                 for mod, _ in _imports(name, path, pkg) if mod.split(".")[0] == "workloads"]
    assert offenders == []


def test_no_import_cycles():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, pkg) in modules.items():
        targets = set()
        for mod, names in _imports(name, path, pkg):
            for cand in [mod] + [f"{mod}.{n}" for n in names]:
                # importing a.b.c runs a and a.b too; a module's own parents are not a cycle
                parts = cand.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        targets.add(dep)
        graph[name] = targets

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_no_private_names_imported_across_modules():
    offenders = [f"{name}: from {mod} import {n}" for name, (path, pkg) in _modules().items()
                 for mod, names in _imports(name, path, pkg)
                 if mod.split(".")[0] in PACKAGES
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def test_engine_files_stay_readable():
    long = {p.name: n for p in (ROOT / "orchestrator").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_science_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "workloads").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_a_stage_error_is_read_through_rays_wrappers():
    """What `mmkd run` prints for a failed stage is the workload's own exception."""
    import ray.exceptions
    from ray.train import WorkerGroupError

    from orchestrator.plugin import StageError, root_cause
    from orchestrator.stage_outcomes import error_text

    class Bad(StageError):
        pass

    try:
        try:
            raise Bad("1129 of 1129 samples were bad, most are missing_image")
        except Bad as inner:
            raise RuntimeError("UDF failed to process a data block") from inner
    except RuntimeError as udf:
        wrapped = WorkerGroupError("... (Output truncated ...)", {0: udf})
    # as the driver gets them: RayTaskError(X) subclasses X, and its text is Ray's traceback
    task = ray.exceptions.RayTaskError("stage", "traceback text", wrapped).as_instanceof_cause()
    assert isinstance(root_cause(task), Bad)
    assert error_text(task) == "Bad: 1129 of 1129 samples were bad, most are missing_image"
    direct = ray.exceptions.RayTaskError("stage", "  File x.py", Bad("no")).as_instanceof_cause()
    assert isinstance(direct, Bad) and error_text(direct) == "Bad: no"
    plain = ray.exceptions.RayTaskError("stage", "tb", KeyError("tokenizer")).as_instanceof_cause()
    assert error_text(plain) == "KeyError: 'tokenizer'"


def _stage_modules() -> set[str]:
    """The modules that register mmkd's own stages (pyproject's mmkd.workloads entry points)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["entry-points"]["mmkd.workloads"].values())


def test_stage_modules_are_leaves_for_everything_but_other_stages():
    """A stage module (what a pipeline names) may build on another stage's module (distill on
    pretrain/sft's loop setup), but no library module reaches up into one: the pieces a stage
    is made of never depend on the stage."""
    stages = _stage_modules()
    assert "workloads.distill" in stages and "workloads.evaluation.evaluate" in stages
    offenders = [f"{name} imports {mod}" for name, (path, pkg) in _modules().items()
                 if name not in stages
                 for mod, names in _imports(name, path, pkg)
                 for cand in [mod] + [f"{mod}.{n}" for n in names] if cand in stages]
    assert offenders == []
