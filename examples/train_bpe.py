"""Train a byte-level BPE tokenizer and show how well it compresses the corpus.

Usage::

    python examples/train_bpe.py --vocab-size 512                  # Tiny Shakespeare (shipped with tinygpt)
    python examples/train_bpe.py --corpus my.txt --vocab-size 512 --out bpe512.json

It prints the training time, the time to encode the whole corpus (with a
fresh, un-warmed tokenizer), the compression ratio (UTF-8 bytes per token;
a character-level model gets about 1), and a sample sentence cut into tokens.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tinygpt import tokenizers  # noqa: E402
from tinygpt.data import load_text  # noqa: E402
from tinygpt.tokenizers import BPETokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare (default, shipped with tinygpt), python-stdlib, a .txt file or a folder")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="add a special token, e.g. --special '<|endoftext|>' (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="save the tokenizer JSON here")
    p.add_argument("--sample", default="First Citizen: Before we proceed any further, "
                                        "hear me speak.")
    args = p.parse_args(argv)

    text = load_text(args.corpus)
    n_bytes = len(text.encode("utf-8"))
    print(f"corpus: {args.corpus} ({len(text):,} characters, {n_bytes:,} UTF-8 bytes)")

    t0 = time.perf_counter()
    tok = BPETokenizer.train(text, args.vocab_size, special_tokens=args.special)
    train_s = time.perf_counter() - t0
    print(f"trained {tok.vocab_size}-token vocabulary ({len(tok.merges)} merges) "
          f"in {train_s:.2f} s")

    fresh = tokenizers.from_dict(tok.to_dict())     # empty chunk cache: a cold encode
    t0 = time.perf_counter()
    ids = fresh.encode(text)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.encode(text)
    warm_s = time.perf_counter() - t0
    assert fresh.decode(ids) == text, "round trip failed"
    print(f"encoded the corpus in {encode_s:.2f} s: {n_bytes / encode_s / 1e6:.2f} MB/s, "
          f"{len(text) / encode_s / 1e6:.2f} M chars/s (warm cache: {warm_s:.2f} s); "
          f"decode(encode(text)) == text")
    print(f"{len(ids):,} tokens: compression {n_bytes / len(ids):.2f} bytes/token, "
          f"{len(text) / len(ids):.2f} chars/token (char-level: 1.00)")

    longest = sorted(range(256, 256 + len(tok.merges)), key=lambda i: -len(tok.vocab[i]))[:8]
    print("longest tokens:", ", ".join(repr(tok.vocab[i].decode("utf-8", "replace"))
                                       for i in longest))
    pieces = [tok.decode([i]) for i in tok.encode(args.sample)]
    print(f"sample ({len(pieces)} tokens): " + "|".join(pieces))
    if args.out:
        print(f"saved to {tok.save(args.out)}")


if __name__ == "__main__":
    main()
