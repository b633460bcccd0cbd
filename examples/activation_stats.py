"""Activation and gradient statistics per layer (makemore part 3's histograms), for the `cpu` preset's GPT
at initialisation and after a short training run.

    python examples/activation_stats.py                   # 200 steps (~1 min) -> out/stats/activation_stats.png
    python examples/activation_stats.py --steps 1000 --out /tmp/stats

For each of the 4 blocks: the histogram of its output (the residual stream), of its MLP's GELU output,
and of the gradients flowing into both; and each weight matrix's grad:data ratio (grad std / data std).
Healthy: similar spreads from layer to layer, no layer's gradients vanishing or exploding, and ratios
of the same order across weights. Needs matplotlib for the PNG (pip install 'tinygpt[plot]').
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tinygpt  # noqa: E402
from tinygpt import data, models, optim, presets, viz  # noqa: E402
from tinygpt.tokenizers import CharTokenizer  # noqa: E402


def measure(model, batch):
    """One forward and backward on `batch` under record_stats: (Recording, [ParamStats])."""
    model.zero_grad()
    with viz.record_stats(model) as rec:
        _, loss = model(*batch)
        loss.backward()
    stats = viz.param_stats(model)
    model.zero_grad()
    return rec, stats, loss.item()


def plot(snapshots, path):
    """Rows: the snapshots (init, trained); columns: the four histograms and the grad:data ratios."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("block outputs (residual stream)", "", "data"), ("block output gradients", "", "grad"),
            ("MLP GELU outputs", ".mlp.act", "data"), ("GELU output gradients", ".mlp.act", "grad")]
    fig, axes = plt.subplots(len(snapshots), len(cols) + 1, figsize=(24, 4.5 * len(snapshots)), squeeze=False)
    for row, (title, (rec, params, loss)) in zip(axes, snapshots.items()):
        n_layer = sum(1 for name in rec if name.endswith(".mlp.act"))
        for ax, (what, suffix, field) in zip(row, cols):
            for i in range(n_layer):
                s = getattr(rec[f"transformer.h.{i}{suffix}"], field)
                x, dens = s.density()
                ax.plot(x, dens, label=f"layer {i}: mean {s.mean:+.2e}, std {s.std:.2e}")
            ax.set_title(f"{title} (loss {loss:.2f}): {what}", fontsize=9)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            ax.legend(fontsize=7)
        ax = row[-1]
        names = [p.name.replace("transformer.", "") for p in params]
        ax.barh(range(len(params)), [np.log10(p.ratio) for p in params])
        ax.set_yticks(range(len(params)), names, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{title}: log10(grad std / data std) per weight", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shakespeare", help="shakespeare (default), python-stdlib or a .txt")
    p.add_argument("--steps", type=int, default=200, help="training steps between the two snapshots")
    p.add_argument("--out", default="out/stats", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tinygpt.manual_seed(1337)

    hp = presets.get_preset("cpu")                                # 4 layers, 4 heads, 128 channels, block 64
    text = data.load_text(args.data)
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    model = models.model_from_config(hp.model_config(tok.vocab_size))
    rng = np.random.default_rng(1337)
    probe = data.get_batch(ids, hp.batch_size, hp.block_size, np.random.default_rng(0))   # one fixed batch

    snapshots = {"initialisation": measure(model, probe)}
    opt = optim.AdamW(optim.weight_decay_groups(model, hp.weight_decay), lr=hp.lr, betas=(hp.beta1, hp.beta2))
    for step in range(args.steps):
        _, loss = model(*data.get_batch(ids, hp.batch_size, hp.block_size, rng))
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    snapshots[f"after {args.steps} steps"] = measure(model, probe)

    for title, (rec, params, loss) in snapshots.items():
        print(f"--- {title}: loss {loss:.4f}")
        print(rec.summary())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed (pip install 'tinygpt[plot]'): no PNG")
        return
    path = out / "activation_stats.png"
    plot(snapshots, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
