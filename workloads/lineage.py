"""What it cost to make a model: every model dir mmkd writes carries ``mmkd_lineage.json``, one
entry per stage that went into it (keyed by stage key, so a shared ancestor such as the common
base of two experts counts once when their merge unions the parents' entries).

Entry: ``{"stage", "samples", "seconds"}`` — samples the stage trained on (0 for a
merge) and the stage's wall time. ``totals`` sums them for the evaluate table's
``train_samples`` / ``train_s`` columns; the sum is the sequential compute cost, whatever ran in
parallel.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["LINEAGE", "read_lineage", "write_lineage", "totals"]

LINEAGE = "mmkd_lineage.json"


def read_lineage(model_dir: str | None) -> dict[str, dict[str, Any]]:
    """The entries of ``model_dir`` ({} for a dir without lineage, e.g. a hub checkpoint)."""
    if not model_dir:
        return {}
    path = os.path.join(model_dir, LINEAGE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["stages"]


def write_lineage(model_dir: str, parents: list[str], key: str, entry: dict[str, Any]) -> None:
    """Write ``model_dir``'s lineage: the union of its parents' entries plus this stage's. A
    parent without lineage (a hub checkpoint, a dir written before lineage existed) enters as
    ``{"unknown": true}``: its cost is not known, so ``totals`` reports none."""
    stages: dict[str, dict[str, Any]] = {}
    for parent in parents:
        known = read_lineage(parent)
        stages.update(known or {os.path.abspath(parent): {"stage": os.path.basename(
            os.path.dirname(os.path.abspath(parent))), "unknown": True}})
    stages[key] = entry
    with open(os.path.join(model_dir, LINEAGE), "w") as f:
        json.dump({"stages": stages}, f, indent=2)


def totals(model_dir: str) -> dict[str, float]:
    """``{"train_samples", "train_s", "stages"}`` summed over the lineage ({} when it has none
    or an ancestor's cost is unknown)."""
    stages = read_lineage(model_dir)
    if not stages or any(e.get("unknown") for e in stages.values()):
        return {}
    return {"train_samples": float(sum(e.get("samples", 0) for e in stages.values())),
            "train_s": float(sum(e.get("seconds", 0.0) for e in stages.values())),
            "stages": float(len(stages))}
