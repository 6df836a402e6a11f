"""``partition``: split a training set into K clusters of images for decentralized experts.

Every training image is embedded with the frozen vision tower of input ``model`` (last hidden
states, mean-pooled, L2-normalised: ``workloads.merging.router.embed_images``, the same function
the ensemble's router uses) and clustered with spherical k-means (``mode: kmeans``; with
``balanced: true`` every assignment step is a greedy capacity-constrained one, so cluster sizes
differ by at most 1), or split uniformly at random (``mode: random``, the control).
Deterministic per ``seed``.

Inputs: ``model`` (model dir), ``data`` (WebDataset shard dir(s) of the training split).
Output ``partitions/``: ``part_{k}/part_{k}-NNNNN.tar`` (every valid sample exactly once,
``{key}.{png|jpg|…}`` + ``{key}.json``), ``centroids.npy`` (K, D) float32 unit rows,
``manifest.json`` (counts per cluster, skipped samples). Samples the readers flag as bad are
skipped and counted; text-only samples go, one by one, to the currently smallest cluster.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field

from orchestrator.plugin import StageContext
from orchestrator.plugin import WorkloadConfig, workload

__all__ = ["PartitionConfig", "partition", "spherical_kmeans", "balanced_assign",
           "random_partition", "centroids_of", "write_partitions", "run_partition"]


class PartitionConfig(WorkloadConfig):
    num_partitions: int = Field(2, ge=1, description="K, the number of clusters/experts")
    mode: Literal["kmeans", "random"] = Field("kmeans", description="kmeans: spherical k-means "
                                              "on image embeddings; random: the control")
    balanced: bool = Field(False, description="kmeans: equal-size clusters (sizes differ ≤1)")
    seed: int = Field(0, description="k-means++ init / random split seed")
    iters: int = Field(30, ge=1, description="k-means iterations (stops early on convergence)")
    batch_size: int = Field(64, ge=1, description="images per vision-tower forward")
    shard_size: int = Field(1000, ge=1, description="samples per output tar shard")


# ---- pure clustering ------------------------------------------------------------------------

def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def balanced_assign(scores: np.ndarray) -> np.ndarray:
    """Greedy capacity-constrained assignment: (N, K) similarities → (N,) cluster ids with
    sizes floor(N/K) or ceil(N/K). Pairs are taken best-first; a cluster closes at ceil, and
    once N mod K clusters reached ceil the rest close at floor."""
    n, k = scores.shape
    lo, extra = divmod(n, k)
    cap = np.full(k, lo + (1 if extra else 0))
    size = np.zeros(k, dtype=np.int64)
    assign = np.full(n, -1, dtype=np.int64)
    big = 0
    # stable sort on -score: ties broken by (sample, cluster) order → deterministic
    order = np.argsort(-scores, axis=None, kind="stable")
    for flat in order:
        i, c = divmod(int(flat), k)
        if assign[i] >= 0 or size[c] >= cap[c]:
            continue
        assign[i] = c
        size[c] += 1
        if extra and size[c] == lo + 1:
            big += 1
            if big == extra:
                cap[size < lo + 1] = lo
    return assign


def centroids_of(x: np.ndarray, assign: np.ndarray, k: int,
                 previous: np.ndarray | None = None) -> np.ndarray:
    """Unit mean direction of each cluster (an empty cluster keeps ``previous`` or gets 0)."""
    c = np.zeros((k, x.shape[1]), dtype=np.float64)
    for j in range(k):
        members = x[assign == j]
        if len(members):
            c[j] = members.sum(0)
        elif previous is not None:
            c[j] = previous[j]
    return _normalize(c)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 30,
                     balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) embeddings → (assignments (N,), unit centroids (K, D)). k-means++ init on
    cosine distance; deterministic for a seed."""
    x = _normalize(np.asarray(x, dtype=np.float64))
    n = len(x)
    if k > n:
        raise ValueError(f"partition: num_partitions={k} > {n} samples")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    for _ in range(1, k):
        dist = np.clip(1.0 - (x @ x[chosen].T).max(axis=1), 0.0, None)
        total = dist.sum()
        chosen.append(int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n)))
    c = x[chosen].copy()
    assign = np.full(n, -1)
    for _ in range(iters):
        scores = x @ c.T
        new = balanced_assign(scores) if balanced else scores.argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        c = centroids_of(x, assign, k, previous=c)
    return assign, c.astype(np.float32)


def random_partition(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Uniformly random equal-size split (sizes differ ≤1)."""
    perm = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=np.int64)
    assign[perm] = np.arange(n) % k
    return assign


# ---- data in / out --------------------------------------------------------------------------

def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    return "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_partitions(rows: list[dict[str, Any]], assign: np.ndarray, k: int, out_dir: str,
                     shard_size: int = 1000) -> list[int]:
    """Write row i into ``part_{assign[i]}``, in input order; returns counts per part."""
    counts = [0] * k
    writers: dict[int, tarfile.TarFile] = {}
    try:
        for row, c in zip(rows, assign):
            c = int(c)
            if counts[c] % shard_size == 0:
                if c in writers:
                    writers[c].close()
                d = os.path.join(out_dir, f"part_{c}")
                os.makedirs(d, exist_ok=True)
                writers[c] = tarfile.open(
                    os.path.join(d, f"part_{c}-{counts[c] // shard_size:05d}.tar"), "w",
                    format=tarfile.PAX_FORMAT)
            meta = dict(json.loads(row["extra"]))
            meta["conversations"] = json.loads(row["conversations"])
            key = row["key"]
            if row["image"] is not None:
                _add(writers[c], f"{key}.{_image_ext(row['image'])}", row["image"])
            _add(writers[c], f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            counts[c] += 1
    finally:
        for w in writers.values():
            w.close()
    for c in range(k):  # an empty cluster is still a (empty) directory
        os.makedirs(os.path.join(out_dir, f"part_{c}"), exist_ok=True)
    return counts


def _rows(data_dirs: list[str]) -> Iterator[dict[str, Any]]:
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    yield from iter_rows(DataSource(format="webdataset", paths=data_dirs))


def _embed_rows(model_dir: str, rows: list[dict[str, Any]], batch_size: int) -> np.ndarray:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from workloads.data.preprocess import decode_image
    from workloads.merging.router import embed_images

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    image_processor = AutoProcessor.from_pretrained(model_dir).image_processor
    out = []
    for i in range(0, len(rows), batch_size):
        images = [decode_image(r["image"]) for r in rows[i:i + batch_size]]
        pv = image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out.append(embed_images(model.model.vision_tower, pv.to(model.dtype)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.vision_config.hidden_size))


def run_partition(config: PartitionConfig, model_dir: str, data_dirs: list[str],
                  out_dir: str) -> dict[str, Any]:
    """Partition ``data_dirs`` into ``out_dir`` (atomically); returns the manifest."""
    from workloads.data.preprocess import SampleError, decode_image

    k = config.num_partitions
    image_rows, text_rows, bad = [], [], 0
    seen: set[str] = set()
    for row in _rows(data_dirs):
        if row["bad"]:
            bad += 1
            continue
        if row["key"] in seen:  # keys are unique per file only: make them unique overall
            row = {**row, "key": f"{os.path.splitext(row['source'])[0]}_{row['key']}"}
        seen.add(row["key"])
        if row["image"] is None:
            text_rows.append(row)
            continue
        try:
            decode_image(row["image"])
        except SampleError:
            bad += 1
            continue
        image_rows.append(row)
    if len(image_rows) < k:
        raise ValueError(f"partition: {len(image_rows)} images in {data_dirs} for "
                         f"num_partitions={k}; need at least one image per partition")
    emb = _embed_rows(model_dir, image_rows, config.batch_size)
    if config.mode == "random":
        assign = random_partition(len(image_rows), k, config.seed)
        centroids = centroids_of(emb, assign, k).astype(np.float32)
    else:
        assign, centroids = spherical_kmeans(emb, k, config.seed, config.iters, config.balanced)
    sizes = np.bincount(assign, minlength=k)
    text_assign = []
    for _ in text_rows:  # keep sizes balanced: each text-only sample to the smallest cluster
        c = int(np.argmin(sizes))
        text_assign.append(c)
        sizes[c] += 1
    rows = image_rows + text_rows
    full = np.concatenate([assign, np.asarray(text_assign, dtype=np.int64)])
    from workloads.fsutil import atomic_dir

    with atomic_dir(out_dir) as tmp:
        counts = write_partitions(rows, full, k, tmp, config.shard_size)
        np.save(os.path.join(tmp, "centroids.npy"), centroids)
        manifest = {"num_partitions": k, "mode": config.mode, "balanced": config.balanced,
                    "seed": config.seed, "counts": counts, "num_samples": len(rows),
                    "num_images": len(image_rows), "text_only": len(text_rows),
                    "skipped_bad": bad, "embedding_dim": int(centroids.shape[1]),
                    "embedding": "vision tower last hidden state, mean over patches, L2-normed",
                    "keys": {f"part_{c}": [r["key"] for r, a in zip(rows, full) if a == c]
                             for c in range(k)}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


@workload("partition", config=PartitionConfig, version="1", outputs=("partitions",),
          distributed=False)
def partition(config: PartitionConfig, ctx: StageContext) -> dict[str, float]:
    """Cluster training images by vision-tower embedding into K WebDataset partitions."""
    import torch

    torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    model = ctx.input("model")
    model = model[0] if isinstance(model, list) else model
    data = ctx.input("data")
    data = [data] if isinstance(data, str) else list(data)
    m = run_partition(config, model, data, os.path.join(ctx.output_dir, "partitions"))
    ctx.log(f"{config.mode}{' balanced' if config.balanced else ''} K={config.num_partitions}: "
            f"counts {m['counts']} ({m['skipped_bad']} bad samples skipped)")
    out = {f"count_{c}": float(n) for c, n in enumerate(m["counts"])}
    out.update(num_samples=float(m["num_samples"]), skipped_bad=float(m["skipped_bad"]))
    return out
