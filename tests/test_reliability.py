"""Issue 15, reliability: resources that run out, files that lie, numbers that blow up, processes that die.

Each test names what it guards; the training-loop ones run a tiny GPT on a small corpus for a few steps.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tinygpt import tokenizers
from tinygpt.tokenizers import BPETokenizer, TokenizerError


# ---- a BPE tokenizer file cannot hang the encoder ----------------------------------------------------------

CATASTROPHIC = [r"(?:a+)+b", r"(?:a|aa)*c", r"(?:\w+\s?)+$", r"\s*x", r"a?" * 30 + "a" * 30, r"(?:ab|cd)+"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_bpe_file_with_a_backtracking_pattern_is_refused_at_load(tmp_path, pattern):
    """The first three take seconds to centuries on ~30 characters of the wrong text with Python's re; the
    loader refuses them (and their milder kin) in one line, before any text is encoded."""
    d = BPETokenizer([(97, 97)]).to_dict()
    d["pattern"] = pattern
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match="backtrack") as e:
        tokenizers.load(path)
    assert time.perf_counter() - t0 < 0.5 and "\n" not in str(e.value)


@pytest.mark.parametrize("pattern", [tokenizers.SPLIT_PATTERN, r"\w+|\s+|[^\w\s]+", r" ?\w+| ?\d+|\s+|.",
                                     r"(?i)'(?:s|t|re)| ?[a-z]+|[^a-z]"])
def test_linear_patterns_still_load_and_round_trip(tmp_path, pattern):
    text = "The cat's 12 hats, ok?\n\n  end"
    tok = BPETokenizer.train(text * 5, 270, pattern=pattern)
    loaded = tokenizers.load(tok.save(tmp_path / "tok.json"))
    assert loaded.pattern == pattern and loaded.decode(loaded.encode(text)) == text
    assert loaded.encode(text) == tok.encode(text)


def test_accepted_patterns_encode_adversarial_text_in_linear_time():
    """What the check promises, measured: 8x the text costs about 8x the time (a backtracking pattern
    would cost 64x or more), on runs of the characters that repeats and optional pieces compete for."""
    tok = BPETokenizer([], pattern=r" ?a?b?\w+| ?\d+|\s+|.")
    def cost(n):
        text = ("a" * n + " " * n + "ab" * n + "!" * n)
        tok._cache.clear()
        t0 = time.perf_counter()
        tok.encode(text)
        return time.perf_counter() - t0
    cost(200)
    small, big = min(cost(2000) for _ in range(3)), min(cost(16000) for _ in range(3))
    assert big < 20 * small, (small, big)
