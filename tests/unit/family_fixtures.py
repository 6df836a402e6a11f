"""Helpers shared by the model-family unit tests (the `tok_dir` fixture is in conftest.py)."""

from __future__ import annotations

import numpy as np


def random_image(h: int, w: int, seed: int = 0):
    """An RGB PIL image of uniform noise, h x w pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
