"""Tests for tinygpt.tokenizers: char and byte-level BPE tokenizers."""

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt import data, tokenizers
from tinygpt.tokenizers import SPLIT_PATTERN, BPETokenizer, CharTokenizer, TokenizerError
from tinygpt.tokenizers.bpe import _merge


STRESS = ("Hello, world! It's 2026; we're   testing__snake_case.\n\n"
          "héllo ñandú e\u0301 日本語のテキスト 中文字符 한국어 עברית العربية\r\n"
          "🎉🐍 👩\u200d👩\u200d👧\u200d👦 🇺🇸 \u200b\t\x00\x7f \uffff 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ ² ٣ ∑∫√ "
          "<|endoftext|> trailing spaces   ")

TRAIN_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
              "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
              "than to famish? 日本語 日本 🎉🎉 naïve café\n") * 3


@pytest.fixture(scope="module")
def shakespeare_text():
    return data.shakespeare_text()          # the packaged copy: always there, checked by its sha256


@pytest.fixture(scope="module")
def small_bpe():
    return BPETokenizer.train(TRAIN_TEXT, 300, special_tokens=["<|endoftext|>"])


# ---------------------------------------------------------------- char --------

def test_char_roundtrip_and_sorted_vocab():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.chars == sorted(set("hello world\n"))
    assert tok.vocab_size == 9  # "\n", " ", d, e, h, l, o, r, w
    ids = tok.encode("hello\nworld")
    assert ids == [tok.stoi[c] for c in "hello\nworld"]
    assert tok.decode(ids) == "hello\nworld"
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.decode(np.array(ids)) == "hello\nworld"  # numpy arrays are accepted


def test_char_shakespeare_has_65_symbols(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65
    assert tok.chars[0] == "\n" and tok.encode("\n") == [0]
    assert tok.decode(tok.encode(shakespeare_text)) == shakespeare_text


def test_char_unknown_character_names_it_and_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"'z'.*position 3"):
        tok.encode("abcz")
    with pytest.raises(ValueError):  # TokenizerError is a ValueError
        tok.encode("🎉")


def test_char_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("abc")
    for bad in ([0, 3], [-1]):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.decode(bad)


def test_char_save_load_json(tmp_path):
    tok = CharTokenizer.from_text("héllo 🎉\n\t\"quote\"")
    path = tok.save(tmp_path / "char.json")
    d = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, no pickle
    assert d["type"] == "char" and d["version"] == tokenizers.FORMAT_VERSION
    for loaded in (CharTokenizer.load(path), tokenizers.load(path)):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.chars == tok.chars
        assert loaded.fingerprint == tok.fingerprint


def test_char_from_text_empty_raises():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


# ---------------------------------------------------------------- BPE ---------

def test_split_pattern_covers_text_and_separates_words():
    pieces = re.findall(SPLIT_PATTERN, "Hello world's 123 foo_bar!!  x")
    assert pieces == ["Hello", " world", "'s", " 123", " foo", "_", "bar", "!!", " ", " x"]
    assert "".join(re.findall(SPLIT_PATTERN, STRESS)) == STRESS


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_split_pattern_concatenates_back(text):
    assert "".join(re.findall(SPLIT_PATTERN, text)) == text


def test_merge_helper():
    assert _merge([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert _merge([5, 5, 5], (5, 5), 7) == [7, 5]
    assert _merge([], (1, 2), 9) == []


def test_bpe_train_size_and_vocab_bytes(small_bpe):
    assert small_bpe.vocab_size == 300
    assert len(small_bpe.merges) == 300 - 256 - 1
    assert small_bpe.special_ids == {"<|endoftext|>": 299}
    for k, (a, b) in enumerate(small_bpe.merges):  # each merge concatenates two tokens
        assert small_bpe.vocab[256 + k] == small_bpe.vocab[a] + small_bpe.vocab[b]


def test_bpe_roundtrip_unicode_stress(small_bpe):
    for text in (STRESS, "", " ", "\n", "🎉", "日本語", TRAIN_TEXT, STRESS * 3):
        for allowed in ("all", "none"):
            assert small_bpe.decode(small_bpe.encode(text, allowed_special=allowed)) == text
    ids = small_bpe.encode(TRAIN_TEXT)
    assert len(ids) < 0.6 * len(TRAIN_TEXT.encode("utf-8"))  # it compresses its own text
    assert small_bpe.encode("") == []


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_bpe_roundtrip_property(text):
    tok = _PROPERTY_TOK
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


_PROPERTY_TOK = BPETokenizer.train(TRAIN_TEXT + STRESS, 320, special_tokens=["<|endoftext|>"])


def test_bpe_special_tokens(small_bpe):
    eot = small_bpe.special_ids["<|endoftext|>"]
    text = "hello<|endoftext|>world"
    ids = small_bpe.encode(text)
    assert ids.count(eot) == 1
    assert eot not in small_bpe.encode(text, allowed_special="none")
    assert eot in small_bpe.encode(text, allowed_special={"<|endoftext|>"})
    assert small_bpe.decode([eot]) == "<|endoftext|>"
    with pytest.raises(TokenizerError, match="unknown special"):
        small_bpe.encode(text, allowed_special={"<|nope|>"})


def test_bpe_special_tokens_never_learned_as_merges():
    text = "<|endoftext|>".join(["ab cd"] * 200)
    tok = BPETokenizer.train(text, 270, special_tokens=["<|endoftext|>"])
    assert not any(b"<|" in t or b"|>" in t for t in tok.vocab[256:])


def _naive_train(text, num_merges):
    """Reference BPE: recount every pair before every merge (slow but obvious)."""
    words = Counter(re.findall(SPLIT_PATTERN, text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    for k in range(num_merges):
        counts = Counter()
        for w, freq in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                counts[pair] += freq
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # max count, then smallest pair
        merges.append(best)
        seqs = {w: _merge(s, best, 256 + k) for w, s in seqs.items()}
    return merges


@pytest.mark.parametrize("text", [TRAIN_TEXT, STRESS * 2, "aaaaaaa aaaa aaa\n" * 5])
def test_incremental_training_matches_naive_recount(text):
    assert BPETokenizer.train(text, 256 + 60).merges == _naive_train(text, 60)


def test_bpe_train_stops_when_pairs_run_out():
    tok = BPETokenizer.train("ab", 1000)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 257
    assert tok.decode(tok.encode("abba")) == "abba"


def test_bpe_vocab_too_small_raises():
    with pytest.raises(TokenizerError, match="vocab_size=255"):
        BPETokenizer.train("hello", 255)


def test_bpe_lone_surrogate_raises():
    tok = BPETokenizer()
    with pytest.raises(TokenizerError, match="position 2"):
        tok.encode("ab\udc80")


def test_bpe_decode_invalid_utf8_is_replaced():
    tok = BPETokenizer()
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # half of a 3-byte character
    with pytest.raises(TokenizerError):
        tok.decode([256])


def test_bpe_save_load_and_dict(tmp_path, small_bpe):
    path = small_bpe.save(tmp_path / "bpe.json")
    d = json.loads(path.read_text(encoding="utf-8"))
    assert d["type"] == "bpe" and d["special_tokens"] == ["<|endoftext|>"]
    for loaded in (tokenizers.load(path), BPETokenizer.load(path),
                   tokenizers.from_dict(small_bpe.to_dict())):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.fingerprint == small_bpe.fingerprint
        assert loaded.encode(STRESS) == small_bpe.encode(STRESS)
    assert small_bpe.fingerprint != BPETokenizer.train(TRAIN_TEXT, 280).fingerprint
    with pytest.raises(TokenizerError, match="holds a 'bpe' tokenizer"):
        CharTokenizer.load(path)


@pytest.mark.parametrize("content, match", [
    ("not json", "not valid JSON"),
    ('{"version": 1}', "'type' field"),
    ('{"type": "wordpiece", "version": 1}', "unknown tokenizer type"),
    ('{"type": "char", "version": 99, "chars": []}', "version 99"),
    ('{"type": "bpe", "version": 1, "merges": [[300, 1]]}', "corrupt"),
    ('{"type": "char", "version": 1}', "malformed"),
    ('{"type": "bpe", "version": 1, "merges": [[1, 2, 3]]}', "malformed"),
])
def test_load_bad_files(tmp_path, content, match):
    path = tmp_path / "tok.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match):
        tokenizers.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenizers.load(tmp_path / "nope.json")


def test_bpe_shakespeare_512_fast_and_exact(shakespeare_text):
    t0 = time.perf_counter()
    tok = BPETokenizer.train(shakespeare_text, 512)
    train_s = time.perf_counter() - t0
    assert tok.vocab_size == 512
    assert train_s < 30, f"training took {train_s:.1f}s"
    t0 = time.perf_counter()
    ids = tok.encode(shakespeare_text)
    encode_s = time.perf_counter() - t0
    assert encode_s < 10, f"encoding the corpus took {encode_s:.1f}s"
    assert tok.decode(ids) == shakespeare_text
    assert len(shakespeare_text.encode("utf-8")) / len(ids) > 1.8  # ~1.9 bytes per token
