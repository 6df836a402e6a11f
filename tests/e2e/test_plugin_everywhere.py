"""README's "Extending mmkd", as a new user follows it: a one-file divergence (squared
Hellinger) loaded with ``MMKD_PLUGINS=my_div`` from the pipeline's folder passes ``mmkd
validate`` and then trains in the distill stage's Ray Train workers, which import the same
module (#25 item 7; it used to fail there with "unknown divergence kind 'hellinger'")."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from cli_helpers import mmkd

pytestmark = pytest.mark.slow

MY_DIV = textwrap.dedent('''
    """Squared Hellinger distance, one file."""
    from workloads.divergences import register_divergence


    def hellinger_rows(log_p_s, log_p_t):  # (C, V), (C, V) -> (C,)
        return 0.5 * ((log_p_s / 2).exp() - (log_p_t / 2).exp()).pow(2).sum(-1)


    register_divergence("hellinger", hellinger_rows, description="squared Hellinger")
''')


def test_a_one_file_divergence_reaches_the_training_workers(cli_env, tmp_path):
    (tmp_path / "my_div.py").write_text(MY_DIV)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "hellinger", "defaults": {
        "resources": {"num_workers": 1, "cpus_per_worker": 1}}, "stages": {
        "shapes": {"workload": "shapes", "params": {"num_captions": 16, "num_instruct": 16,
                                                    "num_eval": 4, "num_val": 4}},
        "tokenizer": {"workload": "tokenizer", "params": {"vocab_size": 300},
                      "inputs": {"corpus": ["shapes.captions", "shapes.instruct"]}},
        "pair": {"workload": "tiny_pair", "inputs": {"tokenizer": "tokenizer.tokenizer"}},
        "student": {"workload": "distill",
                    "inputs": {"teacher": "pair.first", "data": "shapes.instruct",
                               "tokenizer": "tokenizer.tokenizer"},
                    "params": {"model": {"preset": "tiny-student"}, "divergence": "hellinger",
                               "max_steps": 2, "batch_size": 4, "checkpoint_every": 0}},
    }}, sort_keys=False))
    env = {**cli_env, "MMKD_PLUGINS": "my_div"}
    env.pop("PYTHONPATH", None)  # the module is found as a user's is: beside the pipeline
    out = mmkd(["validate", str(pipe)], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    out = mmkd(["run", str(pipe), "--plain"], env, tmp_path, timeout=840)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (record_file,) = (tmp_path / "home").glob("runs/*/run.json")
    metrics = json.loads(record_file.read_text())["stages"]["student"]["metrics"]
    l_res = [v for k, v in metrics.items() if k.endswith("l_res")]
    assert metrics["steps"] == 2 and l_res and all(0 < v <= 1 for v in l_res)  # Hellinger <= 1
