"""Draw the autograd graph: micrograd's expression on 0-d tensors, then a 1-layer GPT's loss.

    python examples/draw_graph.py                  # writes out/graph/*.dot, and *.svg with a renderer
    python examples/draw_graph.py --out /tmp/g     # elsewhere

Each op node is one Function (the class that computed it), each blue box a leaf: a number you made, or a
parameter named as in model.named_parameters(). Rendering needs Graphviz's `dot` or `pip install
'tinygpt[viz]'`; without one the .dot files still open in any Graphviz viewer.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tinygpt  # noqa: E402
from tinygpt import models, viz  # noqa: E402


def expression():
    """micrograd's README example: L = (a*b + c) * f, every value a 0-d tensor."""
    a = tinygpt.tensor(2.0, requires_grad=True)
    b = tinygpt.tensor(-3.0, requires_grad=True)
    c = tinygpt.tensor(10.0, requires_grad=True)
    e = a * b
    d = e + c
    f = tinygpt.tensor(-2.0, requires_grad=True)
    L = d * f
    for t in (e, d, L):
        t.retain_grad()                     # keep the gradients of the intermediate values too
    L.backward(retain_graph=True)           # retain_graph: the graph is still there to draw
    return L, dict(a=a, b=b, c=c, d=d, e=e, f=f, L=L)


def gpt_loss():
    """A 1-layer, 2-head GPT on 8 random tokens: its mean cross-entropy and the model."""
    tinygpt.manual_seed(0)
    model = models.GPT(models.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = np.random.default_rng(0).integers(0, 16, (1, 9))
    _, loss = model(idx[:, :-1], idx[:, 1:])             # predict each next token
    loss.backward(retain_graph=True)
    return loss, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/graph", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    L, names = expression()
    print(f"L = {L.item():.1f}; dL/da = {names['a'].grad.item():.1f} (micrograd: -8.0 and 6.0)")
    loss, model = gpt_loss()
    dot = viz.to_dot(loss)
    print(f"1-layer GPT loss {loss.item():.4f}; its graph: {dot.count('label=')} nodes, {dot.count(' -> ')} edges")

    renderer = viz.available_renderer("svg")
    for name, tensor, params, rankdir in (("expression", L, names, "LR"), ("gpt_loss", loss, model, "TB")):
        dot = viz.to_dot(tensor, params=params, stats=True, rankdir=rankdir)
        (out / f"{name}.dot").write_text(dot)
        print("wrote", out / f"{name}.dot")
        if renderer:
            print("wrote", viz.render(dot, out / f"{name}.svg"), f"({renderer})")
    if not renderer:
        print("no Graphviz renderer: pip install 'tinygpt[viz]' (or install Graphviz) to get SVGs")


if __name__ == "__main__":
    main()
