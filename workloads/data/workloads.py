"""The data workloads: the shapes benchmark generator and the tiny-model tokenizer."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from orchestrator.plugin import StageContext
from workloads.data.shapes import ShapesConfig, generate_shapes
from workloads.data.tokenizer import corpus_texts, train_tokenizer
from orchestrator.plugin import WorkloadConfig, workload

__all__ = ["ShapesConfig", "TokenizerConfig", "shapes", "tokenizer"]


class TokenizerConfig(WorkloadConfig):
    """Byte-level BPE trained on the text of the ``corpus`` input (webdataset dirs)."""

    vocab_size: int = Field(default=1024, ge=262,
                            description="Total vocabulary incl. 256 bytes and 5 special tokens.")
    min_frequency: int = Field(default=2, ge=1,
                               description="A pair must occur this often to become a merge.")


@workload("shapes", config=ShapesConfig, version="1",
          outputs=("captions", "instruct", "eval", "val"))
def shapes(config: ShapesConfig, ctx: StageContext) -> dict[str, float]:
    """Generate the shapes benchmark (captions/, instruct/, eval/ webdataset shards)."""
    metrics = generate_shapes(ctx.output_dir, config)
    ctx.log(f"wrote {int(metrics['shapes/captions_samples'])} caption, "
            f"{int(metrics['shapes/instruct_samples'])} instruct and "
            f"{int(metrics['shapes/eval_samples'])} eval and "
            f"{int(metrics['shapes/val_samples'])} validation samples to {ctx.output_dir}")
    return metrics


@workload("tokenizer", config=TokenizerConfig, version="1", outputs=("tokenizer",))
def tokenizer(config: TokenizerConfig, ctx: StageContext) -> dict[str, float]:
    """Train a small byte-level BPE tokenizer with a ChatML chat template on the corpus."""
    corpus = ctx.input("corpus")
    paths = [corpus] if isinstance(corpus, str) else list(corpus)
    out = train_tokenizer(corpus_texts(paths), Path(ctx.output_dir) / "tokenizer",
                          vocab_size=config.vocab_size, min_frequency=config.min_frequency)
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(out)))
    ctx.log(f"tokenizer with {size} tokens saved to {out}")
    return {"tokenizer/vocab_size": float(size)}
