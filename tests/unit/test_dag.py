from __future__ import annotations

from orchestrator.dag import expand_stage, toposort
from orchestrator.spec import StageSpec


def test_toposort_keeps_declaration_order_among_ready_stages():
    order, cycle = toposort({"a": [], "b": ["a"], "c": [], "d": ["b", "c"]})
    assert cycle is None and order == ["a", "c", "b", "d"]


def test_toposort_finds_cycle():
    order, cycle = toposort({"a": ["b"], "b": ["a"], "c": []})
    assert order == [] and set(cycle) == {"a", "b"} and cycle[0] == cycle[-1]


def test_matrix_is_cartesian_with_predictable_names():
    spec = StageSpec(workload="noop", matrix={"alpha": [0.5, 1.0], "inputs.init": ["pt.model", "dpt.model"]})
    out = expand_stage("dft", spec)
    names = [n for n, _, _ in out]
    assert names == ["dft_alpha-0.5_init-pt", "dft_alpha-0.5_init-dpt",
                     "dft_alpha-1.0_init-pt", "dft_alpha-1.0_init-dpt"]
    _, values, concrete = out[3]
    assert values == {"alpha": 1.0, "inputs.init": "dpt.model"}
    assert concrete.params["alpha"] == 1.0 and concrete.inputs["init"] == "dpt.model"
    assert concrete.matrix == {}
    # a reference with a sub path is named by its stage and the sub path (no dots: names must
    # stay referable as `name.output`)
    spec = StageSpec(workload="noop", matrix={"inputs.data": ["partition.partitions/part_0",
                                                              "partition.partitions/part_1"]})
    assert [n for n, _, _ in expand_stage("expert", spec)] == ["expert_data-partition-part-0",
                                                               "expert_data-partition-part-1"]


def test_stages_that_stream_data_reserve_a_cpu_for_their_pipeline():
    """Two `teacher_logits` stages (1 CPU each, plus a Ray Data pipeline each) on 2 CPUs hung
    forever: the runner counts the pipeline's CPU for every stage that streams data."""
    from pathlib import Path

    from orchestrator.executor import stage_cpus
    from orchestrator.loader import load_pipeline

    pipe = load_pipeline(Path(__file__).resolve().parents[2] / "pipelines/kd_offline_teacher.yaml")
    st = pipe.stages
    assert st["teacher_logits_top_k-8"].streams_data and stage_cpus(st["teacher_logits_top_k-8"]) == 2
    assert stage_cpus(st["student_dft"]) == 2          # 1 Ray Train worker + its data pipeline
    assert not st["evaluate"].streams_data and stage_cpus(st["evaluate"]) == 1
