"""Tokenizers: text -> a list of integer ids in [0, vocab_size), and back again.

    ids = tok.encode("hii there")               # list[int], one id per token
    tok.decode(ids) == "hii there"              # an exact round trip

A language model never sees characters, only ids. Two tokenizers live here (char.py and bpe.py; base.py
holds what they share):
    CharTokenizer   one token per character; the vocabulary is the sorted set of characters in the
                    training text (65 symbols for Tiny Shakespeare, "\\n" gets id 0). A tiny vocabulary,
                    long sequences.
    BPETokenizer    byte-level Byte Pair Encoding as in GPT-2 / minbpe: it starts from the 256 bytes (so
                    any Unicode text can be encoded) and again and again fuses the most frequent adjacent
                    pair into a new token. A bigger vocabulary, shorter sequences.
Both serialise to JSON (never pickle) with a "type" field, so `load` / `from_dict` restore whichever one a
file holds.
"""
from __future__ import annotations

import json
from pathlib import Path

from tinygpt.tokenizers.base import FORMAT_VERSION, Tokenizer, TokenizerError
from tinygpt.tokenizers.bpe import SPLIT_PATTERN, BPETokenizer
from tinygpt.tokenizers.char import CharTokenizer

__all__ = ["FORMAT_VERSION", "SPLIT_PATTERN", "BPETokenizer", "CharTokenizer", "Tokenizer", "TokenizerError",
           "from_dict", "load"]


def from_dict(d: dict) -> Tokenizer:
    """The tokenizer that `tokenizer.to_dict()` described (its kind from d["type"]); TokenizerError if none."""
    if not isinstance(d, dict) or "type" not in d:
        raise TokenizerError(f"a tokenizer description must be a dict with a 'type' "
                             f"field ('char' or 'bpe'), got {type(d).__name__}")
    version = d.get("version")
    if version != FORMAT_VERSION:
        raise TokenizerError(f"unsupported tokenizer format version {version!r}; this "
                             f"tinygpt reads version {FORMAT_VERSION}")
    try:
        if d["type"] == "char":
            return CharTokenizer(d["chars"])
        if d["type"] == "bpe":
            return BPETokenizer(d["merges"], d.get("special_tokens", ()),
                                d.get("pattern", SPLIT_PATTERN))
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"malformed {d['type']!r} tokenizer description "
                             f"({type(e).__name__}: {e})") from None
    raise TokenizerError(f"unknown tokenizer type {d['type']!r}; expected 'char' or 'bpe'")


def load(path: str | Path) -> Tokenizer:
    """The tokenizer (char or BPE) in a JSON file written by `Tokenizer.save`; TokenizerError if none."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} does not exist; train one and "
                             f"save it first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON (line {e.lineno}, "
                             f"column {e.colno}: {e.msg})") from None
    return from_dict(d)
