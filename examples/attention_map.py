"""Where does each head look? Train a small GPT on Tiny Shakespeare, then draw its attention over a prompt.

    python examples/attention_map.py                      # 600 steps (~10 s on a laptop CPU) -> PNG
    python examples/attention_map.py --steps 0            # the untrained model: every row is a flat average
    python examples/attention_map.py --prompt "KING RICHARD III:" --out /tmp/att

One heatmap per layer and head: row t is the query at character t, column j the key at character j, and
the colour the weight softmax(q kᵀ/√hs) gives it (each row sums to 1; the causal mask leaves the upper
triangle at 0). Needs matplotlib (pip install 'tinygpt[plot]') for the PNG; without it the maps are printed.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tinygpt  # noqa: E402
from tinygpt import data, models, optim, viz  # noqa: E402
from tinygpt.tokenizers import CharTokenizer  # noqa: E402


def train(model, ids, steps, batch_size, lr):
    """AdamW on random (B, T) windows of `ids`; returns the last loss."""
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(1337)
    loss, t0 = None, time.perf_counter()
    for step in range(steps):
        x, y = data.get_batch(ids, batch_size, model.config.block_size, rng)   # (B, T) each
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)")
    return loss


def show(chars, att, path):
    """A grid of heatmaps, layers down, heads across, written to `path` (PNG) with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_layer, n_head = len(att), att[0].shape[1]
    labels = [{"\n": "⏎", " ": "␣"}.get(c, c) for c in chars]
    fig, axes = plt.subplots(n_layer, n_head, figsize=(3.2 * n_head, 3.2 * n_layer), squeeze=False)
    for l in range(n_layer):
        for h in range(n_head):
            ax = axes[l][h]
            ax.imshow(att[l][0, h], cmap="viridis", vmin=0, vmax=1)    # (T, T): query rows, key columns
            ax.set_title(f"layer {l}, head {h}", fontsize=9)
            ax.set_xticks(range(len(chars)), labels, fontsize=6)
            ax.set_yticks(range(len(chars)), labels, fontsize=6)
    fig.suptitle("attention weights: row = query character, column = key character")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shakespeare", help="shakespeare (default), python-stdlib or a .txt")
    p.add_argument("--steps", type=int, default=600, help="training steps before drawing (0: untrained)")
    p.add_argument("--prompt", default="ROMEO:\nBut soft, what light", help="the characters to look at")
    p.add_argument("--out", default="out/attention", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tinygpt.manual_seed(1337)

    text = data.load_text(args.data)
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    cfg = models.GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = models.GPT(cfg)
    print(f"{model.num_parameters() / 1e3:.0f}K parameters, {args.steps} steps")
    if args.steps > 0:
        train(model, ids, args.steps, batch_size=32, lr=3e-3)

    prompt = "".join(c for c in args.prompt if c in tok.stoi)[-cfg.block_size:] or text[:16]
    model.eval()
    with tinygpt.no_grad(), viz.capture_attention(model) as att:   # att[layer]: (1, n_head, T, T)
        model([tok.encode(prompt)])
    last = att[cfg.n_layer - 1][0, :, -1]                            # last layer, last query: (n_head, T)
    for h, row in enumerate(last):
        top = np.argsort(row)[::-1][:3]
        print(f"last layer, head {h}: the final {prompt[-1]!r} looks most at "
              + ", ".join(f"{prompt[j]!r}@{j} ({row[j]:.2f})" for j in top))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed (pip install 'tinygpt[plot]'): no PNG")
        return
    path = out / "attention_map.png"
    show(prompt, att, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
