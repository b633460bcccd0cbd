"""Byte-level Byte Pair Encoding, as in GPT-2 / minbpe: training (incremental pair counts) and encoding."""
from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from typing import Iterable

from tinygpt.tokenizers.base import FORMAT_VERSION, Tokenizer, TokenizerError, _as_id_list, _check_ids

# The pre-tokenizer: GPT-2's split pattern rewritten for the standard `re` module (no `regex` dependency,
# so no \p{L}). Pieces, in order: English contractions; an optional space + letters ([^\W\d_]: word
# characters that are neither digits nor _); an optional space + digits; an optional space + punctuation
# and symbols (anything not space, letter or digit, _ included); runs of whitespace. Every character
# matches one branch, so the pieces always concatenate back to the text. BPE merges never cross piece
# boundaries, so " dog" and "dog." stay separate.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""

_ENCODE_CACHE_LIMIT = 1_000_000  # max distinct chunks remembered by BPE.encode


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """ids with every non-overlapping occurrence of `pair` (left to right) replaced by new_id:
    _merge([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]."""
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


# Patterns run as they are. Any other split pattern (it may come from a tokenizer file or a checkpoint)
# must pass _check_linear first, so that no file can make encoding backtrack for ever.
KNOWN_PATTERNS = (SPLIT_PATTERN,)
_MAX_PATTERN_LEN = 1000
_MAX_BACKTRACK = 256        # alternatives a branch may try at one position (optional pieces multiply it)
_ONE_CHAR = {"LITERAL", "NOT_LITERAL", "IN", "ANY", "CATEGORY"}
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def _one_char(items) -> bool:
    """Does this parsed piece match exactly one character (a literal, a class, or alternatives of those)?"""
    if len(items) != 1:
        return False
    op, av = items[0]
    name = str(op)
    return (name in _ONE_CHAR or (name == "BRANCH" and all(_one_char(alt) for alt in av[1]))
            or (name == "SUBPATTERN" and _one_char(av[-1])))


def _fixed_cost(items) -> int | None:
    """How many ways a repeat-free piece can match at one position (optional characters double it), or
    None when it holds an unbounded repeat, a back-reference or anything else this check does not know."""
    cost = 1
    for op, av in items:
        name = str(op)
        if name in _ONE_CHAR or name == "AT":
            continue
        if name == "BRANCH":
            alts = [_fixed_cost(alt) for alt in av[1]]
            part = None if None in alts else sum(alts)
        elif name == "SUBPATTERN":
            part = _fixed_cost(av[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            part = _fixed_cost(av[1])
        elif name in _REPEATS and av[1] <= 1 and _one_char(av[2]):
            part = 2                                     # an optional character
        else:
            part = None
        if part is None:
            return None
        cost *= part
    return cost


def _check_linear(pattern: str, parsed) -> None:
    """Accept only alternatives made of fixed pieces that end in at most one repeated character (class):
    such a pattern tries a bounded number of ways per position and never backtracks into a repeat, so
    findall runs in time linear in the text (the class of \\w+|\\s+|[^\\w\\s]+). TokenizerError if not."""
    branches = parsed[0][1][1] if len(parsed) == 1 and str(parsed[0][0]) == "BRANCH" else [parsed]
    for items in branches:
        items = list(items)
        if items and str(items[-1][0]) in _REPEATS and _one_char(items[-1][1][2]):
            items = items[:-1]                           # the one repeat, at the very end
        cost = _fixed_cost(items)
        if cost is None or cost > _MAX_BACKTRACK:
            shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
            raise TokenizerError(f"split pattern {shown!r} could make encoding backtrack for a very long "
                                 f"time, so it is not run: besides tinygpt's own pattern, a pattern must be "
                                 f"alternatives of fixed pieces, each ending in at most one repeated "
                                 f"character class, e.g. r'\\w+|\\s+|[^\\w\\s]+'")


def _compile_pattern(pattern: str) -> re.Pattern:
    """The compiled split pattern, once it is known or passes _check_linear; TokenizerError if not."""
    if not isinstance(pattern, str) or len(pattern) > _MAX_PATTERN_LEN:
        raise TokenizerError(f"the split pattern must be a str of at most {_MAX_PATTERN_LEN} characters, got "
                             f"{type(pattern).__name__} of length {len(pattern) if isinstance(pattern, str) else '?'}")
    try:
        compiled = re.compile(pattern)
        if pattern not in KNOWN_PATTERNS:
            _check_linear(pattern, _sre_parse(pattern, compiled.flags))
    except (re.error, RecursionError) as e:
        raise TokenizerError(f"invalid split pattern {pattern!r}: {e}") from None
    if compiled.groups:
        raise TokenizerError(f"split pattern {pattern!r} has capturing groups; use (?:...)")
    return compiled


def _sre_parse(pattern: str, flags: int):
    """The regex parser's tree of `pattern` (what _check_linear reads)."""
    try:
        from re import _parser as sre_parse            # Python 3.11+
    except ImportError:                                 # pragma: no cover - older Pythons
        import sre_parse
    return sre_parse.parse(pattern, flags)


def _special_splitter(specials: Iterable[str]) -> re.Pattern | None:
    """A regex whose capturing group matches any special token (longest first); None without any."""
    specials = sorted(specials, key=len, reverse=True)
    if not specials:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0..255 are raw bytes, id 256 + k is merge k, and special tokens (e.g.
    "<|endoftext|>") take the ids after that.

    merges[k] = (a, b) means "the adjacent tokens a, b become token 256 + k"; a lower k is a higher
    priority (rank) when encoding.
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
        """256 bytes + the merges + the special tokens."""
        return len(self._id_bytes)

    # ---- training ---------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, *, special_tokens: Iterable[str] = (),
              pattern: str = SPLIT_PATTERN, verbose: bool = False) -> "BPETokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from `text`.

        Incremental, so each merge costs only what it touches:
            1. split text into chunks with `pattern` and count each distinct chunk (Tiny Shakespeare's
               ~300k chunks are only ~15k distinct words);
            2. counts[(a, b)] = Σ over words of freq(word) · occurrences of the pair in it,
               where[(a, b)] = the words that hold it;
            3. repeat: take the most frequent pair (ties: the smallest ids), give it a new id, rewrite only
               the words in where[pair], and for each subtract its old pairs' counts and add its new ones.
               A heap with lazy deletion finds the maximum without rescanning all pairs.
        Training stops early when no pair is left (a tiny text); vocab_size is then smaller than asked.
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
        """One pre-tokenized chunk's bytes -> ids, merges applied by rank: again and again, fuse the
        adjacent pair that was learned earliest."""
        ids = list(chunk.encode("utf-8"))
        ranks = self.ranks
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
            if pair not in ranks:
                break
            ids = _merge(ids, pair, ranks[pair])
        return ids

    def _allowed_specials(self, allowed_special) -> set[str]:
        """The special tokens that `allowed_special` ("all", "none" or a set of them) lets encode() see."""
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
        """Text -> list of ids.

        allowed_special: "all" turns every occurrence of a special token's text into its one id; "none"
        encodes such text as ordinary bytes; a set of strings allows only those. Distinct chunks are
        memoised, so encoding a whole corpus costs about one regex pass.
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
        """ids -> bytes -> text. Invalid UTF-8 (e.g. a sequence cut in the middle of a multi-byte
        character) becomes U+FFFD instead of failing."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        table = self._id_bytes
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """Plain JSON data (merges, special tokens, split pattern) that from_dict turns back into this."""
        return {"type": "bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                "merges": [list(m) for m in self.merges],
                "special_tokens": self.special_tokens}

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens!r})")
