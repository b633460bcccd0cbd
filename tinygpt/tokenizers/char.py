"""The character-level tokenizer of the lecture: one token per character."""
from __future__ import annotations

from typing import Iterable

from tinygpt.tokenizers.base import FORMAT_VERSION, Tokenizer, TokenizerError, _as_id_list, _check_ids


class CharTokenizer(Tokenizer):
    """One token per character: chars[i] is the character with id i."""

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
        """The tokenizer whose vocabulary is the sorted set of characters in `text` (not empty)."""
        if not text:
            raise TokenizerError("cannot build a CharTokenizer from empty text; "
                                 "pass the training corpus")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Text of length L -> a list of L ids; TokenizerError names a character outside the vocabulary."""
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
        """A list of ids -> text, one character per id."""
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        chars = self.chars
        return "".join([chars[i] for i in ids])

    def to_dict(self) -> dict:
        """Plain JSON data (the characters in id order) that from_dict turns back into this."""
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
