"""Sampling text from a trained model, streamed to a terminal token by token.

    model, tok, _ = tinygpt.checkpoint.load_model("out")
    tinygpt.manual_seed(1337)                                   # same seed, same text
    text = sample_text(model, tok, prompt="ROMEO:", max_new_tokens=200, out=sys.stdout)
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np

__all__ = ["sample_text", "StreamDecoder", "SEPARATOR"]

SEPARATOR = "\n---------------\n"   # between samples, as nanoGPT's sample.py prints them


class StreamDecoder:
    """Turns a growing list of token ids into text pieces as they become printable.

    It decodes the whole list each time and emits what is new, holding back a trailing U+FFFD: with byte-level
    BPE a character's UTF-8 bytes can arrive split over two tokens, and the first half alone decodes to the
    replacement character.
    """

    def __init__(self, tokenizer: Any, ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids = list(ids or [])
        self.emitted = len(tokenizer.decode(self.ids)) if self.ids else 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        piece, self.emitted = text[self.emitted:end], max(self.emitted, end)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


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
    dec = StreamDecoder(tokenizer, ids)
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
