"""Stage keys: what a stage's result depends on, hashed, and why a key changed.

A key is sha256 over the stage's *key parts*, each derived, never typed by hand:

- ``code``: a hash of the workload's module and of every module of the same top-level package
  that it imports, transitively (static ``import`` statements, found with ``ast``). Each module
  is hashed as its syntax tree, so comments and formatting do not count but any change to code
  or docstrings does. A package that imports its own modules by scanning its folder
  (hands its ``__path__`` to ``pkgutil``: the merge-method and divergence registries) counts all of them.
  Module granularity: editing one function changes the key of every workload whose import
  closure holds that module. What it misses: other dynamic imports
  (``importlib.import_module(name)`` with a computed name, entry points of other packages)
  and code outside the package (libraries: see ``libraries``).
- ``libraries``: the installed versions of the libraries that change numerics.
- ``params``: the resolved, validated config; ``salt``: the workload's optional ``version``.
- ``inputs``: the keys of the upstream results the stage reads.
- ``resources``: what changes numerics (threads per worker, a GPU or not; for Ray Train
  stages the worker count and the DeepSpeed settings).
- ``external``: a fingerprint of every file the stage reads that no upstream stage made
  (the workload's ``fingerprint`` hook: data files, images under ``image_root``, local model
  directories), a manifest of names, sizes and modification times.

The parts of every published result are kept beside it (``_mmkd.json``) and in a small index
per pipeline and stage, so ``mmkd plan`` can say which part changed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

NUMERIC_LIBRARIES = ("torch", "transformers", "deepspeed", "tokenizers", "safetensors", "numpy",
                     "pillow", "ray")


@functools.lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.lru_cache(maxsize=None)
def _package_root(top: str) -> tuple[Path | None, bool]:
    """(folder of package ``top``, True) or (file of module ``top``, False)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None, False
    if spec is None:
        return None, False
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]), True
    return (Path(spec.origin), False) if spec.origin else (None, False)


def _module_file(name: str) -> tuple[Path, bool] | None:
    """(source file, is a package) of module ``name``, found on disk without importing it."""
    top, *rest = name.split(".")
    root, is_pkg = _package_root(top)
    if root is None:
        return None
    if not is_pkg:
        return (root, False) if not rest and root.suffix == ".py" else None
    base = root.joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file() and rest:
        return base.with_suffix(".py"), False
    return None


def _imported_names(imports: list, name: str, is_pkg: bool) -> set[str]:
    """Module names the import statements ``imports`` (``_statements``) of module ``name``
    load."""
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for level, module, names in imports:
        if level is None:  # import a.b, c
            found.update(names)
            continue
        if level:
            parts = package.split(".")
            parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
            base = ".".join(parts + ([module] if module else []))
        else:
            base = module or ""
        found.add(base)
        found.update(f"{base}.{alias}" for alias in names)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}


def _statements(tree: ast.AST) -> list:
    """Every import statement of ``tree`` as ``[level | None, module, [names]]``."""
    out: list = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.append([None, None, [alias.name for alias in node.names]])
        elif isinstance(node, ast.ImportFrom):
            out.append([node.level, node.module, [alias.name for alias in node.names]])
    return out


def _discovers_modules(tree: ast.AST) -> bool:
    """Whether a package imports its own modules by scanning its folder: it hands its
    ``__path__`` to something (``pkgutil.iter_modules(__path__)`` or a helper that calls it)."""
    return any(isinstance(n, ast.Name) and n.id == "__path__" for n in ast.walk(tree))


@functools.lru_cache(maxsize=None)
def _module_summary(path: Path, mtime_ns: int, cache_dir: Path | None) -> tuple[str, list, bool]:
    """(hash of the syntax tree, import statements, scans its folder) of the source ``path``.
    Parsing is what costs (a ``mmkd run`` parses ~90 modules: ~1.5 s on 2 cores), so the
    summary is kept in ``cache_dir`` under the sha256 of the source's bytes and of the Python
    that parsed it: a function of both, it cannot go stale. An unreadable or unwritable cache
    only costs the parse."""
    raw = path.read_bytes()
    entry = None
    if cache_dir is not None:
        ident = hashlib.sha256(raw + b"\0" + sys.version.encode()).hexdigest()
        entry = cache_dir / ident[:2] / f"{ident}.json"
        try:
            digest, imports, scans = json.loads(entry.read_text())
            return digest, imports, scans
        except (OSError, ValueError, TypeError):
            pass
    tree = ast.parse(raw, filename=str(path))
    summary = (hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16], _statements(tree),
               _discovers_modules(tree))
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(summary))
            os.replace(tmp, entry)
        except OSError:
            pass
    return summary


def code_fingerprint(module: str, cache_dir: Path | None = None) -> dict[str, str]:
    """``{module: hash}`` for ``module`` and every module of its top-level package it imports,
    transitively. Unknown modules (not on disk as source) hash as ``"?"``. ``cache_dir``: where
    parsed modules are remembered (``_module_summary``)."""
    top = module.split(".")[0]
    out: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        found = _module_file(name)
        if found is None:
            if name == module:
                out[name] = "?"
            continue
        path, is_pkg = found
        digest, imports, scans = _module_summary(path, path.stat().st_mtime_ns, cache_dir)
        out[name] = digest
        todo.extend(n for n in _imported_names(imports, name, is_pkg)
                    if n.split(".")[0] == top and n not in out)
        if is_pkg and scans:  # a registry folder: every module counts
            todo.extend(f"{name}.{f.stem}" for f in sorted(path.parent.glob("*.py"))
                        if f.stem != "__init__")
    return dict(sorted(out.items()))


def key_of(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- why a key changed ---------------------------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def explain_change(old: dict[str, Any], new: dict[str, Any],
                   input_stages: dict[str, list[str]] | None = None, most: int = 3) -> str:
    """One line saying which key parts differ between an earlier result's parts and now."""
    reasons: list[str] = []
    if old.get("workload") != new.get("workload"):
        reasons.append(f"workload {old.get('workload')} -> {new.get('workload')}")
    changed_code = [m for m in sorted(set(old.get("code", {})) | set(new.get("code", {})))
                    if old.get("code", {}).get(m) != new.get("code", {}).get(m)]
    if changed_code:
        shown = ", ".join(changed_code[:most]) + (f" (+{len(changed_code) - most})"
                                                  if len(changed_code) > most else "")
        reasons.append(f"code changed: {shown}")
    for part in ("params", "resources", "libraries"):
        a, b = _flatten(old.get(part, {})), _flatten(new.get(part, {}))
        diffs = [f"{part}.{k} {_short(a.get(k))} -> {_short(b.get(k))}"
                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if part == "libraries":
            diffs = [d.removeprefix("libraries.") for d in diffs]
        reasons += diffs[:most] + ([f"(+{len(diffs) - most} more {part})"]
                                   if len(diffs) > most else [])
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(old_in) | set(new_in)):
        if old_in.get(name) != new_in.get(name):
            stages = (input_stages or {}).get(name)
            reasons.append(f"upstream {', '.join(stages)} changed" if stages
                           else f"input {name} changed")
    old_ext, new_ext = old.get("external", {}), new.get("external", {})
    for name in sorted(set(old_ext) | set(new_ext)):
        if old_ext.get(name) != new_ext.get(name):
            reasons.append(f"files of {name} changed")
    if old.get("salt") != new.get("salt"):
        reasons.append(f"version {old.get('salt')} -> {new.get('salt')}")
    return "; ".join(reasons) or "key parts equal (an older key scheme)"
