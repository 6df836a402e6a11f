"""Each class of bad pipeline file gives its own message naming file, line, stage and field."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator.loader import load_pipeline
from orchestrator.spec import PipelineError, apply_overrides


def write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def errors_of(path, overrides=()):
    with pytest.raises(PipelineError) as exc:
        load_pipeline(path, list(overrides))
    return exc.value.errors


GOOD = """
name: demo
defaults:
  params: {seed: 3}
stages:
  a:
    workload: sleep
    params: {seconds: 0.1}
  b:
    workload: noop
    inputs: {x: a.result}
    matrix: {value: [1, 2.5]}
  c:
    workload: noop
    inputs: {all: b.result, one: b_value-1.result}
"""


def test_good_pipeline_expands_matrix_and_resolves_references(tmp_path):
    p = load_pipeline(write(tmp_path, GOOD))
    assert list(p.stages) == ["a", "b_value-1", "b_value-2.5", "c"]
    assert p.stages["b_value-2.5"].config.value == 2.5
    assert p.stages["b_value-1"].matrix_values == {"value": 1}
    c = p.stages["c"]
    assert c.resolved_inputs["all"] == [("b_value-1", "result"), ("b_value-2.5", "result")]
    assert c.input_is_list == {"all": True, "one": False}
    assert c.upstream == ["b_value-1", "b_value-2.5"]
    # defaults.params apply only to workloads whose config has the field
    assert p.stages["a"].config.seed == 3


def test_unknown_top_level_key_names_line_and_field(tmp_path):
    errs = errors_of(write(tmp_path, GOOD + "colour: blue\n"))
    assert len(errs) == 1
    assert errs[0].startswith("p.yaml:15:") and "'colour'" in errs[0] and "unknown key" in errs[0]


def test_unknown_stage_key(tmp_path):
    text = GOOD.replace("    params: {seconds: 0.1}", "    params: {seconds: 0.1}\n    resourcez: {}")
    (err,) = errors_of(write(tmp_path, text))
    assert "p.yaml:8:" in err and "stage 'a'" in err and "resourcez" in err and "unknown key" in err


def test_unknown_workload_suggests_the_close_one(tmp_path):
    (err,) = errors_of(write(tmp_path, GOOD.replace("workload: sleep", "workload: slep")))
    assert "p.yaml:6:" in err and "stage 'a'" in err
    assert "unknown workload 'slep'" in err and "did you mean 'sleep'" in err


def test_unknown_param_and_type_error_name_the_field(tmp_path):
    text = GOOD.replace("{seconds: 0.1}", "{seconds: soon, speed: 2}")
    errs = errors_of(write(tmp_path, text))
    joined = "\n".join(errs)
    assert "stage 'a'" in joined and "'stages.a.params.seconds'" in joined
    assert "soon" in joined and "'stages.a.params.speed'" in joined and "unknown key" in joined


def test_unknown_reference_stage_and_output(tmp_path):
    text = GOOD.replace("inputs: {x: a.result}", "inputs: {x: aa.result}")
    (err,) = errors_of(write(tmp_path, text))
    assert "stage 'b'" in err and "no stage 'aa'" in err and "did you mean 'a'" in err
    text = GOOD.replace("inputs: {x: a.result}", "inputs: {x: a.model}")
    (err,) = errors_of(write(tmp_path, text))
    assert "has no output 'model'" in err and "its outputs: result" in err
    text = GOOD.replace("inputs: {x: a.result}", "inputs: {x: a}")
    (err,) = errors_of(write(tmp_path, text))
    assert "not a reference" in err


def test_cycle_is_reported_with_its_path(tmp_path):
    text = """
    name: cyc
    stages:
      a: {workload: noop, inputs: {x: c.result}}
      b: {workload: noop, inputs: {x: a.result}}
      c: {workload: noop, inputs: {x: b.result}}
    """
    (err,) = errors_of(write(tmp_path, text))
    assert "cycle" in err
    assert any(s in err for s in ("a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"))


def test_duplicate_stage_key_is_an_error_with_both_lines(tmp_path):
    text = """
    name: dup
    stages:
      a: {workload: noop}
      a: {workload: sleep}
    """
    (err,) = errors_of(write(tmp_path, text))
    assert "p.yaml:4" in err and "duplicate key 'a'" in err and "line 3" in err


def test_invalid_yaml_and_missing_file(tmp_path):
    (err,) = errors_of(write(tmp_path, "name: x\nstages: [\n"))
    assert "invalid YAML" in err
    (err,) = errors_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in err and "file not found" in err


def test_resources_and_deepspeed_are_validated(tmp_path):
    text = GOOD.replace("params: {seconds: 0.1}",
                        "params: {seconds: 0.1}\n    resources: {num_workers: 0}")
    (err,) = errors_of(write(tmp_path, text))
    assert "'stages.a.resources.num_workers'" in err and "greater than or equal to 1" in err
    text = GOOD.replace("params: {seconds: 0.1}",
                        "params: {seconds: 0.1}\n    resources: {num_workers: 2}")
    (err,) = errors_of(write(tmp_path, text))
    assert "runs in one process" in err
    text = GOOD.replace("defaults:", "defaults:\n  deepspeed: {zero_stage: 4}")
    errs = errors_of(write(tmp_path, text))
    assert any("zero_stage" in e for e in errs)


def test_set_overrides_values_and_rejects_unknown_stage(tmp_path):
    path = write(tmp_path, GOOD)
    p = load_pipeline(path, ["stages.a.params.seconds=0.5", "defaults.params.seed=9"])
    assert p.stages["a"].config.seconds == 0.5 and p.stages["a"].config.seed == 9
    (err,) = errors_of(path, ["stages.zz.params.seconds=1"])
    assert "no stage 'zz'" in err
    (err,) = errors_of(path, ["stages.a.params.seconds=lots"])
    assert "'stages.a.params.seconds'" in err


def test_apply_overrides_does_not_mutate_input():
    raw = {"stages": {"a": {"params": {"x": 1}}}}
    out = apply_overrides(raw, ["stages.a.params.x=[1, 2]"])
    assert out["stages"]["a"]["params"]["x"] == [1, 2] and raw["stages"]["a"]["params"]["x"] == 1


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("workload: sleep", "workload: nope").replace("{x: a.result}", "{x: q.result}")
    errs = errors_of(write(tmp_path, text))
    assert len(errs) >= 2


def test_reference_into_a_subfolder_of_an_output(tmp_path):
    text = """
    name: sub
    stages:
      a: {workload: noop}
      b: {workload: noop, inputs: {x: a.result/part_0}}
      c: {workload: noop, inputs: {x: a.nothing/part_0}}
    """
    (err,) = errors_of(write(tmp_path, text))
    assert "stage 'c'" in err and "has no output 'nothing/part_0'" in err
    p = load_pipeline(write(tmp_path, text.replace("      c: {workload: noop, inputs: {x: a.nothing/part_0}}\n", "")))
    assert p.stages["b"].resolved_inputs["x"] == [("a", "result/part_0")]


def test_yaml_anchors_and_merge_keys_with_overrides(tmp_path):
    text = """
    name: anchors
    stages:
      a: {workload: quadratic, params: &q {lr: 0.1, steps: 5}}
      b: {workload: quadratic, params: {<<: *q, lr: 0.2}}
      c: {workload: quadratic, params: *q}
    """
    p = load_pipeline(write(tmp_path, text))
    assert (p.stages["a"].config.lr, p.stages["b"].config.lr, p.stages["c"].config.lr) == (0.1, 0.2, 0.1)
    assert p.stages["b"].config.steps == 5
    (err,) = errors_of(write(tmp_path, text.replace("lr: 0.2}", "lr: 0.2, lr: 0.3}")))
    assert "duplicate key 'lr'" in err
