"""The training dataset: read -> preprocess, lazily, for ``TorchTrainer(datasets={"train": ...})``.

Shuffling, deterministic per seed and different per epoch, without ``random_shuffle()`` (which
materializes the whole dataset): the file order is reshuffled on every execution by Ray's
``FileShuffleConfig(seed)``, and ``iter_train_batches`` adds a local shuffle buffer seeded with
``seed + epoch``. Row order inside that buffer still depends on which read task finishes first,
so two runs see the same files in the same order but not always bit-identical batches.
"""

from __future__ import annotations

from typing import Any, Iterator

from workloads.data.collate import make_collate_fn
from workloads.data.preprocess import preprocess_batch
from workloads.data.quality import SampleQuality
from workloads.data.datasource import read_source
from workloads.data.source import DataSource

__all__ = ["build_train_dataset", "iter_train_batches"]


def build_train_dataset(source: DataSource, processor_dir: str, max_length: int, seed: int,
                        *, quality: SampleQuality | None = None, num_workers: int = 1,
                        batch_size: int = 64, keep_keys: bool = False) -> "ray.data.Dataset":  # noqa: F821
    """Lazy dataset of preprocessed rows (see ``preprocess.py`` for the row contract).

    ``quality``: where bad-sample counts go; create it with ``SampleQuality.create(...)`` to
    read ``quality.metrics()`` and call ``quality.check()`` after each epoch. None creates one
    with the default budget (1%) whose totals are then only visible through its failures.
    ``num_workers``: most preprocessing tasks running at once (one CPU each).
    ``keep_keys``: also emit a ``key`` column (``source/key``), for debugging and tests.
    """
    import ray.data

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if quality is None:
        quality = SampleQuality.create(name=source.describe())
    ds = read_source(source, seed=seed)
    # Tasks, not an actor pool: see preprocess_batch for why.
    return ds.map_batches(
        preprocess_batch, fn_kwargs={"processor_dir": str(processor_dir), "max_length": max_length,
                                     "quality": quality, "keep_keys": keep_keys},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, num_workers)))


def iter_train_batches(shard: Any, batch_size: int, pad_token_id: int, seed: int, epoch: int,
                       shuffle_buffer: int = 256, drop_last: bool = False) -> Iterator[dict]:
    """One epoch of collated torch batches from ``ray.train.get_dataset_shard("train")`` (or
    any Ray dataset/iterator). ``shuffle_buffer=0`` disables the local shuffle."""
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=make_collate_fn(pad_token_id), drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=(seed + epoch) if shuffle_buffer else None)
