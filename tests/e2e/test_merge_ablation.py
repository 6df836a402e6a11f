"""`mmkd run pipelines/merge_ablation.yaml` end to end with reduced steps: base → partitions →
experts ∥ centralized → every merge + the JAM fine-tunes → one ablation table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import mmkd

from orchestrator.loader import load_pipeline

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PIPE = ROOT / "pipelines" / "merge_ablation.yaml"


def _training_stages() -> list[str]:
    spec = load_pipeline(str(PIPE))
    # `--set` addresses a stage as written in the file (a matrix's base name)
    return list(dict.fromkeys(s.base for s in spec.stages.values()
                              if s.workload in ("pretrain", "sft")))


def reduced() -> list[str]:
    sets = ["stages.shapes.params.num_captions=64", "stages.shapes.params.num_instruct=64",
            "stages.shapes.params.num_eval=16", "stages.tokenizer.params.vocab_size=320",
            "stages.evaluate.params.max_samples=6", "stages.evaluate.params.caption_samples=4"]
    for stage in _training_stages():
        sets += [f"stages.{stage}.params.max_steps=2", f"stages.{stage}.params.batch_size=4",
                 f"stages.{stage}.params.checkpoint_every=0"]
    return [a for s in sets for a in ("--set", s)]


def test_merge_ablation_end_to_end(cli_env, tmp_path):
    args = ["run", str(PIPE), "--plain", *reduced()]
    out = mmkd(args, cli_env, tmp_path, timeout=840, check=True)
    assert "| jam_cross_ft |" in out.stdout and "| centralized |" in out.stdout  # table printed

    (record_file,) = (tmp_path / "home").glob("runs/*/run.json")
    record = json.loads(record_file.read_text())
    assert {s["status"] for s in record["stages"].values()} == {"done"}, record["stages"]
    results = Path(record["stages"]["evaluate"]["uri"]) / "results"
    table = json.loads((results / "results.json").read_text())["results"]
    names = ["centralized", "expert_0", "expert_1", "uniform", "task_arithmetic", "ties",
             "ensemble_top1", "ensemble_soft", "jam_width", "jam_width_ft", "uniform_ft",
             "jam_cross_untrained", "jam_cross_ft", "random_partition_ensemble"]
    assert list(table) == names
    for name, row in table.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == 6, name
        assert row["params"] > 0 and row["train_samples"] > 0 and row["train_s"] > 0, name

    # the costs add up the way the pipeline ran: 2 steps x batch 4 per training stage, the
    # shared base counted once
    step = 2 * 4
    assert table["expert_0"]["train_samples"] == 2 * step            # base + expert
    assert table["centralized"]["train_samples"] == 2 * step         # base + centralized
    assert table["uniform"]["train_samples"] == 3 * step             # base + 2 experts
    assert table["jam_width_ft"]["train_samples"] == 4 * step        # ... + the fine-tune
    assert table["jam_cross_ft"]["train_samples"] == 4 * step
    p = table["expert_0"]["params"]
    assert table["uniform"]["params"] == p
    # an ensemble holds its K=2 experts and the router's vision tower (the base's)
    assert 2 * p < table["ensemble_top1"]["params"] < 3 * p
    assert table["jam_width"]["params"] > 2 * p                   # doubled width: ~4x the blocks
    assert table["jam_cross_ft"]["params"] > 2 * p                # two decoders + new layers
    assert table["jam_cross_ft"]["params"] == table["jam_cross_untrained"]["params"]
    assert (results / "results.png").read_bytes()[:4] == b"\x89PNG"

    # JAM-Cross's fine-tune (`sft` with train: [bridges]) moved only the new layers
    import torch
    from safetensors.torch import load_file

    from workloads.merging.io import load_merged

    dirs = [str(Path(record["stages"][s]["uri"]) / "model") for s in ("merge_cross",
                                                                        "cross_finetune")]
    before, after = (load_merged(d) for d in dirs)
    for (name, p0), p1 in zip(before.decoders.state_dict().items(),
                              after.decoders.state_dict().values()):
        assert torch.equal(p0, p1), f"parent weight {name} changed"
    b0, b1 = (load_file(str(Path(d) / "bridge.safetensors")) for d in dirs)
    changed = {k.split(".")[0] for k in b0 if not torch.equal(b0[k], b1[k])}
    assert changed == {"bridges_ab", "bridges_ba", "fusion"}, changed
