"""Where training/eval data comes from: the typed ``DataSource`` config, file discovery and the
pre-flight checks ``mmkd validate`` runs before Ray starts.

Paths are resolved with ``pyarrow.fs`` so local paths, ``file://`` and object-store URIs
(``s3://``, ``gs://``) are handled by one well-kept library.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Literal

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["DataSource", "resolve_files", "validate_source", "fingerprint_source",
           "validate_config_sources", "fingerprint_config_sources",
           "FORMAT_EXTENSIONS"]

# File extensions each format reads from a directory or glob.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "webdataset": (".tar",),
    "llava_json": (".json", ".jsonl"),
    "parquet": (".parquet",),
}


class DataSource(BaseModel):
    """One dataset on disk (or in an object store) and how to read it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["webdataset", "llava_json", "parquet"] = Field(
        description="webdataset: tar shards of {key}.png|jpg + {key}.json|txt; llava_json: "
                    "LLaVA's JSON/JSONL list of {id, image, conversations}; parquet: an image "
                    "bytes column plus a conversations column.")
    paths: list[str] = Field(
        description="Files, directories, globs or URIs (s3://, gs://, file://). A directory "
                    "means every file of the format's extension below it.")
    image_root: str | None = Field(
        default=None,
        description="llava_json only: folder the `image` fields are relative to. Defaults "
                    "to the JSON file's own folder.")
    split: str | None = Field(default=None, description="Optional split name, for logs only.")
    max_samples: int | None = Field(
        default=None, ge=1, description="Read at most this many samples (after file order).")
    image_column: str = Field(default="image",
                              description="parquet only: column holding image bytes (or a "
                                          "{bytes, path} struct, as HF datasets write it).")
    conversations_column: str = Field(default="conversations",
                                      description="parquet only: column holding the "
                                                  "conversation (JSON string or list of structs).")

    @field_validator("paths", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("paths")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("DataSource.paths is empty: give at least one file, folder or glob")
        return v

    def describe(self) -> str:
        name = f" split {self.split!r}" if self.split else ""
        return f"{self.format} source{name} {', '.join(self.paths)}"


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _expand(path: str, extensions: tuple[str, ...]) -> list[str]:
    """Files named by one entry of ``paths``, sorted; [] when nothing matches."""
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    fs, local = _filesystem(path)
    if _has_glob(local):
        # Globs: list from the longest wildcard-free prefix, then match the full pattern.
        base = local[: min(local.find(c) for c in "*?[" if c in local)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found = [i.path for i in infos if i.type == pafs.FileType.File
                 and fnmatch.fnmatch(i.path, local)]
    else:
        info = fs.get_file_info(local)
        if info.type == pafs.FileType.File:
            found = [info.path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(local, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File
                     and i.path.endswith(extensions)]
        else:
            found = []
    return sorted(scheme + f if scheme and "://" not in f else f for f in found)


def resolve_files(source: DataSource) -> list[str]:
    """All data files of ``source`` in a stable order. Raises ``FileNotFoundError`` naming the
    first entry of ``paths`` that matches nothing."""
    files: list[str] = []
    for path in source.paths:
        found = _expand(path, FORMAT_EXTENSIONS[source.format])
        if not found:
            raise FileNotFoundError(_no_files_message(source, path))
        files.extend(f for f in found if f not in files)
    return files


def _no_files_message(source: DataSource, path: str) -> str:
    exts = "/".join(FORMAT_EXTENSIONS[source.format])
    fs, local = _filesystem(path)
    if not _has_glob(local) and fs.get_file_info(local).type == pafs.FileType.NotFound:
        return f"{source.format} data path {path!r} does not exist; fix DataSource.paths"
    return (f"no {exts} files found at {path!r} for format {source.format!r}; "
            f"check DataSource.paths and DataSource.format")


def validate_source(source: DataSource, open_files: int = 2) -> list[str]:
    """Human-readable problems with ``source`` (empty list = looks fine).

    Cheap enough for ``mmkd validate``: lists the files and opens the first ``open_files`` of
    them to check they are readable and hold at least one sample.
    """
    from workloads.data.readers import iter_file_rows

    problems: list[str] = []
    files: list[str] = []
    for path in source.paths:
        found = _expand(path, FORMAT_EXTENSIONS[source.format])
        if not found:
            problems.append(_no_files_message(source, path))
        files.extend(found)
    if source.image_root is not None:
        fs, local = _filesystem(source.image_root)
        if fs.get_file_info(local).type != pafs.FileType.Directory:
            problems.append(f"image_root {source.image_root!r} is not a folder; "
                            f"fix DataSource.image_root")
    if problems:
        return problems
    for path in files[:open_files]:
        try:
            next(iter(iter_file_rows(source, path)))
        except StopIteration:
            problems.append(f"{path}: no samples in this file (empty dataset file)")
        except Exception as e:  # noqa: BLE001 - any reader failure is reported, not raised
            problems.append(f"{path}: unreadable {source.format} file ({type(e).__name__}: {e})")
    return problems


def fingerprint_source(source: DataSource) -> str:
    """Hash of the file list, sizes and modification times: changes when the data changes,
    without reading it. Used as a registry ``fingerprint=`` hook."""
    h = hashlib.sha256(json.dumps(source.model_dump(), sort_keys=True).encode())
    for path in resolve_files(source):
        fs, local = _filesystem(path)
        info = fs.get_file_info(local)
        h.update(f"{path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _config_sources(config: BaseModel) -> list[tuple[str, DataSource]]:
    found = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [(name, v) for v in values if isinstance(v, DataSource)]
    return found


def validate_config_sources(config: BaseModel, inputs: dict | None = None) -> list[str]:
    """Registry ``validate=`` hook: ``validate_source`` on every ``DataSource`` field of a
    workload config, each problem prefixed with the field name."""
    return [f"{name}: {problem}" for name, src in _config_sources(config)
            for problem in validate_source(src)]


def fingerprint_config_sources(config: BaseModel) -> str:
    """Registry ``fingerprint=`` hook: one hash over every ``DataSource`` field's files."""
    parts = [f"{name}={fingerprint_source(src)}" for name, src in _config_sources(config)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
