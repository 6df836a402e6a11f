"""The tiny-model tokenizer: round trips, special tokens, chat template, offline loading."""

from __future__ import annotations

import pytest

from workloads.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

TEXTS = ["a large red circle and a small blue square", "What color is the circle?",
         "How many objects are there?", "Is the red circle to the left or right of the square?",
         "yes", "no", "left", "3"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=400)
    return AutoTokenizer.from_pretrained(str(out))


def test_round_trip_including_unseen_bytes(tokenizer):
    for text in ["a large red circle", "Zebra ünïcödé 🙂 \t tabs", "<image>\nWhat?"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [ids[4]]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Merges were learned: a frequent word is one token, not its bytes.
    assert len(tokenizer(" circle", add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "user", "content": "<image>\nWhat color?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Shape?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<image>\nWhat color?<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt.endswith("red<|im_end|>\n")


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(TEXTS, tmp_path, vocab_size=100)
