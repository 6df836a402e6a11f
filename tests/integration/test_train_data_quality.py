"""A training stage drops and counts bad samples, reports them, and enforces its error budget."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from orchestrator.plugin import Resources, StageContext
from workloads.data.quality import DataQualityError
from workloads.pretrain_sft import PretrainConfig, pretrain


def _ctx(root, stage, inputs):
    return StageContext(pipeline="test", stage=stage, key=f"{stage}-key",
                        output_dir=str(root / stage), inputs=inputs,
                        resources=Resources(num_workers=1, cpus_per_worker=1),
                        deepspeed={"zero_stage": 0, "precision": "fp32"},
                        checkpoint_storage=str(root / "ckpt"), run_name=f"{stage}-run", seed=1)


def corrupt_images(src_dir: str, dst_dir: str, every: int) -> int:
    """Copy shards, replacing every `every`-th PNG with bytes that are not an image."""
    os.makedirs(dst_dir)
    n = broken = 0
    for name in sorted(os.listdir(src_dir)):
        with tarfile.open(os.path.join(src_dir, name)) as src, \
                tarfile.open(os.path.join(dst_dir, name), "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".png"):
                    n += 1
                    if n % every == 0:
                        data, broken = b"\x89PNG-truncated", broken + 1
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return broken


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data

    root = tmp_path_factory.mktemp("quality")
    tiny = build_tiny_data(root / "data", num_samples=48, vocab_size=320)
    broken = corrupt_images(tiny["captions"], str(root / "bad_captions"), every=12)
    return root, tiny, broken


def test_bad_samples_are_counted_as_stage_metrics(data):
    """As in a pipeline run: the totals live in the run's progress hub (the stages below,
    called without one, keep them in an actor of their own), and no actor is made for them;
    the one worker iterates its whole dataset itself, so no dataset manager either."""
    from ray.util.state import list_actors

    from orchestrator.executor import progress_hub_class

    def actors() -> dict[str, str]:
        return {a.actor_id: a.class_name for a in list_actors(limit=10_000)}

    root, tiny, broken = data
    before = actors()
    ctx = _ctx(root, "within_budget", {"tokenizer": tiny["tokenizer"], "data": str(root / "bad_captions")})
    ctx.reporter = progress_hub_class().remote()
    config = PretrainConfig(model={"preset": "tiny-student"}, epochs=1, batch_size=8,
                            checkpoint_every=0, max_bad_fraction=0.2)
    metrics = pretrain(config, ctx)
    assert broken == 4
    assert metrics["data/skipped_corrupt_image"] == broken
    assert metrics["data/seen"] == 48
    assert os.path.isdir(os.path.join(ctx.output_dir, "model"))
    new = {c for a, c in actors().items() if a not in before}
    assert {"TrainController", "RayTrainWorker"} <= new, new
    assert not {"QualityState", "DatasetManager", "PlacementGroupCleaner"} & new, new


def test_exceeding_the_budget_fails_the_stage_naming_the_cause(data):
    root, tiny, _ = data
    ctx = _ctx(root, "over_budget", {"tokenizer": tiny["tokenizer"], "data": str(root / "bad_captions")})
    config = PretrainConfig(model={"preset": "tiny-student"}, epochs=1, batch_size=8,
                            checkpoint_every=0, max_bad_fraction=0.01)
    with pytest.raises(DataQualityError) as e:
        pretrain(config, ctx)
    assert "corrupt_image" in str(e.value)


def test_all_bad_data_is_the_data_error_once_not_an_empty_shard_retried(data):
    """Every image corrupt: the worker's shard is empty; what fails the stage is the data error
    (not 'empty data shard'), and Ray Train does not restart the workers for it."""
    root, tiny, _ = data
    corrupt_images(tiny["captions"], str(root / "all_bad"), every=1)
    ctx = _ctx(root, "all_bad", {"tokenizer": tiny["tokenizer"], "data": str(root / "all_bad")})
    config = PretrainConfig(model={"preset": "tiny-student"}, max_steps=3, batch_size=8,
                            checkpoint_every=0, max_failures=2)
    with pytest.raises(DataQualityError) as e:
        pretrain(config, ctx)
    assert "corrupt_image" in str(e.value) and "empty data shard" not in str(e.value)
    starts = (root / "ckpt" / ctx.run_name / "worker_pids" / "starts.log").read_text().split("\n")
    assert len([s for s in starts if s]) == 1, "a deterministic error is raised, not retried"
