"""Sampling text from a trained model, streamed to a terminal token by token.

    model, tok, _ = tinygpt.checkpoint.load_model("out")
    tinygpt.manual_seed(1337)                                   # same seed, same text
    text = sample_text(model, tok, prompt="ROMEO:", max_new_tokens=200, out=sys.stdout)
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np

from tinygpt import backend

__all__ = ["sample_next", "sample_text", "StreamDecoder", "SEPARATOR"]

SEPARATOR = "\n---------------\n"   # between samples, as nanoGPT's sample.py prints them


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one token id per row from logits (B, V) -> (B,) int64.

    temperature 0 is greedy (argmax). top_k keeps the k largest logits; top_p (nucleus) keeps the smallest
    set of tokens whose probabilities sum to at least p. The draw is the inverse-CDF method with one
    uniform number per row from `rng` (default: tinygpt's host generator, seeded by manual_seed).
    """
    rng = backend.host_rng() if rng is None else rng
    z = np.asarray(logits, dtype=np.float64)                     # (B, V), float64 for a stable softmax
    if temperature == 0:
        return z.argmax(axis=-1).astype(np.int64)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    z = z / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]   # (B, 1) k-th largest logit
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)                            # softmax
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = np.argsort(-p, axis=-1, kind="stable")            # most probable first
        sorted_p = np.take_along_axis(p, order, axis=-1)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p   # mass before it already >= p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(p, axis=-1)                                   # (B, V)
    u = rng.random(z.shape[0]) * cdf[:, -1]                       # (B,) one draw per row
    return np.minimum((cdf <= u[:, None]).sum(axis=-1), z.shape[-1] - 1).astype(np.int64)


class StreamDecoder:
    """Turns sampled token ids into text pieces as soon as they are printable.

    With byte-level BPE the UTF-8 bytes of one character can arrive split over two tokens; the first half
    alone decodes to U+FFFD. So a token whose text ends in U+FFFD is held back (up to `max_pending` tokens)
    until the next one completes the character.
    """

    def __init__(self, tokenizer: Any, max_pending: int = 8):
        self.tokenizer, self.max_pending = tokenizer, max_pending
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """The text that token (with any held back before it) completes; "" while a character is split."""
        self.pending.append(int(token))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.max_pending:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """What is still held back, decoded as it is (an incomplete character becomes U+FFFD)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def sample_text(model: Any, tokenizer: Any, prompt: str = "\n", max_new_tokens: int = 500,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                out: TextIO | None = None) -> str:
    """Encode `prompt`, generate `max_new_tokens` more and return prompt + continuation as text.

    With `out` (e.g. sys.stdout) each piece is written and flushed as soon as it is sampled. The random
    draws come from tinygpt's host generator: call tinygpt.manual_seed first for repeatable text.
    """
    ids = tokenizer.encode(prompt)      # TokenizerError names a character outside the vocabulary
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give at least one character (the default is a "
                         "newline)")
    dec = StreamDecoder(tokenizer)
    pieces = [prompt]
    if out is not None:
        out.write(prompt)
        out.flush()
    for nxt in model.generate_stream(np.asarray([ids], dtype=np.int64), max_new_tokens, temperature, top_k,
                                     top_p):
        piece = dec.push(int(nxt[0]))
        pieces.append(piece)
        if out is not None and piece:
            out.write(piece)
            out.flush()
    tail = dec.flush()
    pieces.append(tail)
    if out is not None and tail:
        out.write(tail)
        out.flush()
    return "".join(pieces)


def main_stream(model: Any, tokenizer: Any, num_samples: int, out: TextIO = sys.stdout, **kwargs: Any) -> list[str]:
    """`num_samples` samples one after another, separated by SEPARATOR (what `tinygpt sample` prints)."""
    texts = []
    for i in range(num_samples):
        if i:
            out.write(SEPARATOR)
        texts.append(sample_text(model, tokenizer, out=out, **kwargs))
    out.write("\n")
    out.flush()
    return texts
