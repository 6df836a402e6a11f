"""Every supported model family through the CLI as a user runs it, in one pipeline: per family a
tiny teacher and a tiny student distilled from it online (`distill`, Ray Train + DeepSpeed
ZeRO-2, vision tower, projector and LLM trained, all three KD terms); the teachers are random
tiny models (the test plugin's `tiny_pair`: a Ray Train stage each cost ~30 s here); one
`evaluate` scores every model; the saved models reload with the Auto classes. The DPT -> SFT ->
DFT chain of Qwen2-VL and Idefics3 (pipelines/qwen2_vl_kd.yaml) is left to
tests/integration/test_family_distill_stages.py, which runs their DFT online, offline and under
ZeRO-3 (it repeated those stages here: 8 Ray Train stages, about 2 of this test's 4.5 minutes). (One pipeline, not one per family: each stage's Ray
start-up is what costs here; LLaVA-1.5, the default pipeline's family, is left to its own tests.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from cli_helpers import mmkd

from workloads.families import FAMILIES

pytestmark = pytest.mark.slow
SMALL = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0, "max_length": 160}
CHAIN: tuple[str, ...] = ()  # families run DPT -> SFT -> DFT here (see the module docstring)
OTHERS = [f for f in FAMILIES if f != "llava"]


def _pipeline() -> dict:
    stages = {
        "shapes": {"workload": "shapes",
                   "params": {"num_captions": 48, "num_instruct": 48, "num_eval": 12}},
        "tokenizer": {"workload": "tokenizer", "inputs": {"corpus": ["shapes.captions",
                                                                    "shapes.instruct"]},
                      "params": {"vocab_size": 320}},
    }
    for family in OTHERS:
        if family in CHAIN:
            stages[f"teacher_{family}"] = {
                "workload": "pretrain",
                "inputs": {"tokenizer": "tokenizer.tokenizer", "data": "shapes.captions"},
                "params": {"model": {"preset": "tiny-teacher", "family": family},
                           "train": ["vision", "projector", "llm"], **SMALL}}
        else:
            stages[f"teacher_{family}"] = {
                "workload": "tiny_pair", "inputs": {"tokenizer": "tokenizer.tokenizer"},
                "params": {"preset": "tiny-teacher", "family": family}}
        stages[f"student_{family}"] = {
            "workload": "distill",
            "inputs": {"tokenizer": "tokenizer.tokenizer", "teacher": _teacher(family),
                       "data": "shapes.instruct"},
            "params": {"model": {"preset": "tiny-student", "family": family},
                       "train": ["vision", "projector", "llm"], "alpha": 1.0, "beta": 1.0,
                       "gamma": 0.5, **SMALL}}
        if family in CHAIN:
            stages[f"sft_{family}"] = {
                "workload": "sft", "inputs": {"init": f"student_{family}.model",
                                              "data": "shapes.instruct"},
                "params": {"train": ["projector", "llm"], **SMALL}}
            stages[f"dft_{family}"] = {
                "workload": "distill",
                "inputs": {"init": f"sft_{family}.model", "teacher": _teacher(family),
                           "data": "shapes.instruct"},
                "params": {"train": ["projector", "llm"], **SMALL}}
    models = [m for f in OTHERS for m in (_teacher(f), f"student_{f}.model")]
    models += [f"dft_{f}.model" for f in CHAIN]
    stages["evaluate"] = {"workload": "evaluate",
                          "inputs": {"models": models, "data": "shapes.eval"},
                          "params": {"names": [m.split(".")[0] for m in models],
                                     "max_samples": 4, "max_new_tokens": 4}}
    return {"name": "families", "defaults": {"resources": {"num_workers": 1,
                                                           "cpus_per_worker": 1},
                                             "deepspeed": {"zero_stage": 2}},
            "stages": stages}


def _teacher(family: str) -> str:
    return f"teacher_{family}.model" if family in CHAIN else f"teacher_{family}.first"


def _record(home: Path, name: str) -> dict:
    records = [json.loads(p.read_text()) for p in home.glob("runs/*/run.json")]
    return next(r for r in records if r["pipeline"] == name)


def test_every_family_trains_distils_evaluates_and_reloads(cli_env, tmp_path):
    pipe = tmp_path / "families.yaml"
    pipe.write_text(yaml.safe_dump(_pipeline(), sort_keys=False))
    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=840, check=True)
    record = _record(tmp_path / "home", "families")
    assert {s["status"] for s in record["stages"].values()} == {"done"}, record["stages"]

    results = Path(record["stages"]["evaluate"]["uri"]) / "results" / "results.json"
    table = json.loads(results.read_text())["results"]
    assert len(table) == 2 * len(OTHERS) + len(CHAIN)
    from transformers import AutoConfig, AutoModelForImageTextToText

    from workloads.models import load_model

    for family in OTHERS:
        student = record["stages"][f"student_{family}"]
        metrics = student["metrics"]
        for term in ("l_res", "l_vis", "l_rel"):  # every KD term ran, finite and not zero
            values = [v for k, v in metrics.items() if k.endswith(term)]
            assert values and all(math.isfinite(v) and v > 0 for v in values), (
                family, term, sorted(metrics))
        model_dir = str(Path(student["uri"]) / "model")
        assert AutoConfig.from_pretrained(model_dir).model_type in FAMILIES[family].model_types
        plain = AutoModelForImageTextToText.from_pretrained(model_dir)
        ours, processor = load_model(model_dir)
        assert type(plain) is type(ours)
        if FAMILIES[family].processor_loads_on_cpu:  # the others need torchvision (video)
            from transformers import AutoProcessor

            hf = AutoProcessor.from_pretrained(model_dir)
            prompt = processor.prompt([{"role": "user", "content": "<image>\nwhat?"}], True)
            from PIL import Image

            image = Image.new("RGB", (32, 32), (200, 30, 30))
            import numpy as np

            assert np.array_equal(hf(images=[image], text=prompt, return_tensors="np")["input_ids"],
                                  processor(images=[image], text=prompt,
                                            return_tensors="np")["input_ids"]), family
        assert table[f"student_{family}"]["n"] == 4
    for family in CHAIN:
        dft = record["stages"][f"dft_{family}"]
        for term in ("l_vis", "l_rel"):  # the visual terms ran: same tokens in both models
            values = [v for k, v in dft["metrics"].items() if k.endswith(term)]
            assert values and all(v > 0 for v in values), (family, term, dft["metrics"])
        cfg = AutoConfig.from_pretrained(str(Path(dft["uri"]) / "model"))
        assert cfg.model_type == family and table[f"dft_{family}"]["n"] == 4


def test_a_pair_of_two_families_fails_at_stage_start_in_one_paragraph(cli_env, tmp_path):
    """A Qwen2-VL teacher (a published checkpoint, here a local directory through `hub_model`)
    and a Gemma 3 student: the distill stage fails before any training, naming both families."""
    from mmkd_test_plugins.data_tiny import build_tiny_data

    from workloads.models import build_model, save_model

    data = build_tiny_data(tmp_path / "data", num_samples=8, vocab_size=300)
    teacher = save_model(*build_model({"preset": "tiny-teacher", "family": "qwen2_vl"},
                                      data["tokenizer"]), str(tmp_path / "qwen_teacher"))
    pipeline = {"name": "mismatch", "defaults": {"resources": {"num_workers": 1,
                                                               "cpus_per_worker": 1}},
                "stages": {
                    "shapes": {"workload": "shapes", "params": {"num_captions": 16,
                                                                "num_instruct": 16,
                                                                "num_eval": 4}},
                    "tokenizer": {"workload": "tokenizer", "inputs": {"corpus": "shapes.captions"},
                                  "params": {"vocab_size": 300}},
                    "teacher": {"workload": "hub_model", "params": {"repo": teacher}},
                    "student": {"workload": "distill",
                                "inputs": {"tokenizer": "tokenizer.tokenizer",
                                           "teacher": "teacher.model", "data": "shapes.instruct"},
                                "params": {"model": {"preset": "tiny-student", "family": "gemma3"},
                                           **SMALL}}}}
    pipe = tmp_path / "mismatch.yaml"
    pipe.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "teacher is qwen2_vl, student is gemma3" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    record = _record(tmp_path / "home", "mismatch")
    assert record["stages"]["teacher"]["status"] == "done"  # what finished stays published
    assert record["stages"]["student"]["status"] == "failed"
