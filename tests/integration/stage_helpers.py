"""Calling a stage function as the runner does (a StageContext), shared by integration tests."""

from __future__ import annotations

import glob
import hashlib
import os

from orchestrator.plugin import Resources, StageContext


def stage_ctx(root, stage, inputs, workers=2, zero=2) -> StageContext:
    """A StageContext writing under ``root / stage``; checkpoints under ``root / ckpt``."""
    return StageContext(pipeline="test", stage=stage, key=f"{stage}-key",
                        output_dir=str(root / stage), inputs=inputs,
                        resources=Resources(num_workers=workers, cpus_per_worker=1),
                        deepspeed={"zero_stage": zero, "precision": "fp32"},
                        checkpoint_storage=str(root / "ckpt"), run_name=f"{stage}-run", seed=1)


def files_digest(model_dir) -> str:
    """sha256 over every file of a model directory, in name order."""
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(model_dir, "*"))):
        h.update(open(f, "rb").read())
    return h.hexdigest()
