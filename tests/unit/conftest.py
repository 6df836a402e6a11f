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

