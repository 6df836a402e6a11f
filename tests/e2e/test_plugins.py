"""A plugin package (tests/plugin: mmkd-test-plugins) extends mmkd through entry points alone:
a workload, a KD divergence, a KD term and a merge method, used together by one pipeline via
the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.cli_helpers import mmkd

PIPE = """
name: plugin_extensions
defaults: {params: {seed: 0}}
stages:
  shapes: {workload: shapes, params: {num_captions: 64, num_instruct: 64, num_eval: 8}}
  tokenizer:
    workload: tokenizer
    inputs: {corpus: [shapes.captions, shapes.instruct]}
    params: {vocab_size: 320}
  pair: {workload: tiny_pair, inputs: {tokenizer: tokenizer.tokenizer}}
  merged:
    workload: merge
    inputs: {models: [pair.first, pair.second]}
    params: {method: max_magnitude}
  kd:
    workload: distill
    inputs: {init: merged.model, teacher: pair.first, data: shapes.instruct}
    params: {divergence: tvd, train: [projector, llm], max_steps: 2, batch_size: 4,
             checkpoint_every: 0, alpha: 1.0, beta: 1.0, gamma: 0.0,
             terms: {argmax_ce: {weight: 0.5, min_confidence: 0.0}}}
"""


def test_a_plugin_workload_divergence_kd_term_and_merge_method_run_in_one_pipeline(tmp_path, cli_env):
    out = mmkd(["workloads"], cli_env, tmp_path, check=True)
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if "│" in line}
    assert "mmkd-test-plugins" in rows["tiny_pair"] and "mmkd-test-plugins" in rows["noop"]
    product = {n for n, line in rows.items() if "│ mmkd " in line}
    assert product == {"shapes", "tokenizer", "pretrain", "sft", "distill", "teacher_logits",
                       "evaluate", "partition", "merge", "hub_model"}, \
        "no test-only workload in the product"

    pipe = tmp_path / "plugins.yaml"
    pipe.write_text(textwrap.dedent(PIPE))
    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=900, check=True)
    [record] = [json.loads(p.read_text())
                for p in (Path(cli_env["MMKD_HOME"]) / "runs").glob("*/run.json")]
    stages = record["stages"]
    assert {s["status"] for s in stages.values()} == {"done"}

    # the plugin merge method: per entry the parent value of largest magnitude
    first = load_file(Path(stages["pair"]["uri"]) / "first" / "model.safetensors")
    second = load_file(Path(stages["pair"]["uri"]) / "second" / "model.safetensors")
    merged = load_file(Path(stages["merged"]["uri"]) / "model" / "model.safetensors")
    assert set(merged) == set(first)
    for name, a in first.items():
        b = second[name]
        expected = torch.where(b.abs() > a.abs(), b, a)
        assert torch.equal(merged[name], expected), name
    # the plugin divergence: total variation is at most 1 per position
    metrics = stages["kd"]["metrics"]
    assert 0.0 < metrics["l_res"] <= 1.0 and metrics["steps"] == 2
    # the plugin KD term ran in the training worker: a cross-entropy over the 320-token
    # vocabulary of a random-init student, near log(320) = 5.77, and logged under its name
    assert 3.0 < metrics["l_argmax_ce"] < 9.0
