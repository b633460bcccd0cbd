"""What every tokenizer shares: the base class (JSON I/O, fingerprint), its error, and id checks."""
from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path

FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """Text, ids or a tokenizer file that a tokenizer cannot handle."""


def _as_id_list(ids) -> list[int]:
    """A list of ints from a list/tuple of ints, a 1-D NumPy array or a Tensor-like object."""
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
    """TokenizerError naming the first id outside [0, vocab_size)."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise TokenizerError(
            f"token id {bad} at position {ids.index(bad)} is outside the "
            f"vocabulary [0, {vocab_size}); decode ids produced by this tokenizer")


class Tokenizer:
    """What tokenizers share: JSON I/O and a fingerprint. A subclass defines `vocab_size` (ids are
    0 .. vocab_size - 1), encode(text) -> list[int], decode(ids) -> text and to_dict() -> dict (plain JSON
    data, e.g. to embed in a checkpoint)."""

    kind = "base"

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON form; equal tokenizers share it (it keys the token cache)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON to `path`; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer that `save` wrote to `path`; it must be of this class (TokenizerError if not)."""
        from tinygpt.tokenizers import load      # the package's loader knows every kind
        tok = load(path)
        if cls is not Tokenizer and not isinstance(tok, cls):
            raise TokenizerError(
                f"{path} holds a {tok.kind!r} tokenizer, not {cls.kind!r}; "
                f"use tinygpt.tokenizers.load(path) to accept any kind")
        return tok
