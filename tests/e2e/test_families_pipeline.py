"""Every supported model family through the CLI as a user runs it: per family a tiny teacher
(`pretrain`, Ray Train + DeepSpeed), a tiny student distilled from it online (`distill`, all three
KD terms), and one `evaluate` of all of them; then the saved models reload with the Auto classes.
And `pipelines/qwen2_vl_kd.yaml` (DPT -> SFT -> DFT -> evaluate on Qwen2-VL) with reduced steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import mmkd

from workloads.families import FAMILIES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "max_length": 160}


def _pipeline() -> dict:
    stages = {
        "shapes": {"workload": "shapes",
                   "params": {"num_captions": 48, "num_instruct": 48, "num_eval": 12}},
        "tokenizer": {"workload": "tokenizer", "inputs": {"corpus": ["shapes.captions",
                                                                    "shapes.instruct"]},
                      "params": {"vocab_size": 320}},
    }
    for family in FAMILIES:
        stages[f"teacher_{family}"] = {
            "workload": "pretrain",
            "inputs": {"tokenizer": "tokenizer.tokenizer", "data": "shapes.captions"},
            "params": {"model": {"preset": "tiny-teacher", "family": family},
                       "train": ["vision", "projector", "llm"], **SMALL}}
        stages[f"student_{family}"] = {
            "workload": "distill",
            "inputs": {"tokenizer": "tokenizer.tokenizer", "teacher": f"teacher_{family}.model",
                       "data": "shapes.instruct"},
            "params": {"model": {"preset": "tiny-student", "family": family},
                       "train": ["projector", "llm"], "alpha": 1.0, "beta": 1.0, "gamma": 0.5,
                       **SMALL}}
    models = [f"{role}_{f}.model" for f in FAMILIES for role in ("teacher", "student")]
    stages["evaluate"] = {"workload": "evaluate",
                          "inputs": {"models": models, "data": "shapes.eval"},
                          "params": {"names": [m.removesuffix(".model") for m in models],
                                     "max_samples": 4, "max_new_tokens": 4}}
    return {"name": "families", "defaults": {"resources": {"num_workers": 1,
                                                           "cpus_per_worker": 1},
                                             "deepspeed": {"zero_stage": 2}},
            "stages": stages}


def _record(home: Path, name: str) -> dict:
    records = [json.loads(p.read_text()) for p in home.glob("runs/*/run.json")]
    return next(r for r in records if r["pipeline"] == name)


def test_every_family_trains_distils_evaluates_and_reloads(cli_env, tmp_path):
    pipe = tmp_path / "families.yaml"
    pipe.write_text(yaml.safe_dump(_pipeline(), sort_keys=False))
    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=2400, check=True)
    record = _record(tmp_path / "home", "families")
    assert {s["status"] for s in record["stages"].values()} == {"done"}, record["stages"]

    results = Path(record["stages"]["evaluate"]["uri"]) / "results" / "results.json"
    table = json.loads(results.read_text())["results"]
    assert len(table) == 2 * len(FAMILIES)
    from transformers import AutoConfig, AutoModelForImageTextToText

    from workloads.models import load_model

    for family in FAMILIES:
        student = record["stages"][f"student_{family}"]
        metrics = student["metrics"]
        for term in ("l_res", "l_vis", "l_rel"):  # every KD term ran and was finite
            assert any(k.endswith(term) for k in metrics), (family, sorted(metrics))
        model_dir = str(Path(student["uri"]) / "model")
        assert AutoConfig.from_pretrained(model_dir).model_type in FAMILIES[family].model_types
        plain = AutoModelForImageTextToText.from_pretrained(model_dir)
        ours, processor = load_model(model_dir)
        assert type(plain) is type(ours)
        assert table[f"student_{family}"]["n"] == 4


def test_qwen2_vl_pipeline_chain(cli_env, tmp_path):
    from orchestrator.loader import load_pipeline

    pipe = ROOT / "pipelines" / "qwen2_vl_kd.yaml"
    sets = ["stages.shapes.params.num_captions=48", "stages.shapes.params.num_instruct=48",
            "stages.shapes.params.num_eval=12", "stages.tokenizer.params.vocab_size=320",
            "stages.evaluate.params.max_samples=6", "stages.evaluate.params.caption_samples=4"]
    for s in load_pipeline(str(pipe)).stages.values():
        if s.workload in ("pretrain", "sft", "distill"):
            sets += [f"stages.{s.base}.params.{k}={v}" for k, v in SMALL.items()]
    args = ["run", str(pipe), "--plain", *[a for s in sets for a in ("--set", s)]]
    out = mmkd(args, cli_env, tmp_path, timeout=1800, check=True)
    assert "| kd_dpt_sft_dft |" in out.stdout
    record = _record(tmp_path / "home", "qwen2_vl_kd")
    assert {s["status"] for s in record["stages"].values()} == {"done"}
    from transformers import AutoConfig

    for stage in ("teacher_sft", "baseline_sft", "student_dft"):
        cfg = AutoConfig.from_pretrained(str(Path(record["stages"][stage]["uri"]) / "model"))
        assert cfg.model_type == "qwen2_vl", stage
