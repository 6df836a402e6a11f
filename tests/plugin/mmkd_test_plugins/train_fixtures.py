"""Tiny, deterministic stand-ins used by the training tests and the throughput benchmark.

A word-level tokenizer with the project's special tokens and a synthetic "shapes" data set in
the data layer's row contract (``input_ids``, ``labels``, ``pixel_values``, ``has_image``), so
the training loop can be exercised without the data layer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<image>"]
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "cross", "stripe"]
_RGB = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
        "yellow": (1.0, 1.0, -1.0)}
_WORDS = ["what", "color", "is", "the", "shape", "a", "an", "image", "of", "describe", "?", ".",
          "user", "assistant", "\n", "this", "picture", "shows"] + COLORS + SHAPES


def build_tiny_tokenizer(out_dir: str) -> str:
    """Save a word-level PreTrainedTokenizerFast with the project's special tokens to ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["<unk>"] + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"],
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def shape_image(color: str, shape: str, size: int = 32) -> np.ndarray:
    """A (3, size, size) float32 image in [-1, 1] (SigLIP normalization) with one shape."""
    img = np.full((3, size, size), -1.0, dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    if shape == "square":
        mask = (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4)
    elif shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
    elif shape == "cross":
        mask = (abs(yy - c) < size / 10) | (abs(xx - c) < size / 10)
    else:
        mask = (xx // 4) % 2 == 0
    for ch, v in enumerate(_RGB[color]):
        img[ch][mask] = v
    return img


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def shapes_rows(tokenizer: Any, n: int, seed: int = 0, image_tokens: int = 16,
                text_only_every: int = 5) -> list[dict[str, Any]]:
    """Rows in the data layer's contract: a VQA turn about a coloured shape (every
    ``text_only_every``-th row is text-only). Labels mask everything but the answer + <|im_end|>."""
    rng = np.random.default_rng(seed)
    img_id = tokenizer.convert_tokens_to_ids("<image>")
    rows = []
    for i in range(n):
        color, shape = COLORS[rng.integers(4)], SHAPES[rng.integers(4)]
        has_image = not (text_only_every and i % text_only_every == text_only_every - 1)
        q = "what color is the shape ?" if i % 2 == 0 else "what is the shape ?"
        a = color if i % 2 == 0 else shape
        if not has_image:
            q, a = "describe a red square .", "this picture shows a red square ."
        prompt = (_ids(tokenizer, "<|im_start|> user \n") + ([img_id] * image_tokens if has_image else [])
                  + _ids(tokenizer, f"{q} <|im_end|> \n <|im_start|> assistant \n"))
        answer = _ids(tokenizer, f"{a} <|im_end|>")
        rows.append({
            "input_ids": prompt + answer,
            "labels": [-100] * len(prompt) + answer,
            "pixel_values": shape_image(color, shape) if has_image
            else np.zeros((3, 32, 32), dtype=np.float32),
            "has_image": has_image,
        })
    return rows


def hold_at_gate(gate_dir: str | None, hold_after_step: int | None, sctx: Any) -> None:
    """Every rank holds at ``Gate(gate_dir)`` before the step after ``hold_after_step`` (so a
    test can kill the run there: see ``gates.py``); a released gate lets them through."""
    if gate_dir and hold_after_step is not None and sctx.step == hold_after_step:
        from mmkd_test_plugins.gates import Gate

        Gate(gate_dir).hold(f"rank{sctx.rank}", rank=sctx.rank, step=sctx.step)


class SlowLoss:
    """CausalLMLoss that sleeps each micro-step and, with ``gate_dir``, holds every rank after
    optimizer step ``hold_after_step`` until the test releases the gate (a known point to kill a
    worker at). Neither changes what is computed."""

    def __init__(self, seconds: float = 0.5, gate_dir: str | None = None,
                 hold_after_step: int | None = None):
        self.seconds = seconds
        self.gate_dir = gate_dir
        self.hold_after_step = hold_after_step

    def setup(self, model: Any, sctx: Any) -> None:
        pass

    def __call__(self, model: Any, batch: dict[str, Any], sctx: Any):
        import time

        from workloads.train_loop_parts import CausalLMLoss

        hold_at_gate(self.gate_dir, self.hold_after_step, sctx)
        time.sleep(self.seconds)
        return CausalLMLoss()(model, batch, sctx)


def yes_sayer(model, processor, answer: str = "yes"):
    """Make ``model`` answer ``answer`` to anything, greedily, by hand: with every attention and
    MLP output projection zeroed, the last position's hidden state is the final norm of the last
    token's embedding, so ``lm_head`` rows can chain prompt end → answer tokens → <|im_end|>."""
    import torch

    tok = processor.tokenizer
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        prompt = tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                         add_generation_prompt=True)
        chain = ([tok.encode(prompt, add_special_tokens=False)[-1]]
                 + tok.encode(answer, add_special_tokens=False)
                 + [tok.convert_tokens_to_ids("<|im_end|>")])
        assert len(set(chain[1:])) == len(chain) - 1, chain
        hidden = lm.norm(lm.embed_tokens(torch.tensor(chain[:-1])))
        model.lm_head.weight.zero_()
        for h, nxt in zip(hidden, chain[1:]):
            model.lm_head.weight[nxt] = h / h.norm()
    return model
