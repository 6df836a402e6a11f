"""Loading a pipeline file: YAML with line numbers -> ``--set`` overrides -> pydantic models ->
matrix expansion and lint (``orchestrator.dag``). Every problem found is reported at once,
each naming the file, line, stage and field."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from orchestrator.dag import expand_and_lint
from orchestrator.spec import (Pipeline, PipelineError, PipelineSpec, apply_overrides,
                               format_pydantic)
from orchestrator.yaml_lines import YamlError, load_yaml_with_lines

__all__ = ["load_pipeline"]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load, override, validate and expand a pipeline file. Raises PipelineError."""
    path = str(path)
    try:
        raw, lines = load_yaml_with_lines(path)
    except YamlError as e:
        raise PipelineError(path, [str(e)]) from None
    if not isinstance(raw, dict):
        raise PipelineError(path, ["the file must be a mapping with `name:` and `stages:`"])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as e:
        raise PipelineError(path, [str(e)]) from None

    def where(loc: tuple) -> str:
        line = lines.line(tuple(loc))
        stage = f"stage {loc[1]!r}, " if len(loc) > 1 and loc[0] == "stages" else ""
        return f"{Path(path).name}:{line}: {stage}" if line else f"{Path(path).name}: {stage}"

    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise PipelineError(path, format_pydantic(e, (), where)) from None

    stages, errors = expand_and_lint(spec, where, format_pydantic)
    if errors:
        raise PipelineError(path, errors)
    return Pipeline(path=path, spec=spec, stages=stages, raw=raw)
