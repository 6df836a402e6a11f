"""Fixtures shared by the model-family unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A tokenizer trained by mmkd's own trainer (the tokenizer stage's output layout), on the
    words the family tests' conversations use."""
    from workloads.data.tokenizer import train_tokenizer

    texts = ["What color is the shape?", "It is a red square.", "And its shape?", "A square.",
             "Describe the picture: a blue circle on a white background."] * 20
    return str(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=320))



@pytest.fixture(scope="session")
def built(tmp_path_factory, tok_dir):
    """family -> {role: model dir}: a tiny teacher and student of the family, from `tok_dir`,
    built once per family on first use."""
    from workloads.families import build_tiny

    cache: dict[str, dict[str, str]] = {}

    def get(family: str) -> dict[str, str]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            cache[family] = {role: build_tiny(family, role, tok_dir, str(root / role))
                             for role in ("teacher", "student")}
        return cache[family]

    return get
