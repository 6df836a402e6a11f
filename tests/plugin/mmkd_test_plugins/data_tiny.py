"""Tiny, fully local data fixtures for tests (here and in other layers): a shapes dataset and a
tokenizer + LlavaProcessor trained on it, in seconds."""

from __future__ import annotations

from pathlib import Path

from workloads.data.processor import save_llava_processor
from workloads.data.shapes import ShapesConfig, generate_shapes
from workloads.data.tokenizer import corpus_texts, train_tokenizer

__all__ = ["build_tiny_data"]


def build_tiny_data(root: str | Path, num_samples: int = 200, image_size: int = 32,
                    patch_size: int = 8, vocab_size: int = 512, seed: int = 0) -> dict[str, str]:
    """Write ``shapes/{captions,instruct,eval}``, ``tokenizer/`` and ``processor/`` under
    ``root``; returns their paths by name. ``(image_size // patch_size) ** 2`` image tokens."""
    root = Path(root)
    cfg = ShapesConfig(num_captions=num_samples, num_instruct=num_samples,
                       num_eval=max(1, num_samples // 4), image_size=image_size,
                       shard_size=max(1, num_samples // 2), seed=seed)
    generate_shapes(root / "shapes", cfg)
    splits = [str(root / "shapes" / s) for s in ("captions", "instruct")]
    train_tokenizer(corpus_texts(splits), root / "tokenizer", vocab_size=vocab_size)
    save_llava_processor(str(root / "tokenizer"), str(root / "processor"),
                         image_size=image_size, patch_size=patch_size)
    out = {s: str(root / "shapes" / s) for s in ("captions", "instruct", "eval")}
    out.update(tokenizer=str(root / "tokenizer"), processor=str(root / "processor"))
    return out
