"""Where training/eval data comes from: the typed ``DataSource`` config, file discovery and the
pre-flight checks ``mmkd validate`` runs before Ray starts.

Paths are resolved with ``pyarrow.fs`` so local paths, ``file://`` and object-store URIs
(``s3://``, ``gs://``) are handled by one well-kept library.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os.path
from typing import Literal

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DataSource", "resolve_files", "fingerprint_source",
           "fingerprint_config_sources",
           "FORMAT_EXTENSIONS"]

# File extensions each format reads from a directory or glob.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "webdataset": (".tar",),
    "llava_json": (".json", ".jsonl"),
    "llava_eval": (".json", ".jsonl"),
    "parquet": (".parquet",),
}


class DataSource(BaseModel):
    """One dataset on disk (or in an object store) and how to read it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["webdataset", "llava_json", "llava_eval", "parquet"] = Field(
        description="webdataset: tar shards of {key}.png|jpg + {key}.json|txt; llava_json: "
                    "LLaVA's JSON/JSONL list of {id, image, conversations}; llava_eval: "
                    "LLaVA's evaluation question JSONL/JSON of {question_id, image, text, "
                    "category?} with answers inline or in `answers`; parquet: an image bytes "
                    "column plus a conversations column, or a benchmark as HF datasets export "
                    "it (question, answer(s), options; see workloads/data/eval_formats.py).")
    paths: list[str] = Field(
        description="Files, directories, globs or URIs (s3://, gs://, file://). A directory "
                    "means every file of the format's extension below it.")
    image_root: str | None = Field(
        default=None,
        description="llava_json and llava_eval: folder the `image` fields are relative "
                    "to. Defaults to the JSON file's own folder.")
    answers: str | None = Field(
        default=None,
        description="llava_eval and question parquet: file of reference answers keyed by "
                    "question_id (JSONL/JSON records with answer, answers or label; VQA's "
                    "annotations JSON; or a JSON object question_id -> answer), for questions "
                    "without inline answers.")
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

    @model_validator(mode="after")
    def _answers_for_questions(self) -> "DataSource":
        if self.answers is not None and self.format not in ("llava_eval", "parquet"):
            raise ValueError(f"DataSource.answers is only read for format llava_eval or parquet "
                             f"questions, not {self.format!r}; drop `answers` or set the format")
        return self

    def describe(self) -> str:
        name = f" split {self.split!r}" if self.split else ""
        return f"{self.format} source{name} {', '.join(self.paths)}"

    def external_paths(self) -> list[str]:
        """What the stage key fingerprints (``orchestrator.fingerprint``): the data files, the
        answers file and, for LLaVA JSON, the image folder (``image_root``, or each JSON file's
        own folder)."""
        files = resolve_files(self)
        answers = [self.answers] if self.answers else []
        if self.format not in ("llava_json", "llava_eval"):
            return files + answers
        roots = [self.image_root] if self.image_root else sorted(
            {os.path.dirname(f) for f in files})
        return files + answers + roots


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_path(path: str, extensions: tuple[str, ...]) -> list[str]:
    """Files named by one entry of ``paths``, sorted; [] when nothing matches."""
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    fs, local = filesystem(path)
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
        found = expand_path(path, FORMAT_EXTENSIONS[source.format])
        if not found:
            raise FileNotFoundError(no_files_message(source, path))
        files.extend(f for f in found if f not in files)
    return files


def no_files_message(source: DataSource, path: str) -> str:
    exts = "/".join(FORMAT_EXTENSIONS[source.format])
    fs, local = filesystem(path)
    if not _has_glob(local) and fs.get_file_info(local).type == pafs.FileType.NotFound:
        return f"{source.format} data path {path!r} does not exist; fix DataSource.paths"
    return (f"no {exts} files found at {path!r} for format {source.format!r}; "
            f"check DataSource.paths and DataSource.format")


def fingerprint_source(source: DataSource) -> str:
    """Hash of the file list, sizes and modification times: changes when the data changes,
    without reading it. Used as a registry ``fingerprint=`` hook."""
    h = hashlib.sha256(json.dumps(source.model_dump(), sort_keys=True).encode())
    for path in resolve_files(source) + ([source.answers] if source.answers else []):
        fs, local = filesystem(path)
        info = fs.get_file_info(local)
        h.update(f"{path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def config_sources(config: BaseModel) -> list[tuple[str, DataSource]]:
    found = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [(name, v) for v in values if isinstance(v, DataSource)]
    return found


def fingerprint_config_sources(config: BaseModel) -> str:
    """Registry ``fingerprint=`` hook: one hash over every ``DataSource`` field's files."""
    parts = [f"{name}={fingerprint_source(src)}" for name, src in config_sources(config)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
