"""The training dataset: read -> preprocess, lazily, for ``TorchTrainer(datasets={"train": ...})``,
and the per-worker batch stream that makes a run reproducible and resumable exactly.

Determinism by construction: the dataset executes with ``preserve_order`` (``ORDERED``), so
the rows come out in the seeded file order whatever read or preprocessing task finishes
first, ``limit(max_samples)`` keeps the first samples of that order, and Ray's
``streaming_split`` (with order preserved it ignores locality and hands each block to the
worker with the fewest rows so far) gives every worker the same rows on every run. Shuffling
without ``random_shuffle()`` (which materializes the whole dataset): the file order is fixed
per seed (``FileShuffleConfig(seed)``), and ``iter_train_batches`` permutes the rows inside
windows of ``shuffle_window`` rows with a generator seeded by (seed, epoch, rank, window), a
different order every epoch that does not depend on what ran before.

Exact resume: a worker's position is (epoch, rows taken in that epoch). A resumed worker
replays its epoch from the start and drops the rows it had taken (they are preprocessed
again, at most one epoch's worth), so the batches after the checkpoint equal the
uninterrupted run's. Ray Data has no iterator checkpoint (ray-project/ray#48224, #37633).
"""

from __future__ import annotations

from typing import Any, Iterator

from workloads.data.preprocess import preprocess_batch
from workloads.data.quality import SampleQuality
from workloads.data.datasource import read_source
from workloads.data.source import DataSource

__all__ = ["build_train_dataset", "iter_train_batches", "ordered", "SHUFFLE_WINDOW"]

SHUFFLE_WINDOW = 256  # rows permuted together (rounded up to whole batches)


def ordered(ds: Any) -> Any:
    """``ds`` set to execute with ``preserve_order`` (rows in file order, whatever task
    finishes first)."""
    ds.context.execution_options.preserve_order = True
    return ds


def build_train_dataset(source: DataSource, processor_dir: str, max_length: int, seed: int,
                        *, quality: SampleQuality | None = None, num_workers: int = 1,
                        batch_size: int = 64, keep_keys: bool = False,
                        teacher_processor_dir: str | None = None) -> "ray.data.Dataset":  # noqa: F821
    """Lazy dataset of preprocessed rows (see ``preprocess.py`` for the row contract).

    ``quality``: where bad-sample counts go; create it with ``SampleQuality.create(...)`` to
    read ``quality.metrics()`` and call ``quality.check()`` after each epoch. None creates one
    with the default budget (1%) whose totals are then only visible through its failures.
    ``num_workers``: most preprocessing tasks running at once (one CPU each).
    ``keep_keys``: also emit a ``key`` column (``source/key``), for debugging and tests.
    ``teacher_processor_dir``: also encode every row with this processor (a distill teacher
    that tokenizes images differently: response KD on its own encoding) into ``teacher_``
    columns, which ``iter_train_batches`` collates under ``teacher_`` keys; the rows and their
    order are those of the student's encoding, less the rows bad for the teacher.
    """
    import ray.data

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if quality is None:
        quality = SampleQuality.create(name=source.describe())
    ds = read_source(source, seed=seed)
    fn_kwargs = {"processor_dir": str(processor_dir), "max_length": max_length,
                 "quality": quality, "keep_keys": keep_keys}
    if teacher_processor_dir:
        fn_kwargs["teacher_dir"] = str(teacher_processor_dir)
    # Tasks, not an actor pool: see preprocess_batch for why.
    return ordered(ds.map_batches(
        preprocess_batch, fn_kwargs=fn_kwargs,
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, num_workers))))


def iter_train_batches(shard: Any, batch_size: int, pad_token_id: int, seed: int, epoch: int,
                       shuffle_window: int = SHUFFLE_WINDOW, drop_last: bool = False, *,
                       rank: int = 0, skip_rows: int = 0,
                       family: str | None = None) -> Iterator[dict]:
    """One epoch of collated torch batches from ``ray.train.get_dataset_shard("train")`` (or
    any Ray dataset/iterator), the rows permuted inside windows of ``shuffle_window`` rows
    (rounded up to whole batches; 0 keeps the stream's order) by a generator seeded with
    (seed, epoch, rank, window index). ``skip_rows``: rows of this epoch already taken (a
    resumed worker's position); the batches that follow are those an uninterrupted run gets.
    ``family``: the rows' model family for ``collate`` (None: LLaVA, or the rows' own
    ``family`` column). Rows with the teacher's own encoding give batches with its
    ``teacher_`` keys too (see ``collate``).
    """
    import numpy as np

    from workloads.data.collate import collate

    window = -(-shuffle_window // batch_size) * batch_size if shuffle_window else batch_size
    taken = 0
    for w, rows in enumerate(shard.iter_batches(batch_size=window, batch_format="numpy",
                                                drop_last=False)):
        n = len(next(iter(rows.values())))
        if taken + n <= skip_rows:  # a whole window already taken before the checkpoint
            taken += n
            continue
        order = (np.random.default_rng([seed, epoch, rank, w]).permutation(n)
                 if shuffle_window else np.arange(n))
        for i in range(0, n, batch_size):
            if taken >= skip_rows:
                idx = order[i:i + batch_size]
                if drop_last and len(idx) < batch_size:
                    return
                yield collate({k: v[idx] for k, v in rows.items()}, pad_token_id, family=family)
            taken += min(batch_size, n - i)
