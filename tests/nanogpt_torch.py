"""nanoGPT in PyTorch, condensed: the independent reference that tinygpt's GPT is tested against, and a
script that re-runs nanoGPT's README CPU run with torch's own random streams.

    from nanogpt_torch import torch_gpt            # in tests: model.py's GPT for a tinygpt GPTConfig

    python tests/nanogpt_torch.py train --seed 1337 --save /tmp/nanogpt_1337.npz
    python tests/nanogpt_torch.py evaluate /tmp/nanogpt_1337.npz /tmp/acc_cpu

`train` is nanoGPT's train.py with config/train_shakespeare_char.py and the README's CPU overrides
(--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0 --eval_iters=20): torch.manual_seed(seed); the modules built in model.py's order, then
_init_weights; training batches from torch.randint, interleaved with the evaluation's; SDPA attention; AdamW
(betas 0.9/0.99, decay 0.1 on tensors with dim >= 2); clipping at 1.0; warmup 100 then cosine to 1e-4. On
PyTorch 2.13 (CPU, one thread) seed 1337 ends on the line nanoGPT's users publish for this command:
"step 2000: train loss 1.7648, val loss 1.8857".

`evaluate` scores weights (a .npz with nanoGPT names from `train`, or a tinygpt out_dir's ckpt_last) with
tinygpt's forward on the same N batches per split for every run (default 200, default_rng([424242, 0, split]))
and prints the means and their standard errors: one yardstick for runs of either framework and any seed,
without the 20-batch evaluation's noise (standard error ~0.015).

Both read the packaged Tiny Shakespeare; `train` needs PyTorch (tests only, never tinygpt).
"""
import argparse
import math
import sys

import numpy as np

import tinygpt.data
from tinygpt.models import GPTConfig

CPU_RUN = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
EVAL_SEED = 424242


def torch_gpt(torch, cfg: GPTConfig, sdpa: bool = False):
    """nanoGPT's model.py, condensed: the independent reference. Modules are built in model.py's order, so
    torch's default inits draw from the generator as nanoGPT's do. sdpa=True computes attention with
    F.scaled_dot_product_attention, as nanoGPT does on PyTorch 2; False writes the masked softmax out."""
    tnn, tF = torch.nn, torch.nn.functional

    class LayerNorm(tnn.Module):
        def __init__(self, n, bias):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(n))
            self.bias = tnn.Parameter(torch.zeros(n)) if bias else None

        def forward(self, x):
            return tF.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class Attn(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = tnn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.attn_bias)
            self.c_proj = tnn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            if sdpa:
                y = tF.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                y = tF.softmax(att, dim=-1) @ v
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = tnn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
            self.act = tnn.GELU() if cfg.activation == "gelu" else tnn.ReLU()
            self.c_proj = tnn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = LayerNorm(cfg.n_embd, cfg.bias), Attn()
            self.ln_2, self.mlp = LayerNorm(cfg.n_embd, cfg.bias), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = tnn.ModuleDict(dict(
                wte=tnn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=tnn.Embedding(cfg.block_size, cfg.n_embd),
                h=tnn.ModuleList([Block() for _ in range(cfg.n_layer)]), ln_f=LayerNorm(cfg.n_embd, cfg.bias)))
            self.lm_head = tnn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias and not cfg.tie_weights)
            if cfg.tie_weights:
                self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, tF.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    return TorchGPT()


def init_like_nanogpt(torch, model, n_layer: int) -> None:
    """model.py's `self.apply(self._init_weights)` and the scaled init of every c_proj.weight, in its order."""
    def init(m):
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    model.apply(init)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def shakespeare_ids():
    """data/shakespeare_char/prepare.py: sorted characters as the vocabulary, first 90% train, the rest val.
    Returns (vocabulary, train ids, val ids)."""
    text = tinygpt.data.shakespeare_text()    # the packaged copy
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    return "".join(chars), ids[:n], ids[n:]


def train(seed: int, save: str | None, threads: int) -> None:
    try:
        import torch
    except ImportError:
        raise SystemExit("nanogpt_torch: train needs PyTorch (pip install torch)") from None
    torch.set_num_threads(threads)
    cfg, max_iters, eval_interval, eval_iters, batch_size = CPU_RUN, 2000, 250, 20, 12
    lr, min_lr, warmup, decay_iters = 1e-3, 1e-4, 100, 2000
    splits = dict(zip(("train", "val"), shakespeare_ids()[1:]))
    torch.manual_seed(seed)
    model = torch_gpt(torch, cfg, sdpa=True)
    init_like_nanogpt(torch, model, cfg.n_layer)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - cfg.block_size, (batch_size,)).numpy()
        w = torch.from_numpy(data[ix[:, None] + np.arange(cfg.block_size + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay_iters - warmup))) * (lr - min_lr)

    x, y = get_batch("train")
    for it in range(max_iters + 1):
        for group in opt.param_groups:
            group["lr"] = get_lr(it)
        if it % eval_interval == 0:
            model.eval()
            with torch.no_grad():
                mean = {s: np.mean([model(*get_batch(s))[1].item() for _ in range(eval_iters)]) for s in splits}
            model.train()
            print(f"step {it}: train loss {mean['train']:.4f}, val loss {mean['val']:.4f}", flush=True)
        if it == max_iters:          # nanoGPT takes one more step before it stops; no evaluation sees it
            break
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if save:
        np.savez(save, **{k: v.detach().numpy() for k, v in model.state_dict().items()})


def evaluate(paths: list[str], n: int) -> None:
    import tinygpt
    from tinygpt import checkpoint, data
    from tinygpt.models import GPT
    chars, *ids = shakespeare_ids()
    splits = dict(zip(("train", "val"), ids))
    for path in paths:
        if path.endswith(".npz"):
            model = GPT(CPU_RUN)
            model.load_state_dict(dict(np.load(path)), strict=True)
        else:
            model, tokenizer, _ = checkpoint.load_model(path, prefer="last")
            if tokenizer.encode(chars) != list(range(len(chars))):
                raise SystemExit(f"{path}: its tokenizer does not number the characters as prepare.py does")
        model.eval()
        out = [path]
        with tinygpt.no_grad():
            for i, (split, ids) in enumerate(splits.items()):
                rng = np.random.default_rng([EVAL_SEED, 0, i])
                losses = [model(*data.get_batch(ids, 12, model.config.block_size, rng))[1].item()
                          for _ in range(n)]
                out.append(f"{split} {np.mean(losses):.4f} ± {np.std(losses, ddof=1) / math.sqrt(n):.4f}")
        print(",  ".join(out), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="nanoGPT's README CPU run in PyTorch")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--save", help="write the final weights here (.npz, nanoGPT names)")
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evaluate", help="loss on fixed batches, for .npz weights or tinygpt out_dirs")
    e.add_argument("paths", nargs="+")
    e.add_argument("--batches", type=int, default=200)
    a = p.parse_args(argv)
    try:
        train(a.seed, a.save, a.threads) if a.cmd == "train" else evaluate(a.paths, a.batches)
    except (OSError, ValueError) as e:                  # CheckpointError is a ValueError
        raise SystemExit(f"nanogpt_torch: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
