"""The merge ablation's stages end to end on tiny data, workload functions called with a real
StageContext (no Ray needed): partition → (experts) → merge with every method → load the merged
model the way evaluate would and answer eval questions greedily."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from orchestrator.plugin import StageContext
from workloads.merge import MergeConfig, merge
from workloads.merging import MergeInputError, load_any_model
from workloads.partition import PartitionConfig, partition


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    root = tmp_path_factory.mktemp("mergepipe")
    data = build_tiny_data(root / "data", num_samples=24)
    torch.manual_seed(0)
    base, proc = build_model({"preset": "tiny-student"}, data["tokenizer"])
    dirs = {"base": save_model(base, proc, str(root / "base" / "model"))}
    for k in (0, 1):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        dirs[f"expert_{k}"] = save_model(m, proc, str(root / f"expert_{k}" / "model"))
    return {"root": root, "data": data, "dirs": dirs}


def _ctx(root, stage, inputs):
    out = root / stage
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(pipeline="merge_ablation", stage=stage, key=stage, output_dir=str(out),
                        inputs=inputs)


def _read_keys(part_dir):
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    return [r["key"] for r in iter_rows(DataSource(format="webdataset", paths=[part_dir]))]


@pytest.mark.parametrize("mode,balanced", [("kmeans", True), ("kmeans", False), ("random", False)])
def test_partition_covers_every_sample_once_deterministically(setup, mode, balanced):
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    root, data = setup["root"], setup["data"]
    inputs = {"model": setup["dirs"]["base"], "data": data["instruct"]}
    cfg = PartitionConfig(num_partitions=3, mode=mode, balanced=balanced, seed=1, shard_size=5)
    tag = f"{mode}{int(balanced)}"
    partition(cfg, _ctx(root, f"part_{tag}_a", inputs))
    partition(cfg, _ctx(root, f"part_{tag}_b", inputs))
    out_a, out_b = (root / f"part_{tag}_{s}" / "partitions" for s in "ab")
    man = json.loads((out_a / "manifest.json").read_text())
    assert man == json.loads((out_b / "manifest.json").read_text())
    keys = [_read_keys(str(out_a / f"part_{k}")) for k in range(3)]
    assert [len(k) for k in keys] == man["counts"]
    src = [r["key"] for r in iter_rows(DataSource(format="webdataset", paths=[data["instruct"]]))]
    assert sorted(sum(keys, [])) == sorted(src)  # every sample exactly once
    if balanced or mode == "random":
        assert max(man["counts"]) - min(man["counts"]) <= 1
    import numpy as np

    assert np.load(out_a / "centroids.npy").shape == (3, 64)


@pytest.mark.parametrize("method,extra", [
    ("uniform", {}), ("linear", {"weights": [2.0, 1.0]}), ("task_arithmetic", {"lambda_": 0.5}),
    ("ties", {"density": 0.3}), ("width", {}), ("cross", {"cross_every": 2}),
    ("ensemble", {"router": "soft", "temperature": 0.2}), ("ensemble", {"router": "top1"}),
])
def test_merge_workload_then_evaluate_style_generation(setup, method, extra):
    from itertools import islice

    from workloads.data.eval_examples import iter_eval_examples
    from workloads.data.source import DataSource
    from workloads.evaluation.evaluate import generate_answer

    root, dirs = setup["root"], setup["dirs"]
    if not (root / "part_k2" / "partitions").exists():
        partition(PartitionConfig(num_partitions=2, balanced=True),
                  _ctx(root, "part_k2", {"model": dirs["base"], "data": setup["data"]["instruct"]}))
    inputs = {"models": [dirs["expert_0"], dirs["expert_1"]], "base": dirs["base"],
              "partition": str(root / "part_k2" / "partitions")}
    stage = f"merge_{method}_{extra.get('router', '')}"
    metrics = merge(MergeConfig(method=method, **extra), _ctx(root, stage, inputs))
    model, processor = load_any_model(str(root / stage / "model"))
    _check_merged_weights(method, extra, model, dirs, metrics)
    ex = list(islice(iter_eval_examples(DataSource(format="webdataset",
                                                   paths=[setup["data"]["eval"]])), 2))
    answers = [generate_answer(model, processor, e, max_new_tokens=3) for e in ex]
    assert all(isinstance(a, str) for a in answers)


def _check_merged_weights(method, extra, model, dirs, metrics):
    """The merged weights against an independent computation from the saved checkpoints
    (parameter-space methods), or the structure the method promises (the others)."""
    from workloads.models import load_model

    experts = [load_model(dirs[f"expert_{k}"])[0].state_dict() for k in (0, 1)]
    base = load_model(dirs["base"])[0].state_dict()
    merged = model.state_dict()
    n_base = sum(v.numel() for v in base.values())
    if method in ("uniform", "linear", "task_arithmetic", "ties"):
        assert merged.keys() == base.keys()
        assert metrics["params"] == n_base
        checked = 0
        for name, b in base.items():
            if not b.is_floating_point():
                continue
            e0, e1 = experts[0][name].double(), experts[1][name].double()
            got = merged[name].double()
            if method == "uniform":
                want = (e0 + e1) / 2
            elif method == "linear":
                want = (2.0 * e0 + 1.0 * e1) / 3.0
            elif method == "task_arithmetic":
                want = b.double() + 0.5 * ((e0 - b) + (e1 - b))
            else:  # ties: every change from the base agrees with the elected sign and is no
                # larger than the largest expert change at that element
                delta = got - b.double()
                d0, d1 = e0 - b.double(), e1 - b.double()
                assert (delta.abs() <= torch.maximum(d0.abs(), d1.abs()) + 1e-6).all(), name
                agrees = (delta == 0) | (torch.sign(delta) == torch.sign(d0))
                agrees |= torch.sign(delta) == torch.sign(d1)
                assert agrees.all(), name
                checked += 1
                continue
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
        assert checked > 10
        if method == "ties":  # density 0.3 keeps about 30% of each expert's changes
            changed = sum(int((merged[k].double() != base[k].double()).sum())
                          for k in base if base[k].is_floating_point())
            assert 0.1 * n_base < changed < 0.7 * n_base
    elif method in ("width", "cross"):
        # JAM width/cross: a model larger than either expert (both experts' layers are kept)
        assert metrics["params"] > n_base
    else:  # ensemble: both experts' weights kept unchanged, with a router beside them
        assert metrics["params"] >= 2 * n_base


def test_merge_workload_refuses_incompatible_inputs(setup):
    root, dirs = setup["root"], setup["dirs"]
    three = [dirs["expert_0"], dirs["expert_1"], dirs["base"]]
    with pytest.raises(MergeInputError, match="'cross' merges at most 2 models"):
        merge(MergeConfig(method="cross"), _ctx(root, "bad1", {"models": three}))
    with pytest.raises(MergeInputError, match="'ties' needs input `base`"):
        merge(MergeConfig(method="ties"), _ctx(root, "bad2", {"models": three[:2]}))
    with pytest.raises(MergeInputError, match="'ensemble' needs input `partition`"):
        merge(MergeConfig(method="ensemble"), _ctx(root, "bad3", {"models": three[:2]}))
    with pytest.raises(ValueError, match="unknown merge method 'soup'"):
        MergeConfig(method="soup")
    from orchestrator.plugin import get_workload

    info = get_workload("merge")
    probs = info.validate(MergeConfig(method="width"),
                          {"models": [("a", "model"), ("b", "model"), ("c", "model")]})
    assert probs and "'width' merges at most 2" in probs[0]
    assert not os.path.exists(root / "bad1" / "model")


def test_bridges_part_needs_a_cross_merge_and_an_ensemble_is_not_trainable(setup):
    from workloads.models import ModelCompatError, load_model, set_trainable

    root, dirs = setup["root"], setup["dirs"]
    model, _ = load_model(dirs["base"])
    with pytest.raises(ValueError, match="`bridges` are the new layers of a JAM-Cross merge"):
        set_trainable(model, ["bridges"])
    partition(PartitionConfig(num_partitions=2), _ctx(root, "part_for_ens", {
        "model": dirs["base"], "data": setup["data"]["instruct"]}))
    merge(MergeConfig(method="ensemble"), _ctx(root, "ens_for_ft", {
        "models": [dirs["expert_0"], dirs["expert_1"]], "base": dirs["base"],
        "partition": str(root / "part_for_ens" / "partitions")}))
    with pytest.raises(ModelCompatError, match="'ensemble' merge, which has no weights"):
        load_model(str(root / "ens_for_ft" / "model"))
