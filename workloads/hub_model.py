"""``hub_model``: a published checkpoint (Hugging Face hub id, or a local directory) as a stage
output, so a pretrained teacher, student or merge parent is an input like any trained model.

    teacher:
      workload: hub_model
      params: {repo: Qwen/Qwen2.5-VL-7B-Instruct, revision: <commit sha>}

The hub is only contacted when the stage runs (on the cluster, where the machine can reach it or
has the model in its HF cache): ``mmkd validate --offline`` and ``mmkd plan --offline`` check the
id's form and nothing else. Pin ``revision`` to a commit for a reproducible key: a branch name
(``main``) is part of the key as written, not the commit it points to today. A local directory
is copied, and its files' names, sizes and times are part of the key like any local path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from pydantic import Field

from orchestrator.plugin import StageContext, WorkloadConfig, workload

__all__ = ["HubModelConfig", "hub_model"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model directory needs; no optimizer states, no other frameworks' weights.
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubModelConfig(WorkloadConfig):
    """A published checkpoint of a supported VLM family."""

    repo: str = Field(description="hub id (owner/name) or a local model directory")
    revision: str | None = Field(None, description="hub commit, tag or branch (pin a commit "
                                                   "for a reproducible stage key)")


def _problems(config: HubModelConfig, inputs: dict | None = None) -> list[str]:
    if os.path.isdir(config.repo):
        return [p for p in [_family_problem(config.repo)] if p]
    if os.path.isabs(config.repo) or config.repo.startswith("."):
        return [f"repo: {config.repo} is not a directory; give an existing model directory or a "
                f"hub id like Qwen/Qwen2.5-VL-7B-Instruct"]
    if not _REPO_ID.match(config.repo):
        return [f"repo: {config.repo!r} is neither a local directory nor a hub id of the form "
                f"owner/name (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"]
    return []


def _family_problem(model_dir: str) -> str | None:
    from workloads.families import family_of

    cfg_file = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_file):
        return f"repo: {model_dir} holds no config.json; point it at a save_pretrained directory"
    model_type = json.load(open(cfg_file)).get("model_type")
    try:
        family_of(model_type)
    except ValueError as e:
        return f"repo: {model_dir}: {e}"
    from workloads.model_spec import config_problem

    return config_problem(model_dir, "repo")


@workload("hub_model", config=HubModelConfig, version="1", outputs=("model",),
          validate=_problems)
def hub_model(config: HubModelConfig, ctx: StageContext) -> dict[str, Any]:
    """A published checkpoint (hub id or local dir) as this stage's `model` output."""
    from workloads.models import ModelCompatError

    out = os.path.join(ctx.output_dir, "model")
    if os.path.isdir(config.repo):
        shutil.copytree(config.repo, out)
        source = {"repo": os.path.abspath(config.repo)}
    else:
        problems = _problems(config)
        if problems:
            raise ModelCompatError(f"stage {ctx.stage!r}: {problems[0]}")
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(config.repo, revision=config.revision, local_dir=out,
                                     allow_patterns=_PATTERNS)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, no disk...
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ModelCompatError(
                f"stage {ctx.stage!r}: could not fetch {config.repo}"
                f"{'@' + config.revision if config.revision else ''} from the Hugging Face hub "
                f"({type(e).__name__}: {reason}). The machine running this stage needs hub "
                f"access (and a token for a gated model) or the model in its HF cache "
                f"(HF_HOME); or set `repo` to a local model directory") from e
        source = {"repo": config.repo, "revision": config.revision, "path": path}
    problem = _family_problem(out)
    if problem:
        raise ModelCompatError(f"stage {ctx.stage!r}: {problem}")
    with open(os.path.join(ctx.output_dir, "source.json"), "w") as f:
        json.dump(source, f, indent=2)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    ctx.log(f"{config.repo} -> {out} ({size / 2**20:.1f} MiB)")
    return {"hub_model/bytes": float(size)}
