"""Helpers shared by the model-family unit tests (the `tok_dir` fixture is in conftest.py)."""

from __future__ import annotations

import json
import tarfile

import numpy as np


def random_image(h: int, w: int, seed: int = 0):
    """An RGB PIL image of uniform noise, h x w pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def webdataset_shard(path, rows) -> None:
    """Reader-style rows (key, conversations JSON, image bytes or None) as one webdataset tar."""
    from workloads.data.shapes import _add

    with tarfile.open(path, "w") as tar:
        for row in rows:
            _add(tar, f"{row['key']}.json",
                 json.dumps({"conversations": json.loads(row["conversations"])}).encode())
            if row["image"] is not None:
                _add(tar, f"{row['key']}.png", row["image"])
