"""Tokenizers: turn text into a list of integer ids and back again.

A language model never sees characters, only integers in ``[0, vocab_size)``.
A tokenizer is the (invertible) map between the two::

    ids = tok.encode("hii there")     # list[int], one id per token
    tok.decode(ids) == "hii there"    # exact round trip

Two tokenizers live here:

* :class:`CharTokenizer` -- one token per character; the vocabulary is the
  sorted set of characters in the training text (65 symbols for Tiny
  Shakespeare, ``"\\n"`` gets id 0). Tiny vocabulary, long sequences.
* :class:`BPETokenizer` -- byte-level Byte Pair Encoding as in GPT-2 /
  minbpe. It starts from the 256 possible bytes (so *any* Unicode text can be
  encoded) and repeatedly fuses the most frequent adjacent pair into a new
  token. Bigger vocabulary, shorter sequences.

Both serialise to JSON (never pickle) with a ``"type"`` field, so
:func:`load` / :func:`from_dict` can restore whichever one a file holds.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import numbers
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

FORMAT_VERSION = 1

#: Pre-tokenizer regex: the GPT-2 split pattern rewritten for the standard
#: ``re`` module (no ``regex`` dependency, so no ``\p{L}``). Pieces, in order:
#: English contractions; an optional space + letters (``[^\W\d_]`` = word
#: characters that are neither digits nor ``_``); an optional space + digits;
#: an optional space + punctuation/symbols (anything not space, letter or
#: digit, ``_`` included); runs of whitespace. Every character matches one
#: branch, so the pieces always concatenate back to the original text.
#: BPE merges never cross piece boundaries, so " dog" and "dog." stay separate.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""

_ENCODE_CACHE_LIMIT = 1_000_000  # max distinct chunks remembered by BPE.encode


class TokenizerError(ValueError):
    """Text, ids or a tokenizer file that a tokenizer cannot handle."""


def _as_id_list(ids) -> list[int]:
    """Accept a list/tuple of ints, a 1-D NumPy array or a Tensor-like object."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    elif hasattr(ids, "numpy"):
        ids = ids.numpy().tolist()
    ids = list(ids)
    if ids and not isinstance(ids[0], numbers.Integral):
        raise TokenizerError(
            f"decode expects a flat sequence of ints, got element {ids[0]!r} "
            f"of type {type(ids[0]).__name__}; pass one row of ids at a time")
    return ids


def _check_ids(ids: list[int], vocab_size: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise TokenizerError(
            f"token id {bad} at position {ids.index(bad)} is outside the "
            f"vocabulary [0, {vocab_size}); decode ids produced by this tokenizer")


class Tokenizer:
    """Shared JSON I/O and hashing. Subclasses define ``vocab_size`` (ids are
    ``0 .. vocab_size - 1``), ``encode(str) -> list[int]``, ``decode(ids) -> str``
    and ``to_dict() -> dict`` (plain JSON data, e.g. to embed in a checkpoint)."""

    kind = "base"

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON form; equal tokenizers share it."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def hash(self) -> str:
        """Same as :attr:`fingerprint` (used to key caches of encoded ids)."""
        return self.fingerprint

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON to ``path`` and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a tokenizer saved with :meth:`save`; it must be of this class."""
        tok = load(path)
        if cls is not Tokenizer and not isinstance(tok, cls):
            raise TokenizerError(
                f"{path} holds a {tok.kind!r} tokenizer, not {cls.kind!r}; "
                f"use tinygpt.tokenizers.load(path) to accept any kind")
        return tok


# ---- Character-level tokenizer ---------------------------------------------

class CharTokenizer(Tokenizer):
    """One token per character. ``chars[i]`` is the character with id ``i``."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise TokenizerError("CharTokenizer vocabulary must be single characters")
        if len(set(self.chars)) != len(self.chars):
            raise TokenizerError("CharTokenizer vocabulary contains duplicate characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Vocabulary = sorted set of characters in ``text`` (must be non-empty)."""
        if not text:
            raise TokenizerError("cannot build a CharTokenizer from empty text; "
                                 "pass the training corpus")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """``str`` of length L -> list of L ids."""
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise TokenizerError(
                f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} "
                f"is not in the {self.vocab_size}-symbol vocabulary; build the "
                f"tokenizer from text that contains it or remove it") from None

    def decode(self, ids: Iterable[int]) -> str:
        """List of ids -> ``str`` (one character per id)."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        chars = self.chars
        return "".join([chars[i] for i in ids])

    def to_dict(self) -> dict:
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ---- Byte-level BPE tokenizer ----------------------------------------------

def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` (left
    to right) by ``new_id``: ``_merge([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]``."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _compile_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise TokenizerError(f"invalid split pattern {pattern!r}: {e}") from None
    if compiled.groups:
        raise TokenizerError(f"split pattern {pattern!r} has capturing groups; use (?:...)")
    return compiled


def _special_splitter(specials: Iterable[str]) -> re.Pattern | None:
    """Regex whose capturing group matches any special token (longest first)."""
    specials = sorted(specials, key=len, reverse=True)
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0..255 are raw bytes, id ``256 + k`` is merge ``k``,
    and special tokens (e.g. ``"<|endoftext|>"``) take the ids after that.

    ``merges[k] = (a, b)`` means "the adjacent pair of tokens a, b becomes token
    256 + k"; a lower k is a higher priority (rank) when encoding.
    """

    kind = "bpe"

    def __init__(self, merges: Iterable[Iterable[int]] = (),
                 special_tokens: Iterable[str] = (), pattern: str = SPLIT_PATTERN):
        self.merges = [tuple(int(t) for t in m) for m in merges]
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise TokenizerError(f"merge {k} = ({a}, {b}) refers to a token that "
                                     f"does not exist yet; the merge list is corrupt")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {pair: 256 + k for k, pair in enumerate(self.merges)}
        self.special_tokens = list(special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens) or "" in self.special_tokens:
            raise TokenizerError(f"special tokens must be unique non-empty strings, "
                                 f"got {self.special_tokens!r}")
        self.special_ids = {s: len(self.vocab) + i for i, s in enumerate(self.special_tokens)}
        self._id_bytes = self.vocab + [s.encode("utf-8") for s in self.special_tokens]
        self.pattern = pattern
        self._split = _compile_pattern(pattern)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    # ---- training ---------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, *, special_tokens: Iterable[str] = (),
              pattern: str = SPLIT_PATTERN, verbose: bool = False) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Algorithm (incremental, so each merge costs only what it touches):

        1. Split ``text`` into chunks with ``pattern`` and count each *unique*
           chunk: Tiny Shakespeare's ~300k chunks are only ~15k distinct words.
        2. ``counts[(a, b)]`` = sum over words of freq(word) * #occurrences of
           the pair; ``where[(a, b)]`` = set of words that contain it.
        3. Repeat: take the most frequent pair (ties -> smallest ids), give it a
           new id, rewrite only the words in ``where[pair]``, and for each of
           them subtract its old pairs' counts and add its new ones. A heap
           with lazy deletion finds the maximum without rescanning all pairs.

        Training stops early if no pair is left (tiny text); ``vocab_size`` is
        then smaller than requested.
        """
        specials = list(special_tokens)
        num_merges = vocab_size - 256 - len(specials)
        if num_merges < 0:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                f"256 + {len(specials)} special tokens = {256 + len(specials)}")
        splitter = _special_splitter(specials)
        pieces = splitter.split(text)[::2] if splitter else [text]  # drop specials
        chunk_re = _compile_pattern(pattern)
        chunk_counts: Counter[str] = Counter()
        for piece in pieces:
            chunk_counts.update(chunk_re.findall(piece))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, freq) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while len(merges) < num_merges:
            best = None
            while heap:  # pop until an entry agrees with the live count
                neg_count, pair = heapq.heappop(heap)
                if counts.get(pair) == -neg_count:
                    best = pair
                    break
            if best is None:
                break
            new_id = 256 + len(merges)
            merges.append(best)
            touched = set()
            for w in where.pop(best):
                old, freq = words[w], freqs[w]
                new = _merge(old, best, new_id)
                words[w] = new
                old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
                for pair in old_pairs:
                    counts[pair] -= freq
                for pair in new_pairs:
                    counts[pair] += freq
                    where[pair].add(w)
                for pair in set(old_pairs).difference(new_pairs):
                    if pair in where:
                        where[pair].discard(w)
                touched.update(old_pairs)
                touched.update(new_pairs)
            for pair in touched:
                c = counts[pair]
                if c > 0:
                    heapq.heappush(heap, (-c, pair))
                else:
                    del counts[pair]
                    where.pop(pair, None)
            if verbose and (len(merges) % 64 == 0 or len(merges) == num_merges):
                print(f"merge {len(merges)}/{num_merges}: {best} -> {new_id}")
        return cls(merges, specials, pattern)

    # ---- encoding / decoding ------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        """Bytes of one pre-tokenized chunk -> ids, applying merges by rank:
        repeatedly fuse the adjacent pair that was learned earliest."""
        ids = list(chunk.encode("utf-8"))
        ranks = self.ranks
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
            if pair not in ranks:
                break
            ids = _merge(ids, pair, ranks[pair])
        return ids

    def _allowed_specials(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"unknown special tokens {sorted(unknown)!r}; this "
                                 f"tokenizer has {self.special_tokens!r}")
        return allowed

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """``str`` -> list of ids.

        ``allowed_special``: ``"all"`` (default) turns every occurrence of a
        special token string into its single id; ``"none"`` encodes such text
        as ordinary bytes; a set of strings allows only those. Distinct chunks
        are memoised, so encoding a whole corpus costs about one regex pass.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(
                f"text has an unencodable character {text[e.start]!r} at position "
                f"{e.start} (a lone surrogate); clean the text first") from None
        splitter = _special_splitter(self._allowed_specials(allowed_special))
        pieces = splitter.split(text) if splitter else [text]
        ids: list[int] = []
        cache = self._cache
        if len(cache) > _ENCODE_CACHE_LIMIT:
            cache.clear()
        for i, piece in enumerate(pieces):
            if i % 2 == 1:  # odd pieces are the captured special tokens
                ids.append(self.special_ids[piece])
                continue
            chunks = self._split.findall(piece)
            if sum(map(len, chunks)) != len(piece):
                raise TokenizerError(f"split pattern {self.pattern!r} skips some characters, "
                                     f"so decoding would lose them; fix the pattern")
            for chunk in chunks:
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = cache[chunk] = self._encode_chunk(chunk)
                ids.extend(chunk_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> bytes -> ``str``. Invalid UTF-8 (e.g. a sequence cut in the
        middle of a multi-byte character) becomes U+FFFD instead of failing."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        table = self._id_bytes
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                "merges": [list(m) for m in self.merges],
                "special_tokens": self.special_tokens}

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens!r})")


# ---- Restoring a tokenizer of any kind -------------------------------------

def from_dict(d: dict) -> Tokenizer:
    """Inverse of ``tokenizer.to_dict()``; dispatches on ``d["type"]``."""
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
    """Read a tokenizer JSON file written by ``save`` (char or BPE)."""
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
