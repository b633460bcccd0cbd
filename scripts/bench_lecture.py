"""Training speed of the lecture's gpt.py model on tinygpt against the same code on PyTorch eager (CPU).

    python scripts/bench_lecture.py                        # n_layer 4, n_head 4, n_embd 128, block 64, batch 32
    python scripts/bench_lecture.py --batch-size 12 --rounds 7

The model is the lecture's, written once below and built twice: once with `torch, nn, F` bound to tinygpt
and once to PyTorch (per-head Head modules with their own key/query/value Linears, masked_fill + softmax,
torch.cat of the heads, ReLU, dropout 0). It is not tinygpt's fused GPT (tinygpt.models), so this measures
what a learner's script gets, one process, no data parallelism. Both start from the same weights (tinygpt's
init, loaded into torch) and train on the same batches with AdamW; their first losses must agree.

Each framework gets 2 threads (torch.set_num_threads; tinygpt's thread team, tinygpt/cpu_threads.py). After
--warmup untimed steps each, every round runs one untimed and then --steps timed training steps (forward,
zero_grad, backward, AdamW step) of one framework, then of the other, alternating which goes first, so a slow
spell on a shared machine hits both. Blocks, not single steps: one framework's idle threads (torch's OpenMP
threads spin for a while after each step) slow the other's next step, by up to 1.6x here. Reported: tokens/s per round, the median and range of tinygpt/torch over the rounds, and
the median time of a single step. --clock cpu times CPU seconds instead of wall seconds: with
--threads 1 it is the figure a busy machine disturbs least. torch is imported here, for
the race only; tinygpt itself never imports it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout


def lecture_model(torch, nn, F, vocab_size, n_embd, n_head, n_layer, block_size, dropout):
    """The lecture's GPTLanguageModel over whichever `torch, nn, F` are passed in."""

    class Head(nn.Module):
        def __init__(self, head_size):
            super().__init__()
            self.key = nn.Linear(n_embd, head_size, bias=False)
            self.query = nn.Linear(n_embd, head_size, bias=False)
            self.value = nn.Linear(n_embd, head_size, bias=False)
            self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.shape
            k = self.key(x)
            q = self.query(x)
            wei = q @ k.transpose(-2, -1) * k.shape[-1]**-0.5
            wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))
            wei = F.softmax(wei, dim=-1)
            wei = self.dropout(wei)
            v = self.value(x)
            return wei @ v

    class MultiHeadAttention(nn.Module):
        def __init__(self, num_heads, head_size):
            super().__init__()
            self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
            self.proj = nn.Linear(head_size * num_heads, n_embd)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            out = torch.cat([h(x) for h in self.heads], dim=-1)
            return self.dropout(self.proj(out))

    class FeedForward(nn.Module):
        def __init__(self, n_embd):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd),
                                     nn.Dropout(dropout))

        def forward(self, x):
            return self.net(x)

    class Block(nn.Module):
        def __init__(self, n_embd, n_head):
            super().__init__()
            head_size = n_embd // n_head
            self.sa = MultiHeadAttention(n_head, head_size)
            self.ffwd = FeedForward(n_embd)
            self.ln1 = nn.LayerNorm(n_embd)
            self.ln2 = nn.LayerNorm(n_embd)

        def forward(self, x):
            x = x + self.sa(self.ln1(x))
            return x + self.ffwd(self.ln2(x))

    class GPTLanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
            self.position_embedding_table = nn.Embedding(block_size, n_embd)
            self.blocks = nn.Sequential(*[Block(n_embd, n_head=n_head) for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab_size)
            self.apply(self._init_weights)

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            B, T = idx.shape
            x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
            logits = self.lm_head(self.ln_f(self.blocks(x)))
            B, T, C = logits.shape
            return F.cross_entropy(logits.view(B * T, C), targets.view(B * T))

    return GPTLanguageModel()


def make_trainers(args, batches):
    """(name -> step function), the first losses of each, from one set of initial weights."""
    import torch as real_torch
    import tinygpt
    import tinygpt.cpu_threads

    real_torch.set_num_threads(args.threads)
    tinygpt.cpu_threads.set_num_threads(args.threads)     # tinygpt's thread team (BLAS runs on one of them)
    cfg = dict(vocab_size=65, n_embd=args.n_embd, n_head=args.n_head, n_layer=args.n_layer,
               block_size=args.block_size, dropout=0.0)
    tinygpt.manual_seed(1337)
    ours = lecture_model(tinygpt, tinygpt.nn, tinygpt.nn.functional, **cfg)
    theirs = lecture_model(real_torch, real_torch.nn, real_torch.nn.functional, **cfg)
    theirs.load_state_dict({k: real_torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    opts = {"tinygpt": tinygpt.optim.AdamW(ours.parameters(), lr=args.lr),
            "torch": real_torch.optim.AdamW(theirs.parameters(), lr=args.lr)}
    data = {"tinygpt": [(tinygpt.tensor(x), tinygpt.tensor(y)) for x, y in batches],
            "torch": [(real_torch.from_numpy(x), real_torch.from_numpy(y)) for x, y in batches]}
    models = {"tinygpt": ours, "torch": theirs}

    def trainer(name):
        model, opt, rows = models[name], opts[name], data[name]
        state = {"i": 0}

        def step():
            x, y = rows[state["i"] % len(rows)]
            state["i"] += 1
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        return step

    steps = {name: trainer(name) for name in models}
    first = {name: steps[name]() for name in models}      # the same weights and batch: the same loss
    if abs(first["tinygpt"] - first["torch"]) > 1e-3:
        raise SystemExit(f"first losses differ: tinygpt {first['tinygpt']:.5f}, torch {first['torch']:.5f}")
    return steps, first, real_torch.__version__


def blas_limit(threads):
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=threads, user_api="blas")
    except ImportError:                     # tinygpt installs it; without it BLAS keeps its own default
        import contextlib
        return contextlib.nullcontext()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter (the default); cpu: the process's CPU time, which a busy shared "
                        "machine disturbs far less (use it with --threads 1: idle threads spinning count too)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    import tinygpt.cpu_threads
    from tinygpt.data import shakespeare_text
    text = shakespeare_text()
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    rng = np.random.default_rng(0)
    T, B = args.block_size, args.batch_size
    batches = []
    for _ in range(16):
        ix = rng.integers(0, len(ids) - T - 1, B)
        batches.append((np.stack([ids[i:i + T] for i in ix]), np.stack([ids[i + 1:i + T + 1] for i in ix])))

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    with blas_limit(args.threads):
        steps, first, torch_version = make_trainers(args, batches)
        for name in steps:
            for _ in range(args.warmup):
                steps[name]()
        tokens = args.steps * B * T
        rounds, step_times = [], {"tinygpt": [], "torch": []}
        for r in range(args.rounds):
            spent = {"tinygpt": 0.0, "torch": 0.0}
            # a block of steps per framework, alternating which goes first; the block's first step is not
            # timed: the other framework's idle threads may still be spinning (torch's OpenMP threads for
            # a while after each step, by default), which measured 0.62-1.41x for the same code when the
            # frameworks alternated step by step
            for name in (["tinygpt", "torch"] if r % 2 == 0 else ["torch", "tinygpt"]):
                steps[name]()
                for i in range(args.steps):
                    t0 = clock()
                    steps[name]()
                    dt = clock() - t0
                    spent[name] += dt
                    step_times[name].append(dt)
            rate = {name: tokens / spent[name] for name in spent}
            rounds.append(rate)
            if not args.json:
                print(f"round {r + 1}: tinygpt {rate['tinygpt']:8.0f} tok/s, torch {rate['torch']:8.0f} tok/s, "
                      f"ratio {rate['tinygpt'] / rate['torch']:.3f}", flush=True)

    ratios = [r["tinygpt"] / r["torch"] for r in rounds]
    result = {
        "config": {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                  "threads", "rounds", "steps", "warmup", "clock")},
        "first_loss": first,
        "tokens_per_s": {name: {"median": statistics.median(r[name] for r in rounds),
                                "min": min(r[name] for r in rounds), "max": max(r[name] for r in rounds)}
                         for name in ("tinygpt", "torch")},
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "median_step_ms": {name: 1000 * statistics.median(v) for name, v in step_times.items()},
        "rounds": rounds,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch_version,
                    "blas": tinygpt.cpu_threads.blas_info()},    # the GEMMs' kernels (Haswell: AVX2)
        "date": datetime.date.today().isoformat(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tp = result["tokens_per_s"]
    ms = {name: 1000 * B * T / tp[name]["median"] for name in tp}
    print(f"lecture gpt.py model: n_layer {args.n_layer}, n_head {args.n_head}, n_embd {args.n_embd}, "
          f"block {T}, batch {B}, dropout 0, AdamW; {args.threads} threads each; {args.clock} clock")
    print(f"first loss (same weights, same batch): tinygpt {first['tinygpt']:.4f}, torch {first['torch']:.4f}")
    for name in ("tinygpt", "torch"):
        print(f"{name:8s} median {tp[name]['median']:8.0f} tok/s ({ms[name]:.1f} ms/step), "
              f"range {tp[name]['min']:.0f}-{tp[name]['max']:.0f}")
    print(f"tinygpt / torch: median {result['ratio']['median']:.3f}, range {result['ratio']['min']:.3f}-"
          f"{result['ratio']['max']:.3f} over {args.rounds} rounds of {args.steps} steps; median single step: "
          f"tinygpt {result['median_step_ms']['tinygpt']:.1f} ms, torch {result['median_step_ms']['torch']:.1f} ms")
    blas = result["machine"]["blas"]
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; numpy "
          f"{np.__version__} ({blas.get('library')} {blas.get('kernels')} kernels"
          f"{', forced by ' + blas['forced_by'] if 'forced_by' in blas else ''}), torch {torch_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
