"""Offline teacher: the ``teacher_logits`` workload runs the teacher once over a data set and
stores, per sample, its top-k logits at response and image-token positions plus the relation
matrix ``Z_t Z_tᵀ`` of the image tokens; ``OfflineTeacher`` serves them to ``distill``.

Layout of the output ``logits/`` dir::

    manifest.json            fingerprint of the tokenization, k, vocab size, teacher, counts
    index.json               {row digest: [shard, row]} and the sample keys, for debugging
    shard_00000/*.npy        per-shard arrays, rows concatenated (see ``_Shard``)

How a training row finds its entry: by a **content digest** of the preprocessed row (token ids,
labels, image pixels rounded to bf16; for non-LLaVA families, whose pixels do not index by row,
the digest ``collate`` takes of the row's image inputs before any cast), not by the sample key:
the shared training loop's collate does not carry keys, and a digest also proves the row was
tokenized exactly as the teacher saw it. The index (one short string per sample) is held in
memory by every worker; the arrays are memory-mapped ``.npy`` files, so a worker only pages in
the rows it trains on.
Limitation: the index of a very large set (millions of samples) costs ~100 B per sample per
worker; pixels of half-precision runs are digested after rounding to bf16 (fp16 runs may
double-round and miss: use fp32 or bf16 with an offline teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from pydantic import Field

from orchestrator.plugin import StageContext
from workloads.data.source import DataSource
from orchestrator.plugin import WorkloadConfig, workload

__all__ = ["TeacherLogitsConfig", "teacher_logits", "OfflineTeacher", "row_digests",
           "tokenization_fingerprint", "read_manifest", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
_ARRAYS = ("positions", "is_resp", "is_img", "values", "indices", "row_ptr", "gram", "gram_ptr",
           "gram_n")


class TeacherLogitsConfig(WorkloadConfig):
    """Run a teacher once over a data set and store its top-k logits for offline distillation."""

    data: DataSource | None = Field(None, description="data set; omit to use input `data`")
    top_k: int = Field(64, ge=1, description="logits kept per position (capped at the vocab size)")
    max_length: int = Field(256, ge=8, description="must equal the distill stage's max_length")
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(1024, ge=1, description="samples per stored shard")
    precision: str = Field("fp32", pattern="^(fp32|bf16)$", description="teacher forward dtype")
    seed: int | None = Field(None, description="file order only; the stored values do not depend on it")


def tokenization_fingerprint(processor_dir: str, max_length: int) -> str:
    """sha256 of everything the data layer's preprocessing depends on: vocabulary, special
    tokens, chat template, image processor settings, image-token count, and ``max_length``."""
    from workloads.data.processor import load_processor

    spec = load_processor(processor_dir)
    tok = spec.tokenizer
    image_proc = {k: v for k, v in spec.image_processor.to_dict().items()
                  if k not in ("processor_class", "_processor_class")}
    blob = {"vocab": sorted(tok.get_vocab().items()), "special": sorted(tok.all_special_tokens),
            "chat_template": tok.chat_template, "image_processor": image_proc,
            "image_size": list(spec.image_size) if spec.image_size else None,
            "num_image_tokens": spec.num_image_tokens,
            "image_token_id": spec.image_token_id, "pad_token_id": spec.pad_token_id,
            "max_length": int(max_length)}
    if spec.parts is not None:  # LLaVA's blob (and so its fingerprints) stays as it was
        # the expansion settings only: a processor dir's processor_config.json also repeats the
        # image processor and the token names, which a model dir's config.json does not
        names = {"image_processor", "chat_template", *dict(spec.parts.family.named_tokens)}
        blob.update(family=spec.family, processor_settings={
            k: v for k, v in spec.parts.settings.items() if k not in names})
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def row_digests(batch: dict[str, Any]) -> list[str]:
    """Content digest of each row of a collated (right-padded) batch; see the module docstring."""
    import torch

    out = []
    lengths = batch["attention_mask"].sum(1).tolist()
    image_digests = batch.get("mm_digest")  # non-LLaVA families: per-row, from collate
    for b, n in enumerate(lengths):
        h = hashlib.blake2b(digest_size=16)
        h.update(batch["input_ids"][b, :n].to(torch.int64).cpu().numpy().tobytes())
        h.update(batch["labels"][b, :n].to(torch.int64).cpu().numpy().tobytes())
        if image_digests is not None:
            if bool(batch["has_image"][b]):
                h.update(image_digests[b].cpu().numpy().tobytes())
        elif bool(batch["has_image"][b]):
            px = batch["pixel_values"][b].detach().to(torch.bfloat16).cpu().contiguous()
            h.update(px.view(torch.int16).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def read_manifest(logits_dir: str) -> dict[str, Any]:
    path = os.path.join(logits_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{logits_dir} has no {MANIFEST}: input `teacher_logits` must be "
                                f"the `logits` output of a `teacher_logits` stage")
    return json.load(open(path))


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    def __init__(self, out_dir: str, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.index: dict[str, list[int]] = {}
        self.keys: list[str] = []
        self.shard, self.rows = 0, []

    def add(self, digest: str, key: str, entry: dict[str, np.ndarray]) -> None:
        if digest in self.index:  # identical preprocessed rows: identical teacher output
            return
        self.index[digest] = [self.shard, len(self.rows)]
        self.keys.append(key)
        self.rows.append(entry)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        d = os.path.join(self.out_dir, f"shard_{self.shard:05d}")
        os.makedirs(d, exist_ok=True)
        cat = {k: np.concatenate([r[k] for r in self.rows]) for k in
               ("positions", "is_resp", "is_img", "values", "indices")}
        cat["row_ptr"] = np.cumsum([0] + [len(r["positions"]) for r in self.rows]).astype(np.int64)
        cat["gram"] = np.concatenate([r["gram"].reshape(-1) for r in self.rows])
        cat["gram_ptr"] = np.cumsum([0] + [r["gram"].size for r in self.rows]).astype(np.int64)
        cat["gram_n"] = np.asarray([r["gram"].shape[0] for r in self.rows], dtype=np.int64)
        for k in _ARRAYS:
            np.save(os.path.join(d, f"{k}.npy"), cat[k])
        self.shard, self.rows = self.shard + 1, []


def teacher_entries(logits: Any, batch: dict[str, Any], vocab_size: int, image_token_id: int,
                    top_k: int) -> list[dict[str, np.ndarray]]:
    """Per-row stored teacher data from teacher logits ``(B, T, V_t)`` of a collated batch.
    The top-k and relation matrices are computed where the logits are (a GPU teacher's stay on
    its GPU, one row at a time in fp32); only the results come to the CPU."""
    import torch

    from workloads.losses import response_mask

    k = min(top_k, vocab_size)
    resp = response_mask(batch["labels"]).to(logits.device)
    img = (batch["input_ids"] == image_token_id).to(logits.device)
    out = []
    for b in range(logits.shape[0]):
        z = logits[b, :, :vocab_size].float()
        pos = (resp[b] | img[b]).nonzero().squeeze(1)
        vals, idx = torch.topk(z[pos], k, dim=-1)
        zi = z[img[b]]
        gram = (zi @ zi.T) if zi.shape[0] else z.new_zeros(0, 0)
        out.append({"positions": pos.cpu().numpy().astype(np.int32),
                    "is_resp": resp[b, pos].cpu().numpy(), "is_img": img[b, pos].cpu().numpy(),
                    "values": vals.cpu().numpy().astype(np.float32),
                    "indices": idx.cpu().numpy().astype(np.int32),
                    "gram": gram.cpu().numpy().astype(np.float32)})
    return out


@workload("teacher_logits", config=TeacherLogitsConfig, version="1", outputs=("logits",),
          distributed=False, streams_data=True)
def teacher_logits(config: TeacherLogitsConfig, ctx: StageContext) -> dict[str, Any]:
    """Store a teacher's top-k logits and visual relation matrices for offline distillation."""
    import torch

    from workloads.data.collate import collate
    from workloads.data.dataset import build_train_dataset
    from workloads.data.processor import processor_family
    from workloads.families import image_token_id as config_image_token_id
    from workloads.models import load_model
    from workloads.training import resolve_data_source

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
    writer = _ShardWriter(out_dir, config.shard_size)
    n_rows = 0
    from workloads.train_setup import model_inputs

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
    return {"samples": float(len(writer.index)), "rows": float(n_rows), "shards": float(writer.shard)}


# ----------------------------------------------------------------------------- reading


class OfflineTeacher:
    """Per-worker reader of a ``teacher_logits`` dir: index in memory, arrays memory-mapped."""

    def __init__(self, logits_dir: str):
        self.dir = logits_dir
        self.manifest = read_manifest(logits_dir)
        self.index = json.load(open(os.path.join(logits_dir, INDEX)))["rows"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._shards:
            d = os.path.join(self.dir, f"shard_{i:05d}")
            self._shards[i] = {k: np.load(os.path.join(d, f"{k}.npy"), mmap_mode="r")
                               for k in _ARRAYS}
        return self._shards[i]

    def entry(self, digest: str) -> dict[str, np.ndarray]:
        loc = self.index.get(digest)
        if loc is None:
            raise KeyError(
                f"offline teacher {self.dir}: a training row has no stored teacher logits (its "
                f"tokens or image differ from what `teacher_logits` saw). Rerun `teacher_logits` "
                f"on the same data with the same processor and max_length")
        s = self._shard(loc[0])
        r = loc[1]
        a, b = int(s["row_ptr"][r]), int(s["row_ptr"][r + 1])
        g0, g1, n = int(s["gram_ptr"][r]), int(s["gram_ptr"][r + 1]), int(s["gram_n"][r])
        return {"positions": s["positions"][a:b], "is_resp": s["is_resp"][a:b],
                "is_img": s["is_img"][a:b], "values": s["values"][a:b],
                "indices": s["indices"][a:b], "gram": s["gram"][g0:g1].reshape(n, n)}

    def rows(self, student_logits: Any, batch: dict[str, Any], image_mask: Any,
             vocab_size: int) -> tuple[Any, Any]:
        """The student's logits cut to the vocabulary, and this batch's stored entries as
        ``StoredRows`` (top-k at response and image positions, image Gram matrices)."""
        import torch

        from workloads.kd_terms.teacher_rows import StoredRows
        from workloads.losses import response_mask

        s, _ = _align(student_logits, vocab_size)
        B, T, _V = s.shape
        k = int(self.manifest["top_k"])
        vals = torch.zeros(B, T, k, dtype=torch.float32, device=s.device)
        idx = torch.zeros(B, T, k, dtype=torch.long, device=s.device)
        resp = torch.zeros(B, T, dtype=torch.bool, device=s.device)
        img = torch.zeros(B, T, dtype=torch.bool, device=s.device)
        grams = []
        for b, digest in enumerate(row_digests(batch)):
            e = self.entry(digest)
            pos = torch.as_tensor(np.array(e["positions"]), dtype=torch.long, device=s.device)
            vals[b, pos] = torch.as_tensor(np.array(e["values"]), device=s.device)
            idx[b, pos] = torch.as_tensor(np.array(e["indices"]), dtype=torch.long,
                                          device=s.device)
            resp[b, pos] = torch.as_tensor(np.array(e["is_resp"]), device=s.device)
            img[b, pos] = torch.as_tensor(np.array(e["is_img"]), device=s.device)
            grams.append(torch.as_tensor(np.array(e["gram"]), device=s.device))
        if not (torch.equal(resp, response_mask(batch["labels"])) and torch.equal(img, image_mask)):
            raise ValueError(f"offline teacher {self.dir}: stored response/image positions differ "
                             f"from the training batch's; the data was tokenized differently")
        return s, StoredRows(vals, idx, resp, img, grams, vocab_size, self.describe())

    def describe(self) -> str:
        return f"the offline teacher in {self.dir}"


def _align(logits: Any, vocab_size: int) -> tuple[Any, Any]:
    from workloads.losses import align_vocab

    return align_vocab(logits, logits, vocab_size)
