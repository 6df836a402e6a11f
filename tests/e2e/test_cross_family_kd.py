"""`mmkd run pipelines/cross_family_kd.yaml` end to end with reduced steps: a Qwen2-VL teacher
with one BPE tokenizer distilled into a LLaVA-1.5 student with another, by ULD and by
span-aligned KD, beside a CE-only student, in one table with paired tests. The same ULD student
from the teacher's stored logits (`teacher_logits` on its own encoding, `teacher: offline`)
and from a teacher service trains with the online student's losses. The stage-start refusal of a token-by-token term
across tokenizers, as the user sees it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import mmkd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PIPE = ROOT / "pipelines" / "cross_family_kd.yaml"
TRAINING = ["teacher", "sft", "kd_uld", "kd_span"]


# the pipeline plus the other two placements: the teacher's logits at full k (V_t = 400
# reduced) and the ULD student from them; the ULD student from a teacher service (full k); the
# stages they need are the cached ones of the first run
OFFLINE = """
  teacher_logits:
    workload: teacher_logits
    inputs: {teacher: teacher.model, data: shapes.instruct}
    params: {top_k: 512}
  kd_uld_offline:
    workload: distill
    inputs: {tokenizer: student_tokenizer.tokenizer, teacher_logits: teacher_logits.logits,
             data: shapes.instruct}
    params: {<<: *student, teacher: offline, alpha: 0.0, beta: 0.0, gamma: 0.0,
             terms: {uld: 1.0}}
  kd_uld_service:
    workload: distill
    inputs: {tokenizer: student_tokenizer.tokenizer, teacher: teacher.model,
             data: shapes.instruct}
    params: {<<: *student, teacher: service, alpha: 0.0, beta: 0.0, gamma: 0.0,
             terms: {uld: 1.0}}
"""


def reduced(training: list[str] = TRAINING) -> list[str]:
    sets = ["stages.shapes.params.num_captions=48", "stages.shapes.params.num_instruct=48",
            "stages.shapes.params.num_eval=12", "stages.teacher_tokenizer.params.vocab_size=400",
            "stages.student_tokenizer.params.vocab_size=320",
            "stages.evaluate.params.max_samples=12"]
    for stage in training:
        sets += [f"stages.{stage}.params.max_steps=2", f"stages.{stage}.params.batch_size=4",
                 f"stages.{stage}.params.checkpoint_every=0"]
    return [a for s in sets for a in ("--set", s)]


def test_cross_family_kd_end_to_end_and_a_token_level_term_refused(cli_env, tmp_path):
    # the Qwen2-VL teacher's arm (`--only evaluate`); the LLaVA teacher's arm runs the same
    # stages from another teacher (benchmarks/cross_family_kd.py)
    out = mmkd(["run", str(PIPE), "--plain", "--only", "evaluate", *reduced()], cli_env,
               tmp_path, timeout=840, check=True)
    assert "| kd_uld |" in out.stdout and "| kd_span |" in out.stdout  # the table printed
    home = Path(cli_env["MMKD_HOME"])
    [record] = [json.loads(p.read_text()) for p in home.glob("runs/*/run.json")]
    assert record["status"] == "success"
    stages = record["stages"]
    for name, term in (("kd_uld", "l_uld"), ("kd_span", "l_span")):
        m = stages[name]["metrics"]
        assert m["steps"] == 2 and math.isfinite(m[term]) and m[term] > 0, (name, m)
        # the token-by-token terms did not run: weight 0 across tokenizers
        assert m["l_res"] == m["l_vis"] == m["l_rel"] == 0.0, m
    # the KD term is in the objective: loss = ce + 1.0 * term
    m = stages["kd_uld"]["metrics"]
    assert m["loss"] == pytest.approx(m["ce"] + m["l_uld"], rel=1e-5), m
    results = Path(stages["evaluate"]["uri"]) / "results" / "results.json"
    table = json.loads(results.read_text())
    assert set(table["results"]) == {"teacher", "sft", "kd_uld", "kd_span"}
    assert all(r["n"] == 12 for r in table["results"].values())
    pairs = {(c["a"], c["b"]) for c in table["comparisons"]}
    assert {("sft", "kd_uld"), ("sft", "kd_span")} <= pairs
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(Path(stages["kd_span"]["uri"]) / "model")) \
        .model_type == "llava"
    assert AutoConfig.from_pretrained(str(Path(stages["teacher"]["uri"]) / "model")) \
        .model_type == "qwen2_vl"

    # the other placements: the stored and the served teacher give the online student's losses
    offline = tmp_path / "cross_offline.yaml"
    offline.write_text(PIPE.read_text() + OFFLINE)
    mmkd(["run", str(offline), "--plain", "--only", "kd_uld_offline", "--only", "kd_uld_service",
          *reduced(TRAINING + ["kd_uld_offline", "kd_uld_service"])], cli_env, tmp_path,
         timeout=600, check=True)
    runs = sorted(home.glob("runs/*/run.json"), key=lambda p: p.stat().st_mtime)
    again = json.loads(runs[-1].read_text())["stages"]
    assert again["teacher"]["status"] == again["shapes"]["status"] == "cached", again
    a = stages["kd_uld"]["metrics"]
    for placement in ("kd_uld_offline", "kd_uld_service"):
        b = again[placement]["metrics"]
        for k in ("loss", "ce", "l_uld"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (placement, k, a, b)
    assert again["kd_uld_service"]["metrics"]["teacher_service/loads"] == 1

    # L_res (alpha 1) across tokenizers: refused at the stage's start, in one paragraph that
    # names the terms that do apply; nothing upstream is recomputed or lost
    bad = mmkd(["run", str(PIPE), "--plain", "--only", "evaluate", *reduced(), "--set",
                "stages.kd_span.params.alpha=1.0"], cli_env, tmp_path, timeout=600)
    text = bad.stdout + bad.stderr
    assert bad.returncode == 1, text
    assert "kd_span" in text and "uld" in text and "span" in text and "Traceback" not in text
    assert "another tokenizer" in text or "teacher is qwen2_vl, student is llava" in text
    assert results.exists()
