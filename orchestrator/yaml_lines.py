"""YAML loading that remembers line numbers, rejects duplicate keys and un-shares aliases.

PyYAML silently keeps the last of two equal keys; in a pipeline file that hides a typo'd stage
that was meant to be a second one. Line numbers let every spec error cite where to look.

PyYAML also returns one shared object for an anchor and all its aliases (`<<: *sft`), so a
`--set` on one stage would write through to every stage that shares the anchor. After loading,
every alias becomes its own copy; the expansion is bounded (a "billion laughs" file or a
recursive alias is an error, not a hang).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class YamlError(ValueError):
    pass


# Values (mappings, lists, scalars) the file may expand to through aliases. A pipeline has a few
# hundred; a "billion laughs" file has 10^9.
MAX_EXPANDED_NODES = 200_000
# A pipeline file is a few KB, nested a few levels; these bound what a file can cost to parse
# (a 6 KB file nested 3,000 deep overflowed Python's stack). Environment variables raise them.
MAX_FILE_BYTES = int(os.environ.get("MMKD_MAX_PIPELINE_BYTES", 4 * 1024 * 1024))
MAX_DEPTH = int(os.environ.get("MMKD_MAX_PIPELINE_DEPTH", 64))


def _depth(data: Any) -> int:
    """Nesting depth of mappings and lists, iteratively (no recursion to overflow)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node)
    return deepest


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # explicit keys only: `<<: *anchor` entries may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise YamlError(
                f"line {line}: duplicate key {key!r} (first defined on line {seen[key]}); "
                "rename one of them"
            )
        seen[key] = line
    loader.flatten_mapping(node)  # merged keys first, explicit keys after them (and winning)
    lines = {loader.construct_object(k, deep=deep): k.start_mark.line + 1 for k, _ in node.value}
    mapping = loader.construct_mapping(node, deep=deep)
    loader.lines[id(mapping)] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_with_lines(path: str | Path) -> tuple[Any, "LineIndex"]:
    """Parse ``path``; returns the data and an index from key paths to line numbers."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlError(f"{path}: the file is {size:,} bytes, more than the {MAX_FILE_BYTES:,} "
                            "a pipeline file may have (set MMKD_MAX_PIPELINE_BYTES to raise the "
                            "limit); is it the pipeline, not a data file?")
        text = path.read_text()
    except FileNotFoundError:
        raise YamlError(f"{path}: file not found") from None
    except OSError as e:
        raise YamlError(f"{path}: cannot read ({e.strerror})") from None
    loader = _LineLoader(text)
    loader.lines = {}
    try:
        data = loader.get_single_data()
    except YamlError as e:
        raise YamlError(f"{path}:{str(e).removeprefix('line ')}") from None
    except RecursionError:
        raise YamlError(f"{path}: nested too deeply to parse (a pipeline needs a handful of "
                        f"levels; at most {MAX_DEPTH} are accepted)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise YamlError(f"{path}{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    data = unshare(data, loader.lines, path)
    if _depth(data) > MAX_DEPTH:
        raise YamlError(f"{path}: nested {_depth(data)} levels deep; at most {MAX_DEPTH} are "
                        "accepted (set MMKD_MAX_PIPELINE_DEPTH to raise the limit)")
    return data, LineIndex(data, loader.lines)


def unshare(data: Any, lines: dict[int, dict[Any, int]], path: Any = "<yaml>",
            limit: int = MAX_EXPANDED_NODES) -> Any:
    """A tree copy of ``data`` in which no two places share a mapping or list (YAML aliases
    become copies), keeping the line index of every copied mapping. Raises YamlError for a
    recursive alias or an expansion beyond ``limit`` values."""
    count = 0
    stack: set[int] = set()

    def copy(node: Any) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise YamlError(f"{path}: the file expands to more than {limit:,} values through "
                            f"YAML aliases (`*name`), as nested aliases of aliases do; write "
                            f"the values out or nest fewer aliases")
        if not isinstance(node, (dict, list)):
            return node
        if id(node) in stack:
            raise YamlError(f"{path}: a YAML alias refers to a mapping or list that contains "
                            f"it (a recursive alias); replace the `*name` inside its own anchor")
        stack.add(id(node))
        if isinstance(node, dict):
            out: Any = {k: copy(v) for k, v in node.items()}
            if id(node) in lines:
                lines[id(out)] = lines[id(node)]
        else:
            out = [copy(v) for v in node]
        stack.discard(id(node))
        return out

    return copy(data)


class LineIndex:
    """Maps a key path such as ("stages", "dft", "params", "alpha") to its line number."""

    def __init__(self, data: Any, lines: dict[int, dict[Any, int]]):
        self._index: dict[tuple, int] = {}
        self._walk(data, (), lines)

    def _walk(self, node: Any, prefix: tuple, lines: dict[int, dict[Any, int]]) -> None:
        if isinstance(node, dict):
            own = lines.get(id(node), {})
            for k, v in node.items():
                if k in own:
                    self._index[prefix + (k,)] = own[k]
                self._walk(v, prefix + (k,), lines)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self._walk(v, prefix + (i,), lines)

    def line(self, path: tuple) -> int | None:
        """Line of the deepest known prefix of ``path``."""
        for n in range(len(path), 0, -1):
            if path[:n] in self._index:
                return self._index[path[:n]]
        return None
