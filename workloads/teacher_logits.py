"""``teacher_logits``: run a teacher once over a data set and store, per row, the payload the KD
terms need (``workloads/teacher/payload.py``: top-k logits at response and image-token
positions, the image tokens' Gram matrix) for ``distill`` with ``teacher: offline``
(``workloads/teacher/offline.py``: the stored layout and its reader).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field

from orchestrator.plugin import StageContext, WorkloadConfig, workload
from workloads.data.source import DataSource
from workloads.teacher.offline import (INDEX, MANIFEST, PROCESSOR, ShardWriter,
                                       tokenization_fingerprint)
from workloads.teacher.payload import FORMAT_VERSION, row_digests, teacher_entries

__all__ = ["TeacherLogitsConfig", "teacher_logits"]


class TeacherLogitsConfig(WorkloadConfig):
    """Run a teacher once over a data set and store its top-k logits for offline distillation."""

    data: DataSource | None = Field(None, description="data set; omit to use input `data`")
    top_k: int = Field(64, ge=1, description="logits kept per position (capped at the vocab size)")
    max_length: int = Field(256, ge=8, description="must equal the distill stage's max_length")
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(1024, ge=1, description="samples per stored shard")
    precision: str = Field("fp32", pattern="^(fp32|bf16)$", description="teacher forward dtype")
    seed: int | None = Field(None, description="file order only; the stored values do not depend on it")


@workload("teacher_logits", config=TeacherLogitsConfig, version="2", outputs=("logits",),
          distributed=False, streams_data=True)
def teacher_logits(config: TeacherLogitsConfig, ctx: StageContext) -> dict[str, Any]:
    """Store a teacher's top-k logits and visual relation matrices for offline distillation."""
    import torch

    from workloads.data.collate import collate
    from workloads.data.dataset import build_train_dataset
    from workloads.data.processor import processor_family
    from workloads.families import image_token_id as config_image_token_id
    from workloads.models import load_model
    from workloads.pretrain_sft import resolve_data_source

    teacher_dir = ctx.input("teacher")
    teacher_dir = teacher_dir[0] if isinstance(teacher_dir, list) else teacher_dir
    torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    model, processor = load_model(teacher_dir)
    model.eval().requires_grad_(False)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    model.to(dtype)
    tok = processor.tokenizer
    # the id the model replaces with image features (Gemma 3: the soft token, not <start_of_image>)
    vocab_size, image_token_id = len(tok), config_image_token_id(model.config)
    family = processor_family(teacher_dir)
    seed = ctx.seed if config.seed is None else config.seed
    ds = build_train_dataset(resolve_data_source(config, ctx), teacher_dir, config.max_length,
                             seed, keep_keys=True)
    out_dir = os.path.join(ctx.output_dir, "logits")
    writer = ShardWriter(out_dir, config.shard_size)
    n_rows = 0
    from workloads.train_loop_parts import model_inputs

    for raw in ds.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
        batch = collate(raw, tok.pad_token_id, family=family)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
        entries = teacher_entries(logits, batch, vocab_size, image_token_id, config.top_k)
        for digest, key, entry in zip(row_digests(batch), raw["key"], entries):
            writer.add(digest, str(key), entry)
        n_rows += len(entries)
    writer.flush()
    if n_rows == 0:
        raise RuntimeError(f"stage {ctx.stage!r}: the data set gave no rows")
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"rows": writer.index, "keys": writer.keys}, f)
    manifest = {"format_version": FORMAT_VERSION, "teacher": os.path.abspath(teacher_dir),
                "fingerprint": tokenization_fingerprint(teacher_dir, config.max_length),
                "max_length": config.max_length, "top_k": min(config.top_k, vocab_size),
                "vocab_size": vocab_size, "image_token_id": image_token_id,
                "num_samples": len(writer.index), "num_rows_seen": n_rows,
                "shards": writer.shard}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    from workloads.models import save_processor

    # a student with another tokenizer encodes every row with it too (`teacher_inputs: cross`)
    save_processor({"path": teacher_dir}, None, os.path.join(out_dir, PROCESSOR))
    return {"samples": float(len(writer.index)), "rows": float(n_rows), "shards": float(writer.shard)}
