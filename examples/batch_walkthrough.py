"""Print the "Let's build GPT" walk-through of one 4 x 8 batch.

A batch of B = 4 rows and T = 8 columns holds B * T = 32 training examples:
in row b, the context ``x[b, :t+1]`` should predict the target ``y[b, t]``.
This script prints those 32 examples, one per line::

    when input is [18] the target is 47
    when input is [18, 47] the target is 56
    ...

Usage::

    python examples/batch_walkthrough.py                    # Tiny Shakespeare (shipped with tinygpt)
    python examples/batch_walkthrough.py --corpus python-stdlib --text
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tinygpt.data import encode_cached, get_batch, load_text, train_val_split  # noqa: E402
from tinygpt.tokenizers import CharTokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare (default, shipped with tinygpt), python-stdlib, a .txt file "
                        "or a folder")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--text", action="store_true", help="show characters instead of ids")
    args = p.parse_args(argv)

    text = load_text(args.corpus)
    tok = CharTokenizer.from_text(text)
    ids = encode_cached(text, tok, name=str(args.corpus))
    train, _ = train_val_split(ids, 0.9)
    x, y = get_batch(train, args.batch_size, args.block_size, np.random.default_rng(args.seed))
    x, y = x.numpy(), y.numpy()

    for b in range(args.batch_size):          # batch dimension
        for t in range(args.block_size):      # time dimension
            context, target = x[b, :t + 1].tolist(), int(y[b, t])
            if args.text:
                print(f"when input is {tok.decode(context)!r} the target is "
                      f"{tok.decode([target])!r}")
            else:
                print(f"when input is {context} the target is {target}")


if __name__ == "__main__":
    main()
