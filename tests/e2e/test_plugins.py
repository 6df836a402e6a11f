"""A plugin package (tests/plugin: mmkd-test-plugins) extends mmkd through entry points alone:
a workload, a KD divergence, a KD term and a merge method, used together by one pipeline via
the CLI; beside them, README's "Extending mmkd" as a new user follows it: a one-file divergence
(squared Hellinger) loaded with ``MMKD_PLUGINS=my_div`` from the pipeline's folder passes ``mmkd
validate`` and trains in the distill stage's Ray Train workers, which import the same module
(#25 item 7; it used to fail there with "unknown divergence kind 'hellinger'")."""

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
    params: {divergence: hellinger, train: [projector, llm], max_steps: 2, batch_size: 4,
             checkpoint_every: 0, alpha: 1.0, beta: 1.0, gamma: 0.0,
             terms: {argmax_ce: {weight: 0.5, min_confidence: 0.0}}}
"""


MY_DIV = textwrap.dedent('''
    """Squared Hellinger distance, one file."""
    from workloads.divergences import register_divergence


    def hellinger_rows(log_p_s, log_p_t):  # (C, V), (C, V) -> (C,)
        return 0.5 * ((log_p_s / 2).exp() - (log_p_t / 2).exp()).pow(2).sum(-1)


    register_divergence("hellinger", hellinger_rows, description="squared Hellinger")
''')


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
    (tmp_path / "my_div.py").write_text(MY_DIV)
    env = {**cli_env, "MMKD_PLUGINS": "my_div"}
    env.pop("PYTHONPATH", None)  # the module is found as a user's is: beside the pipeline
    out = mmkd(["validate", str(pipe)], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # the entry-point divergence, known to the CLI as well
    out = mmkd(["validate", str(pipe), "--set", "stages.kd.params.divergence=tvd"], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    mmkd(["run", str(pipe), "--plain"], env, tmp_path, timeout=900, check=True)
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
    # the one-file divergence ran in the worker: squared Hellinger is at most 1 per position
    metrics = stages["kd"]["metrics"]
    assert 0.0 < metrics["l_res"] <= 1.0 and metrics["steps"] == 2
    # the plugin KD term ran in the training worker: a cross-entropy over the 320-token
    # vocabulary of a random-init student, near log(320) = 5.77, and logged under its name
    assert 3.0 < metrics["l_argmax_ce"] < 9.0
