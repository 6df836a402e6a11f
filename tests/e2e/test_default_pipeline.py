"""The main job, `mmkd run pipelines/llava_kd.yaml`, end to end with reduced steps."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import mlflow_ui, mmkd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PIPE = ROOT / "pipelines" / "llava_kd.yaml"
TRAINING = ["teacher_pt", "teacher_sft", "baseline_pt", "baseline_sft", "student_dpt",
            "student_sft", "student_dft"]


def reduced() -> list[str]:
    sets = ["stages.shapes.params.num_captions=96", "stages.shapes.params.num_instruct=96",
            "stages.shapes.params.num_eval=24", "stages.tokenizer.params.vocab_size=320",
            "stages.evaluate.params.max_samples=12", "stages.evaluate.params.caption_samples=8"]
    for stage in TRAINING:
        sets += [f"stages.{stage}.params.max_steps=3", f"stages.{stage}.params.batch_size=4",
                 f"stages.{stage}.params.checkpoint_every=2"]
    return [a for s in sets for a in ("--set", s)]


def _norm(text) -> str:
    """Exact match as VQA scripts write it: lowercase, no punctuation or articles."""
    import string

    words = "".join(" " if c in string.punctuation else c for c in str(text).lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def test_default_pipeline_end_to_end(cli_env, tmp_path):
    args = ["run", str(PIPE), "--plain", *reduced()]
    out = mmkd(args, cli_env, tmp_path, timeout=840, check=True)
    assert "| teacher |" in out.stdout and "| kd_dpt_sft_dft |" in out.stdout  # table printed

    home = tmp_path / "home"
    (record_file,) = home.glob("runs/*/run.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "success"
    assert {s["status"] for s in record["stages"].values()} == {"done"}
    for stage in TRAINING:
        assert record["stages"][stage]["metrics"]["steps"] == 3, stage
    dft = record["stages"]["student_dft"]["metrics"]
    assert dft["resumed_from_step"] == -1

    results = Path(record["stages"]["evaluate"]["uri"]) / "results"
    table = json.loads((results / "results.json").read_text())["results"]
    assert set(table) == {"teacher", "baseline_pt_sft", "kd_dpt_sft", "kd_dpt_sft_dft"}
    for name, r in table.items():  # each accuracy recomputed from its predictions file
        rows = [json.loads(line) for line in open(results / f"predictions_{name}.jsonl")]
        right = [any(_norm(row["prediction"]) == _norm(a) for a in row["answers"]) for row in rows]
        assert r["n"] == len(rows) == 12 and r["accuracy"] == pytest.approx(sum(right) / 12), name
    assert (results / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "results.csv").exists()
    # every score with its interval, every pair of models compared on the same questions
    for r in table.values():
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
    comparisons = json.loads((results / "results.json").read_text())["comparisons"]
    assert len(comparisons) == 6 and all(0 < c["p"] <= 1 for c in comparisons)
    assert "kd_dpt_sft_dft − teacher:" in out.stdout and " pts [" in out.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(record["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 10
    dft_run = next(r for r in children if r.data.tags["mmkd.stage"] == "student_dft")
    history = {term: [m.value for m in client.get_metric_history(dft_run.info.run_id, term)]
               for term in ("loss", "ce", "l_res", "l_vis", "l_rel")}
    assert all(len(h) >= 1 for h in history.values()), history
    # the default's KD terms are L_res and L_rel (beta 0: no L_vis)
    assert set(history["l_vis"]) == {0.0} and min(history["l_rel"] + history["l_res"]) > 0
    assert dft_run.data.params["alpha"] == "1.0"
    eval_run = next(r for r in children if r.data.tags["mmkd.stage"] == "evaluate")
    logged = {a.path for a in client.list_artifacts(eval_run.info.run_id, "results")}
    assert {"results/results.md", "results/results.png", "results/results.csv"} <= logged
    # the pipeline's own run carries the headline scores and the table, so MLflow's runs table
    # and chart view compare pipeline runs; the experiment opens on its runs (model training)
    for name, r in table.items():
        assert parent.data.metrics[f"{name}/accuracy"] == pytest.approx(r["accuracy"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "evaluate")} >= {
        "evaluate/results.md", "evaluate/results.png"}
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with mlflow_ui(cli_env, tmp_path) as url:
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [parent.info.experiment_id],
                             "max_results": 100}).encode())
        found = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    served = next(r for r in found if r["info"]["run_id"] == parent.info.run_id)
    served_metrics = {m["key"]: m["value"] for m in served["data"]["metrics"]}
    assert served_metrics["teacher/accuracy"] == pytest.approx(table["teacher"]["accuracy"])

    again = mmkd(args, cli_env, tmp_path, timeout=600, check=True)
    assert "10 cached" in again.stdout
