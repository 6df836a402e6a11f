"""The registered data workloads run through the registry with a plain StageContext."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.plugin import StageContext
from orchestrator.plugin import get_workload


def test_shapes_then_tokenizer_workloads(tmp_path):
    shapes = get_workload("shapes")
    assert shapes.outputs == ("captions", "instruct", "eval", "val") and shapes.version == "1"
    config = shapes.config(num_captions=30, num_instruct=30, num_eval=12, shard_size=10)
    ctx = StageContext("p", "shapes", "k1", output_dir=str(tmp_path / "shapes"))
    metrics = shapes.fn(config, ctx)
    assert metrics["shapes/captions_shards"] == 3 and metrics["shapes/eval_samples"] == 12
    assert sorted(p.name for p in (tmp_path / "shapes" / "eval").iterdir()) == [
        "eval-00000.tar", "eval-00001.tar"]

    tok = get_workload("tokenizer")
    assert tok.outputs == ("tokenizer",)
    ctx = StageContext("p", "tok", "k2", output_dir=str(tmp_path / "tok"), inputs={
        "corpus": [str(tmp_path / "shapes" / "captions"), str(tmp_path / "shapes" / "instruct")]})
    metrics = tok.fn(tok.config(vocab_size=300), ctx)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer"))
    assert len(loaded) == metrics["tokenizer/vocab_size"] <= 300
    assert loaded.chat_template and loaded.decode(loaded("a small red circle")["input_ids"]) \
        == "a small red circle"


def test_configs_reject_unknown_keys():
    with pytest.raises(ValidationError):
        get_workload("shapes").config(num_captionz=3)
    with pytest.raises(ValidationError):
        get_workload("tokenizer").config(vocab_size=10)
