from __future__ import annotations

import json

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


def test_teacher_service_replicas_count_beside_the_workers_once_per_shared_service():
    """`teacher: service` holds its replicas' CPUs beside the student's worker and data
    pipeline (a 1+1 setup on 2 CPUs starved Ray Data and hung); stages that share one service
    (same teacher and service settings) count its replicas once."""
    from pathlib import Path

    from orchestrator.executor import side_later, stage_cpus, stages_cpus
    from orchestrator.loader import load_pipeline

    path = Path(__file__).resolve().parents[2] / "pipelines/llava_kd.yaml"
    service = {"teacher": "service", "teacher_resources": {"replicas": 2, "cpus": 1.5}}
    sets = [f"stages.{s}.params.{k}={json.dumps(v)}" for s in ("student_dpt", "student_dft")
            for k, v in service.items()]
    st = load_pipeline(path, sets).stages
    dpt, dft, sft = st["student_dpt"], st["student_dft"], st["student_sft"]
    assert dft.side.cpus == 3.0 and dft.side.key == dpt.side.key and sft.side is None
    assert "teacher_resources" in dft.side.what and "cpus: 0" in dft.side.hint
    assert stage_cpus(dft) == 1 + 1 + 3            # worker + data pipeline + 2 x 1.5 replicas
    assert stages_cpus([dpt, dft]) == 2 * (1 + 1) + 3  # one service for both
    # the DPT stage keeps the service loaded for the DFT stage that comes later in the run
    assert side_later(dpt, [sft, dft]) == 1 and side_later(dft, [st["evaluate"]]) == 0
    other = load_pipeline(path, sets + ["stages.student_dft.params.top_k=8"]).stages
    assert stages_cpus([other["student_dpt"], other["student_dft"]]) == 2 * (1 + 1) + 2 * 3
