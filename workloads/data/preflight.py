"""Data checks before compute: ``mmkd validate`` (and the start of ``mmkd run``) opens a bounded
sample of every data source and checks what training would trip over later.

Per source at most ``SAMPLES`` records, from at most ``MAX_FILES`` files (the first file and
random others; in each, the first record and records at random offsets — see
``readers.sample_file_rows``). Each sampled record must parse, its image must exist under
``image_root`` and decode within the size caps, and its ``<image>`` count must fit the image.
The sample is seeded by the file list, so the same data gives the same report.

Only clear failures are problems: (nearly) every sampled record bad (``ALL_BAD`` of them), or
more than half of the sampled image paths missing. Some bad samples are the error budget's
business at run time, where all of them are counted. Missing images get their own message
naming ``image_root`` and, when the sampled paths exist under a nearby folder, that folder.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
from collections import Counter
from dataclasses import dataclass

import pyarrow.fs as pafs
from pydantic import BaseModel

from workloads.data.quality import MISSING_IMAGE
from workloads.data.source import (FORMAT_EXTENSIONS, DataSource, config_sources, expand_path,
                                   filesystem, no_files_message)

__all__ = ["SAMPLES", "MAX_FILES", "ALL_BAD", "sample_problems", "validate_source",
           "validate_config_sources"]

SAMPLES = 32
MAX_FILES = 8
ALL_BAD = 0.9  # share of the sample that must be bad for validate to refuse the data
_MAX_CANDIDATE_DIRS = 64
_IMAGE_TOKEN = "<image>"  # LLaVA data's placeholder, whatever the model's own token


@dataclass
class _Checked:
    path: str      # data file
    key: str
    kind: str      # "" when fine
    detail: str
    image: str | None  # the `image` path a LLaVA record names (None: no image / not LLaVA)


def _check_row(row: dict, path: str) -> _Checked:
    from workloads.data.preprocess import SampleError, conversation_messages, decode_image
    from workloads.data.readers import bad_detail

    try:
        extra = json.loads(row["extra"])
    except ValueError:
        extra = {}
    image = extra.get("image") if isinstance(extra.get("image"), str) else None
    if row["bad"]:
        return _Checked(path, row["key"], row["bad"], bad_detail(row["extra"]), image)
    try:
        has_image = row["image"] is not None
        if has_image:
            decode_image(row["image"])
        conversation_messages(json.loads(row["conversations"]), has_image, _IMAGE_TOKEN)
    except SampleError as e:
        return _Checked(path, row["key"], e.kind, str(e), image)
    return _Checked(path, row["key"], "", "", image)


def _choose_files(files: list[str], rng: random.Random) -> list[str]:
    others = rng.sample(files[1:], min(len(files) - 1, MAX_FILES - 1))
    return files[:1] + others


def sample_problems(source: DataSource, files: list[str], samples: int = SAMPLES) -> list[str]:
    """Problems found in a bounded sample of ``files`` (empty list: the sample looks fine)."""
    from workloads.data.readers import sample_file_rows

    seed = hashlib.sha256("\0".join(files).encode()).digest()
    rng = random.Random(seed)
    chosen = _choose_files(files, rng)
    per_file = max(1, samples // len(chosen))
    problems: list[str] = []
    checked: list[_Checked] = []
    for path in chosen:
        try:
            rows = list(sample_file_rows(source, path, per_file, rng))
        except Exception as e:  # noqa: BLE001 - any reader failure is reported, not raised
            problems.append(f"{path}: unreadable {source.format} file ({type(e).__name__}: {e})")
            continue
        if not rows:
            problems.append(f"{path}: no samples in this file (empty dataset file)")
        checked += [_check_row(row, path) for row in rows]
    if not checked:
        return problems
    missing = _missing_images_problem(source, checked)
    if missing:
        problems.append(missing)
    bad = [c for c in checked if c.kind]
    other = [c for c in bad if not (missing and c.kind == MISSING_IMAGE)]
    if len(bad) >= ALL_BAD * len(checked) and other:
        kinds = Counter(c.kind for c in bad)
        top = max(kinds, key=kinds.get)
        ex = next(c for c in bad if c.kind == top)
        listing = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        problems.append(
            f"{len(bad)} of {len(checked)} sampled records are bad ({listing}), e.g. "
            f"{posixpath.basename(ex.path)}:{ex.key} ({ex.detail or ex.kind}). Fix the data, "
            f"or DataSource settings (format, image_root, columns)")
    return problems


def _root_of(source: DataSource, path: str) -> str:
    return source.image_root if source.image_root is not None else posixpath.dirname(path)


def _missing_images_problem(source: DataSource, checked: list[_Checked]) -> str:
    """The image_root message, when more than half of the sampled image paths are missing."""
    gone = [c for c in checked if c.kind == MISSING_IMAGE]
    refs = sum(c.image is not None for c in checked)  # sampled records naming an image
    if not gone or 2 * len(gone) <= refs:
        return ""
    root = _root_of(source, gone[0].path)
    names = ", ".join(sorted({posixpath.basename(c.path) for c in gone}))
    default = " (the default: the JSON file's folder)" if source.image_root is None else ""
    msg = (f"{refs - len(gone)} of {refs} sampled images found under image_root={root}{default} "
           f"({source.format} {names})")
    rels = [c.image for c in gone if c.image][:8]
    guess = _suggest_root(root, rels)
    if guess is not None:
        folder, hits = guess
        return (f"{msg}; did you mean image_root={folder}? ({hits} of {len(rels)} missing "
                f"sampled paths exist there)")
    example = f" (e.g. {rels[0]!r})" if rels else ""
    return f"{msg}; set DataSource.image_root to the folder the `image` paths{example} are " \
           f"relative to"


def _suggest_root(root: str, rels: list[str]) -> tuple[str, int] | None:
    """The folder near ``root`` (its subfolders two levels down, and its parent) under which
    most of ``rels`` exist, with that count; None when none has any."""
    if not rels:
        return None
    fs, local = filesystem(root)
    scheme = root[: root.index("://") + 3] if "://" in root else ""
    candidates: list[str] = []
    level = [local]
    for _ in range(2):
        nxt = []
        for d in level:
            try:
                infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
            except OSError:
                continue
            nxt += sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                          and not i.base_name.startswith("."))
        candidates += nxt
        level = nxt[:_MAX_CANDIDATE_DIRS]
        if len(candidates) >= _MAX_CANDIDATE_DIRS:
            break
    parent = posixpath.dirname(local.rstrip("/"))
    if parent and parent != local:
        candidates.append(parent)
    best = None
    for cand in candidates[:_MAX_CANDIDATE_DIRS + 1]:
        infos = fs.get_file_info([posixpath.join(cand, r) for r in rels])
        hits = sum(i.type == pafs.FileType.File for i in infos)
        if hits and (best is None or hits > best[1]):
            best = (cand, hits)
    return (scheme + best[0], best[1]) if best else None


def validate_source(source: DataSource, samples: int = 32) -> list[str]:
    """Human-readable problems with ``source`` (empty list = looks fine).

    Cheap enough for ``mmkd validate``, whatever the data's size: lists the files, then reads a
    bounded sample of records (at most ``samples``, from at most 8 files) and checks that they
    parse, their images exist under ``image_root`` and decode, and ``<image>`` counts fit (see
    ``preflight.py``).
    """
    problems: list[str] = []
    files: list[str] = []
    for path in source.paths:
        found = expand_path(path, FORMAT_EXTENSIONS[source.format])
        if not found:
            problems.append(no_files_message(source, path))
        files.extend(f for f in found if f not in files)
    if source.image_root is not None:
        fs, local = filesystem(source.image_root)
        if fs.get_file_info(local).type != pafs.FileType.Directory:
            problems.append(f"image_root {source.image_root!r} is not a folder; "
                            f"fix DataSource.image_root")
    if problems:
        return problems
    try:
        return sample_problems(source, files, samples)
    except Exception as e:  # noqa: BLE001 - validate reports, it never crashes
        return [f"{source.describe()}: could not sample the data ({type(e).__name__}: {e})"]


def validate_config_sources(config: BaseModel, inputs: dict | None = None) -> list[str]:
    """Registry ``validate=`` hook: ``validate_source`` on every ``DataSource`` field of a
    workload config, each problem prefixed with the field name."""
    return [f"{name}: {problem}" for name, src in config_sources(config)
            for problem in validate_source(src)]
