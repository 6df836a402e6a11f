"""Results that flag themselves, through the CLI (#24): a teacher whose vision tower and
projector are zero (a checkpoint whose vision weights were not loaded) fails the distill stage
at start in one paragraph; `evaluate` measures that it does not use the image (the same
answers with every image greyed: a drop of exactly 0) and reports the answer floors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import mmkd

pytestmark = pytest.mark.slow


def _pipeline() -> dict:
    small = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0}
    return {"name": "blind", "defaults": {"resources": {"num_workers": 1, "cpus_per_worker": 1}},
            "stages": {
                "shapes": {"workload": "shapes", "params": {
                    "num_captions": 32, "num_instruct": 32, "num_eval": 16}},
                "tokenizer": {"workload": "tokenizer", "params": {"vocab_size": 320},
                              "inputs": {"corpus": ["shapes.captions", "shapes.instruct"]}},
                "pair": {"workload": "tiny_pair", "inputs": {"tokenizer": "tokenizer.tokenizer"},
                         "params": {"preset": "tiny-teacher", "zero_vision": True}},
                "evaluate": {"workload": "evaluate",
                             "inputs": {"models": ["pair.first", "pair.second"],
                                        "data": "shapes.eval"},
                             "params": {"names": ["blind", "seeing"], "max_new_tokens": 4,
                                        "image_reliance_samples": 16}},
                "student": {"workload": "distill",
                            "inputs": {"teacher": "pair.first", "data": "shapes.instruct",
                                       "tokenizer": "tokenizer.tokenizer"},
                            "params": {"model": {"preset": "tiny-student"}, **small}},
            }}


def test_a_blind_teacher_fails_distill_at_start_and_evaluate_shows_it(cli_env, tmp_path):
    pipe = tmp_path / "blind.yaml"
    pipe.write_text(yaml.safe_dump(_pipeline(), sort_keys=False))
    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "does not see the images" in text and "stage 'student'" in text
    assert "allow_blind_teacher: true" in text and "Traceback" not in text

    (record_file,) = (tmp_path / "home").glob("runs/*/run.json")
    record = json.loads(record_file.read_text())
    assert record["stages"]["student"]["status"] == "failed"
    assert record["stages"]["evaluate"]["status"] == "done"
    results = json.loads((Path(record["stages"]["evaluate"]["uri"]) / "results" /
                          "results.json").read_text())
    reliance = results["checks"]["reliance"]
    # the blind model answers exactly as with the images: its answers cannot depend on them
    assert reliance["blind"]["drop"] == 0.0 and reliance["blind"]["n"] == 16
    assert results["results"]["blind"]["image_drop"] == 0.0
    floors = results["checks"]["floors"]
    assert "overall" in floors and len(floors) >= 3  # shapes asks several question types
    assert all(0 < f["floor"] <= 1 for f in floors.values())
    summary = (Path(record["stages"]["evaluate"]["uri"]) / "results" / "results.md").read_text()
    assert "Most-frequent-answer floor per question type" in summary
