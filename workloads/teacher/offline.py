"""A stored teacher: what a ``teacher_logits`` stage wrote, read back by ``distill`` with
``teacher: offline`` (``OfflineTeacher``).

Layout of a ``logits/`` dir::

    manifest.json            fingerprint of the tokenization, k, vocab size, teacher, counts
    index.json               {row digest: [shard, row]} and the sample keys, for debugging
    shard_00000/*.npy        per-shard arrays, the rows' entries concatenated (``ShardWriter``)
    processor/               the teacher's processor (a student with another tokenizer's
                             distill stage encodes every row with it too: ``cross``)

Entries and row digests are the teacher's payload (``payload.py``). The index (one short string
per sample) is held in memory by every worker; the arrays are memory-mapped ``.npy`` files, so
a worker only pages in the rows it trains on. Limitation: the index of a very large set
(millions of samples) costs ~100 B per sample per worker.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from workloads.teacher.payload import cross_rows, own_batch, row_digests, stored_rows

__all__ = ["OfflineTeacher", "ShardWriter", "read_manifest", "tokenization_fingerprint",
           "cross_loss_args",
           "MANIFEST", "INDEX", "PROCESSOR", "SHARD_ARRAYS"]

MANIFEST = "manifest.json"
INDEX = "index.json"
PROCESSOR = "processor"  # the teacher's processor: a cross-tokenizer distill encodes rows with it
SHARD_ARRAYS = ("positions", "is_resp", "is_img", "values", "indices", "row_ptr", "gram",
                "gram_ptr", "gram_n")


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


def cross_loss_args(logits_dir: str, manifest: dict[str, Any], student_tok: Any,
                    max_length: int, stage: str) -> dict[str, Any]:
    """``DistillLoss`` settings for a student with another tokenizer than the stored teacher's:
    the teacher's processor stored beside its logits (the data path encodes every row with it
    too, exactly as ``teacher_logits`` did), its vocabulary size and the tokens both
    vocabularies spell alike."""
    from transformers import AutoTokenizer

    from workloads.data.alignment import vocabulary_map
    from workloads.families.pairing import DistillCompatError

    t_proc = os.path.join(logits_dir, PROCESSOR)
    stored = os.path.isdir(t_proc)
    if not stored or tokenization_fingerprint(t_proc, max_length) != manifest["fingerprint"]:
        why = (f"were computed at max_length {manifest['max_length']}, this stage's is "
               f"{max_length}" if stored else "hold no teacher processor (older `teacher_logits` "
               "outputs)")
        raise DistillCompatError(
            f"stage {stage!r}: the teacher logits in {logits_dir} come from another tokenizer "
            f"than the student's, which the stage's KD terms allow (they align replies by "
            f"text), but they {why}. Rerun `teacher_logits` on the same data with "
            f"max_length {max_length}.")
    s_ids, t_ids = vocabulary_map(student_tok, AutoTokenizer.from_pretrained(t_proc))
    return {"teacher_processor": t_proc, "teacher_vocab_size": int(manifest["vocab_size"]),
            "shared_vocab": (s_ids.tolist(), t_ids.tolist())}


def read_manifest(logits_dir: str) -> dict[str, Any]:
    path = os.path.join(logits_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{logits_dir} has no {MANIFEST}: input `teacher_logits` must be "
                                f"the `logits` output of a `teacher_logits` stage")
    return json.load(open(path))


class ShardWriter:
    """Rows' entries (``payload.teacher_entries``) into ``shard_*/`` arrays and an index."""

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
        for k in SHARD_ARRAYS:
            np.save(os.path.join(d, f"{k}.npy"), cat[k])
        self.shard, self.rows = self.shard + 1, []


class OfflineTeacher:
    """Per-worker reader of a ``teacher_logits`` dir: index in memory, arrays memory-mapped."""

    def __init__(self, logits_dir: str, vocab_size: int, cross: tuple[int, Any] | None = None):
        """``cross``: a student with another tokenizer — ``(teacher vocab size, shared
        vocabulary)`` as ``DistillLoss`` holds them; rows are then found and read on the
        teacher's own encoding of each row (``payload.cross_rows``)."""
        self.dir, self.vocab_size, self.cross = logits_dir, vocab_size, cross
        self.manifest = read_manifest(logits_dir)
        self.index = json.load(open(os.path.join(logits_dir, INDEX)))["rows"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._shards:
            d = os.path.join(self.dir, f"shard_{i:05d}")
            self._shards[i] = {k: np.load(os.path.join(d, f"{k}.npy"), mmap_mode="r")
                               for k in SHARD_ARRAYS}
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

    def rows(self, student_logits: Any, batch: dict[str, Any], inputs: Any, image_mask: Any,
             sctx: Any = None) -> tuple[Any, Any]:
        """The student's logits cut to the vocabulary, and this batch's stored entries as
        ``StoredRows`` (the ``Teacher`` interface: ``workloads/teacher/__init__.py``), or
        ``CrossRows`` for a student with another tokenizer."""
        if self.cross is not None:
            t_batch = own_batch(batch)
            entries = [self.entry(d) for d in row_digests(t_batch)]
            return cross_rows(entries, student_logits, batch, t_batch, self.vocab_size,
                              self.cross[0], self.cross[1], self.describe())
        entries = [self.entry(d) for d in row_digests(batch)]
        return stored_rows(entries, student_logits, batch, image_mask, self.vocab_size,
                           self.describe())

    def describe(self) -> str:
        return f"the offline teacher in {self.dir}"
