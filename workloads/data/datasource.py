"""The Ray ``Datasource`` behind ``readers.read_source``: the parsers of ``readers.py`` run in
Ray read tasks, one per file, and one per byte range of a large LLaVA JSON/JSONL file.

The ranges are planned with ``json_records.split_points`` (one streaming pass over the file)
the first time the dataset runs in a process, and cut at record boundaries, so every record is
read exactly once, by exactly one task, with memory bounded by a chunk and a block of rows.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from workloads.data import json_records
from workloads.data.json_records import ByteRange
from workloads.data.readers import (BLOCK_ROWS, PARSERS, ROW_SCHEMA, SPLIT_BYTES,
                                    read_llava_json)
from workloads.data.source import FORMAT_EXTENSIONS, DataSource, resolve_files

__all__ = ["SampleDatasource"]


def _datasource_base():
    from ray.data.datasource import FileBasedDatasource

    return FileBasedDatasource


class SampleDatasource(_datasource_base()):
    """Ray file datasource around the parsers of ``readers.py``: streams each file (or byte
    range of a large LLaVA JSON/JSONL file) into row blocks."""

    def __init__(self, source: DataSource, files: list[str], shuffle: Any = None,
                 split_bytes: int = SPLIT_BYTES):
        exts = [e.lstrip(".") for e in FORMAT_EXTENSIONS[source.format]]
        super().__init__(files, shuffle=shuffle, file_extensions=exts)
        self._source = source
        self._split_bytes = max(1, split_bytes)
        self._ranges: dict[str, list[ByteRange]] = {}  # planned once per process

    def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any):
        if self._source.format == "parquet":  # parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _file_ranges(self, path: str, size: int | None) -> list[ByteRange | None]:
        if self._source.format != "llava_json" or not size or size <= self._split_bytes:
            return [None]
        if path not in self._ranges:
            parts = -(-size // self._split_bytes)
            with self._filesystem.open_input_stream(path) as f:
                self._ranges[path] = json_records.split_points(
                    f.read, size, parts, jsonl=path.endswith(".jsonl"))
        return list(self._ranges[path])

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        import numpy as np
        from ray.data.datasource import ReadTask
        from ray.data.datasource.file_based_datasource import (
            FileShuffleConfig, _wrap_s3_serialization_workaround)

        units = [(path, size, part) for path, size in zip(self._paths(), self._file_sizes())
                 for part in self._file_ranges(path, size)]
        if isinstance(self._shuffle, FileShuffleConfig):
            execution_idx = data_context._execution_idx if data_context is not None else 0
            order = np.random.default_rng(self._shuffle.get_seed(execution_idx))
            units = [units[i] for i in order.permutation(len(units))]
        fs = _wrap_s3_serialization_workaround(self._filesystem)
        tasks = []
        for group in np.array_split(np.arange(len(units)), max(1, min(parallelism, len(units)))):
            chunk = [units[i] for i in group]
            if not chunk:
                continue
            sizes = [_unit_bytes(size, part) for _, size, part in chunk]
            meta = self._meta_provider([p for p, _, _ in chunk], rows_per_file=None,
                                       file_sizes=sizes)
            tasks.append(ReadTask(functools.partial(self._read_units, fs, chunk), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def _read_units(self, fs: Any, units: list) -> Iterator[pa.Table]:
        from ray.data._internal.util import iterate_with_retry
        from ray.data.datasource.file_based_datasource import _unwrap_s3_serialization_workaround

        fs = _unwrap_s3_serialization_workaround(fs)
        for path, _, part in units:
            def attempt(path: str = path, part: ByteRange | None = part) -> Iterator[pa.Table]:
                # reopened on every attempt: a retry replays the unit from its start
                if part is None:
                    with self._open_input_source(fs, path) as f:
                        yield from self._read_stream(f, path)
                else:
                    with fs.open_input_file(path) as f:
                        f.seek(part.start)
                        yield from self._blocks(read_llava_json(f, path, self._source, part))

            yield from iterate_with_retry(attempt, description=f"read {path}",
                                          match=self._data_context.retried_io_errors)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        return self._blocks(PARSERS[self._source.format](f, path, self._source))

    @staticmethod
    def _blocks(rows_iter: Iterator[dict[str, Any]]) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        for row in rows_iter:
            rows.append(row)
            if len(rows) >= BLOCK_ROWS:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _unit_bytes(size: int | None, part: ByteRange | None) -> int | None:
    if part is None or size is None:
        return size
    return (part.end if part.end is not None else size) - part.start


def read_source(source: DataSource, seed: int | None = None,
                split_bytes: int | None = None) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Ray dataset of normalized rows: one read task per file, and several for a LLaVA
    JSON/JSONL file over ``split_bytes`` (default ``SPLIT_BYTES``; one task per byte range,
    cut at record boundaries, planned with one pass over the file when the dataset first runs).

    ``seed`` shuffles the file (and range) order deterministically, the same order on every
    execution (every epoch and every restart of a worker group: the order cannot depend on how
    often the dataset ran, or a resumed stage would read another order than the run it
    continues; ``iter_train_batches`` reshuffles rows per epoch instead); ``None`` keeps the
    sorted file order. ``max_samples`` keeps the first samples of that order when the dataset
    executes with ``preserve_order`` (``build_train_dataset`` sets it).
    """
    import ray.data

    shuffle = (ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=False)
               if seed is not None else None)
    ds = ray.data.read_datasource(SampleDatasource(source, resolve_files(source),
                                                    shuffle=shuffle,
                                                    split_bytes=split_bytes or SPLIT_BYTES))
    return ds.limit(source.max_samples) if source.max_samples is not None else ds
