"""The bigram language model of "Let's build GPT", step by step, on tinygpt instead of PyTorch.

    python examples/bigram.py                   # on Tiny Shakespeare (shipped with tinygpt)
    python examples/bigram.py --max-iters 300   # a quick look

Each step prints what the lecture shows: the vocabulary, an encode/decode round trip, the first batch, the
loss before training (≈ -ln(1/V)), a sample from the untrained table, the training curve, and a sample
after training (val loss ≈ 2.5 on Tiny Shakespeare: about the best a bigram can do).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tinygpt  # noqa: E402
from tinygpt import data, optim  # noqa: E402
from tinygpt.models import BigramLanguageModel  # noqa: E402
from tinygpt.tokenizers import CharTokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shakespeare", help="shakespeare (default), python-stdlib or a .txt file")
    p.add_argument("--max-iters", type=int, default=3000)
    p.add_argument("--device", default=None, help="cpu or cuda")
    args = p.parse_args(argv)
    # hyper-parameters of the lecture's bigram.py
    batch_size, block_size, eval_interval, learning_rate, eval_iters = 32, 8, 300, 1e-2, 200
    tinygpt.manual_seed(1337)

    # 1. The data: one long string.
    text = data.load_text(args.data)
    print(f"length of dataset in characters: {len(text):,}")
    print(text[:200])

    # 2. The vocabulary: every character that occurs, sorted. Its size V is the model's output width.
    tok = CharTokenizer.from_text(text)
    print("".join(tok.chars).encode("unicode_escape").decode()[:120])
    print(f"vocab_size = {tok.vocab_size}")

    # 3. Tokenize: characters <-> integers.
    print(tok.encode("hii there"), "->", repr(tok.decode(tok.encode("hii there"))))

    # 4. The whole text as ids; the first 90% trains, the rest tells us whether we generalise.
    ids = data.encode_cached(text, tok, name="bigram-example")
    train_data, val_data = data.train_val_split(ids, 0.9)

    # 5. A batch: B random windows of T + 1 tokens; y is x shifted by one (the next token at each place).
    rng = np.random.default_rng(1337)
    xb, yb = data.get_batch(train_data, 4, block_size, rng, args.device)
    print("inputs:", xb.shape, "\n", xb.numpy(), "\ntargets:", yb.shape, "\n", yb.numpy())

    # 6. The model: logits for the next token are row idx of a (V, V) table. Before training they are all
    #    about equal, so the loss is about -ln(1/V).
    model = BigramLanguageModel(tok.vocab_size, device=args.device)
    logits, loss = model(xb, yb)
    print(f"logits {logits.shape}, loss {loss.item():.4f}, expected -ln(1/{tok.vocab_size}) = "
          f"{-math.log(1 / tok.vocab_size):.4f}")

    # 7. Sampling from the untrained model: noise.
    start = np.zeros((1, 1), dtype=np.int64)
    print(tok.decode(model.generate(start, 100)[0].tolist()))

    # 8. Training: AdamW, lr 1e-2, batches of 32 x 8; every eval_interval, average the loss of
    #    eval_iters batches per split (eval mode, no graph).
    optimizer = optim.AdamW(model.parameters(), lr=learning_rate)

    def estimate_loss():
        out = {}
        model.eval()
        with tinygpt.no_grad():
            for name, split in (("train", train_data), ("val", val_data)):
                losses = [model(*data.get_batch(split, batch_size, block_size, rng, args.device))[1].item()
                          for _ in range(eval_iters)]
                out[name] = float(np.mean(losses))
        model.train()
        return out

    for it in range(args.max_iters + 1):
        if it % eval_interval == 0 or it == args.max_iters:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if it == args.max_iters:
            break
        xb, yb = data.get_batch(train_data, batch_size, block_size, rng, args.device)
        _, loss = model(xb, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # 9. Sampling after training: still nonsense, but with the right letter pairs ("th", "e ", ...).
    print(tok.decode(model.generate(start, 500)[0].tolist()))


if __name__ == "__main__":
    main()
