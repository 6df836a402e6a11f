"""The shared training loop on a real local Ray: 2 Ray Train workers, DeepSpeed on CPU, tiny models.

ZeRO 0 trains a few steps with a checkpoint and saves full-size weights (ZeRO-2 runs in
test_train_workloads.py and every distill test; ZeRO-3, with gradient accumulation and a
checkpoint, in test_distill_workloads.py::test_zero3_teacher_is_partitioned); a stage that asks for more CPUs than the cluster has fails before
training.
"""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.plugin import Resources, StageContext
from workloads.train_loop import run_training
from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer, shapes_rows
from workloads.train_loop_parts import ResourceError, TrainParams


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("train")
    tok_dir = build_tiny_tokenizer(str(root / "tokenizer"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = shapes_rows(tok, 64, seed=0)
    return {"root": root, "tok_dir": tok_dir, "tok": tok, "rows": rows,
            "dataset": lambda: ray_session.data.from_items(rows)}


def _ctx(env, stage, zero=2, workers=2, **kw):
    out = env["root"] / stage
    return StageContext(pipeline="test", stage=stage, key=f"{stage}-key", output_dir=str(out),
                        resources=Resources(num_workers=workers, cpus_per_worker=1),
                        deepspeed={"zero_stage": zero, "precision": "fp32"},
                        checkpoint_storage=str(env["root"] / "ckpt"), run_name=f"{stage}-run", **kw)


def _state(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def _fresh_preset_state(preset, tok_dir, seed):
    from workloads.models import build_model

    torch.manual_seed(seed)  # the loop seeds the same way before building the model
    model, _ = build_model({"preset": preset}, tok_dir)
    return model.state_dict()


# ZeRO-2 trains in every distill test (test_distill_workloads, test_family_distill_stages), ZeRO-3
# in test_distill_workloads' ZeRO-3 teacher test; ZeRO-1 partitions only the optimizer state, a
# subset of 2
@pytest.mark.parametrize("zero", [0])
def test_zero_stages_train_and_save(env, zero):
    from ray.util.state import list_actors

    before = {a.actor_id for a in list_actors(limit=10_000)}
    ctx = _ctx(env, f"zero{zero}", zero=zero)
    m = run_training(ctx, model_spec={"preset": "tiny-student"}, tokenizer_dir=env["tok_dir"],
                     dataset=env["dataset"](),
                     params=TrainParams(train=["projector", "llm"], lr=3e-3, batch_size=4,
                                        grad_accum=2, max_steps=3, checkpoint_every=2,
                                        pad_token_id=env["tok"].pad_token_id))
    assert m["steps"] == 3 and m["samples"] == 3 * 4 * 2 * 2
    state = _state(os.path.join(ctx.output_dir, "model"))
    init = _fresh_preset_state("tiny-student", env["tok_dir"], seed=0)
    # Full-size weights; frozen vision untouched.
    assert state["lm_head.weight"].shape == init["lm_head.weight"].shape
    assert all(torch.equal(state[k], init[k]) for k in state if "vision_tower" in k)
    assert not torch.equal(state["lm_head.weight"], init["lm_head.weight"])
    # the processes of this run: the session's instance was started by mmkd (start_local_ray),
    # so no preemption watcher (a single local node has no use for it); no placement group
    # cleaner (orchestrator.placement's Reaper does its work); a dataset manager splits the
    # data between the two workers (a one-worker run has none: test_train_data_quality.py)
    classes = {a.class_name for a in list_actors(limit=10_000) if a.actor_id not in before}
    assert {"TrainController", "RayTrainWorker", "DatasetManager"} <= classes, classes
    assert not {"PreemptionWatcher", "PlacementGroupCleaner"} & classes, classes


def test_too_many_workers_fails_before_training(env):
    ctx = _ctx(env, "greedy", workers=64)
    with pytest.raises(ResourceError, match=r"stage 'greedy'.*num_workers"):
        run_training(ctx, model_spec={"preset": "tiny-student"}, tokenizer_dir=env["tok_dir"],
                     dataset=env["dataset"](), params=TrainParams(max_steps=1))
    assert not os.path.exists(os.path.join(ctx.output_dir, "model"))
