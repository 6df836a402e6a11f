"""A small byte-level BPE tokenizer for the tiny benchmark models, saved as a standard HF dir.

The tokenizer carries its own ChatML-like chat template, so preprocessing and evaluation both
render conversations through ``tokenizer.apply_chat_template`` and never hard-code role markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)

# `<|im_start|>{role}\n{content}<|im_end|>\n` per message. The assistant's `<|im_end|>` is what
# the model learns to emit to stop; generation stops on it (it is also the eos of the template).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "train_tokenizer", "corpus_texts"]


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                    min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on ``texts`` and save a ``PreTrainedTokenizerFast`` to ``out_dir``.

    The saved dir loads offline with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer vocab_size={vocab_size} is too small: byte-level BPE needs "
                         f"at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: "red" at the start of a reply and " red" mid-sentence stay the
    # distinct tokens a GPT-2-style tokenizer would give; the template puts "\n" before content.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_with_template_words(texts), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        model_max_length=1 << 20, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _with_template_words(texts: Iterable[str]) -> Iterable[str]:
    # Role names appear in every rendered conversation: make sure they get merged tokens even
    # if the corpus itself never spells them.
    for _ in range(100):
        yield from ("user\n", "assistant\n", "system\n")
    for text in texts:
        yield text.replace(IMAGE_TOKEN, "")


def corpus_texts(paths: str | list[str]) -> Iterable[str]:
    """Every conversation turn (and caption) of the webdataset shards under ``paths``."""
    import json

    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    for row in iter_rows(DataSource(format="webdataset", paths=paths)):
        if row["bad"]:
            continue
        for turn in json.loads(row["conversations"]):
            yield turn["value"]
