"""Every pipeline file we ship lints cleanly (the paper-scale one offline, without data or hub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.loader import load_pipeline
from orchestrator.tune_spec import load_tune

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.mark.parametrize("name", ["llava_kd", "kd_stage_ablation", "merge_ablation",
                                  "kd_offline_teacher", "qwen2_vl_kd", "teacher_budget",
                                  "cross_family_kd"])
def test_tiny_pipelines_validate(name):
    p = load_pipeline(PIPELINES / f"{name}.yaml")
    assert p.stages and "evaluate" in p.stages
    evaluate = p.stages["evaluate"]
    names = evaluate.config.names
    models = evaluate.resolved_inputs["models"]
    assert names is not None and len(names) == len(models), "every evaluated model is named"


def test_default_pipeline_compares_teacher_baseline_and_kd_student():
    p = load_pipeline(PIPELINES / "llava_kd.yaml")
    assert [s.workload for s in p.stages.values()].count("distill") == 2  # DPT and DFT
    assert p.stages["student_dpt"].config.train == p.stages["baseline_pt"].config.train
    dft = p.stages["student_dft"].config
    # L_res + L_rel, no L_vis: chosen on the validation split (pipelines/kd_term_ablation.yaml)
    assert (dft.alpha, dft.beta, dft.gamma, dft.temperature) == (1.0, 0.0, 0.5, 1.0)
    assert p.stages["student_dpt"].config.beta == 0.0


def test_kd_term_ablation_is_the_default_pipeline_four_ways_scored_on_validation():
    from orchestrator.artifact_store import compute_keys

    default = compute_keys(load_pipeline(PIPELINES / "llava_kd.yaml").stages)
    p = load_pipeline(PIPELINES / "kd_term_ablation.yaml")
    terms = compute_keys(p.stages)
    for stage in ("teacher_sft", "baseline_sft"):
        assert terms[stage] == default[stage], stage
    # the default's KD branch is the no-L_vis row, stage for stage (one cache)
    for ours, theirs in (("dpt_no_vis", "student_dpt"), ("sft_no_vis", "student_sft"),
                         ("dft_no_vis", "student_dft")):
        assert terms[ours] == default[theirs], ours
    weights = {v: (p.stages[f"dft_{v}"].config.beta, p.stages[f"dft_{v}"].config.gamma)
               for v in ("paper", "no_vis", "no_rel", "res_only")}
    assert weights == {"paper": (1.0, 0.5), "no_vis": (0.0, 0.5), "no_rel": (1.0, 0.0),
                       "res_only": (0.0, 0.0)}
    for v in ("paper", "no_vis", "no_rel", "res_only"):  # DPT distils with DFT's terms
        dpt = p.stages[f"dpt_{v}"].config
        assert (dpt.beta, dpt.gamma) == weights[v], v
    assert p.stages["evaluate"].resolved_inputs["data"] == [("shapes", "val")]


def test_kd_stage_ablation_shares_stages_with_the_default_pipeline():
    from orchestrator.artifact_store import compute_keys

    default = compute_keys(load_pipeline(PIPELINES / "llava_kd.yaml").stages)
    ablation = compute_keys(load_pipeline(PIPELINES / "kd_stage_ablation.yaml").stages)
    assert default["teacher_sft"] == ablation["teacher_sft"]
    offline = compute_keys(load_pipeline(PIPELINES / "kd_offline_teacher.yaml").stages)
    assert offline["student_dft"] == default["student_dft"]  # the online DFT row is the default's
    assert len({offline[f"dft_offline_teacher_logits-teacher-logits-top-k-{k}"] for k in (8, 64, 512)}) == 3
    assert default["baseline_sft"] == ablation["sft_init-pt"]
    assert default["student_dft"] == ablation["dft_init-sft-init-dpt"]


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_paper_scale_pipeline_validates_and_plans_offline(command):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command,
                          str(PIPELINES / "llava_kd_qwen.yaml"), "--offline"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    p = load_pipeline(PIPELINES / "llava_kd_qwen.yaml")
    assert p.stages["student_dpt"].deepspeed.zero_stage == 2
    assert p.stages["student_dft"].deepspeed.zero_stage == 3
    assert p.stages["student_dft"].deepspeed.precision == "bf16"
    assert p.stages["teacher_sft"].config.model is None  # continues from teacher_pt
    assert p.stages["teacher_pt"].config.model.parts.llm == "Qwen/Qwen1.5-4B"


def test_tune_spec_loads():
    spec, pipeline = load_tune(str(PIPELINES / "tune_kd_weights.yaml"))
    assert spec.stage == "student_dft" and set(spec.space) == {"alpha", "beta", "gamma", "temperature"}
    assert pipeline.name == "llava_kd"
    dpt, pipeline = load_tune(str(PIPELINES / "tune_kd_weights_dpt.yaml"))
    assert dpt.stage == "student_dpt" and dpt.select.stage == "evaluate"
    from orchestrator.tune_spec import select_chain

    chain = [s.name for s in select_chain(pipeline, dpt.stage, dpt.select.stage)]
    assert chain == ["student_sft", "student_dft", "evaluate"]


@pytest.mark.parametrize("name,teacher,student", [
    ("qwen2_5_vl_kd_7b_3b", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),
    ("internvl3_kd_8b_1b", "OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-1B-hf")])
def test_family_paper_scale_pipelines_validate_and_plan_offline(name, teacher, student):
    for command in ("validate", "plan"):
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command,
                              str(PIPELINES / f"{name}.yaml"), "--offline"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    p = load_pipeline(PIPELINES / f"{name}.yaml")
    assert (p.stages["teacher"].config.repo, p.stages["student_init"].config.repo) == (teacher, student)
    dft = p.stages["student_dft"]
    assert dft.workload == "distill" and dft.deepspeed.zero_stage == 3
    assert dft.deepspeed.precision == "bf16" and min(dft.config.beta, dft.config.gamma) > 0
    assert p.stages["baseline_sft"].config.train == dft.config.train


def test_qwen2_vl_pipeline_is_the_default_recipe_on_another_family():
    p = load_pipeline(PIPELINES / "qwen2_vl_kd.yaml")
    default = load_pipeline(PIPELINES / "llava_kd.yaml")
    assert list(p.stages) == list(default.stages)
    for name in ("teacher_pt", "baseline_pt", "student_dpt"):
        assert p.stages[name].config.model.family == "qwen2_vl"


@pytest.mark.parametrize("repo,expected", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", None),
    ("not a repo id", "neither a local directory nor a hub id"),
    ("./no/such/dir", "is not a directory"),
])
def test_hub_model_checks_the_repo_offline(repo, expected):
    from workloads.hub_model import HubModelConfig, _problems

    problems = _problems(HubModelConfig(repo=repo))
    assert (problems == []) if expected is None else expected in problems[0]


def test_hub_model_refuses_a_local_dir_of_an_unsupported_family(tmp_path):
    import json

    from workloads.hub_model import HubModelConfig, _problems

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    problems = _problems(HubModelConfig(repo=str(tmp_path)))
    assert "bert" in problems[0] and "qwen2_vl" in problems[0]


def test_hub_model_stage_copies_a_local_checkpoint_that_loads(tmp_path):
    """The stage body on a local directory (the hub path is the same after snapshot_download)."""
    import json

    from mmkd_test_plugins.data_tiny import build_tiny_data
    from orchestrator.plugin import StageContext
    from workloads.hub_model import HubModelConfig, hub_model
    from workloads.models import build_model, load_model, save_model

    data = build_tiny_data(tmp_path / "data", num_samples=4, vocab_size=300)
    src = save_model(*build_model({"preset": "tiny-student", "family": "qwen2_vl"},
                                  data["tokenizer"]), str(tmp_path / "published"))
    ctx = StageContext(pipeline="p", stage="student_init", key="k",
                       output_dir=str(tmp_path / "out"))
    metrics = hub_model(HubModelConfig(repo=src), ctx)
    assert metrics["hub_model/bytes"] > 0
    assert json.loads((tmp_path / "out" / "source.json").read_text())["repo"] == src
    model, processor = load_model(str(tmp_path / "out" / "model"))
    assert model.config.model_type == "qwen2_vl" and processor.family.name == "qwen2_vl"


def test_hub_model_without_hub_access_says_what_to_do(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE) and the model not cached: one message naming the repo and the
    ways out, not the hub client's exception."""
    from orchestrator.plugin import StageContext
    from workloads.hub_model import HubModelConfig, hub_model
    from workloads.models import ModelCompatError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    ctx = StageContext(pipeline="p", stage="teacher", key="k", output_dir=str(tmp_path / "out"))
    with pytest.raises(ModelCompatError) as e:
        hub_model(HubModelConfig(repo="Qwen/Qwen2.5-VL-7B-Instruct"), ctx)
    text = str(e.value)
    assert "stage 'teacher': could not fetch Qwen/Qwen2.5-VL-7B-Instruct" in text
    assert "HF_HOME" in text and "local model directory" in text


def test_tune_selects_on_the_validation_split_by_default():
    """The tune's select stage reads shapes.val, not the held-out shapes.eval; the pipeline
    itself (what `mmkd run` reports) still evaluates on shapes.eval."""
    from orchestrator.loader import load_pipeline
    from orchestrator.tune_spec import load_tune

    root = Path(__file__).resolve().parents[2]
    spec, pipeline = load_tune(str(root / "pipelines" / "tune_kd_weights.yaml"))
    assert spec.select.split == "val"
    assert pipeline.stages["evaluate"].resolved_inputs["data"] == [("shapes", "val")]
    assert pipeline.stages["evaluate"].resolved_inputs["captions"] == [("shapes", "captions")]
    plain = load_pipeline(root / "pipelines" / "llava_kd.yaml")
    assert plain.stages["evaluate"].resolved_inputs["data"] == [("shapes", "eval")]
