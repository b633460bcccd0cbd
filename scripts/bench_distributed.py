"""Step time of data parallelism over MPI ranks at a fixed global batch: 1 process against N ranks.

    python scripts/bench_distributed.py --preset cpu --steps 20            # 1 process, no MPI
    mpiexec -n 2 python scripts/bench_distributed.py --preset cpu --steps 20
    python scripts/bench_distributed.py --preset cpu --steps 20 --workers 2   # for comparison: the forked
                                                                              # DataParallel of one box

A step is what `tinygpt train` does: forward and backward on this rank's rows of the global batch (all of
it for 1 process), the gradient all-reduce (DistributedDataParallel.sync; none for 1 process), clipping at
1.0 and AdamW. The model and batch sizes are `tinygpt bench`'s: the cpu preset's GPT (4/4/128, block 64)
at batch 32, the video preset's (6/6/384, block 256, dropout 0.2, ReLU) at batch 8; vocabulary 65.

To show the all-reduce alone, the benchmark (not the trainer) puts a barrier before it: `wait` is the time
ranks spend waiting for the slowest one (load imbalance, a noisy machine), `allreduce` the transfer itself.
Rank 0 prints one JSON object with the median of each part over the timed steps (after 2 warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import tinygpt
from tinygpt import backend, distributed, optim
from tinygpt.models import GPT, GPTConfig
from tinygpt.parallel import DataParallel
from tinygpt.presets import get_preset

SIZES = {"cpu": 32, "video": 8}          # preset -> global batch (as `tinygpt bench`)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=SIZES, default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="without MPI: DataParallel's processes")
    args = ap.parse_args()

    world = distributed.init()
    backend.tune_allocator()
    s = get_preset(args.preset)
    B, T = args.batch_size or SIZES[args.preset], s.block_size
    tinygpt.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, **s.gpt_fields()))
    opt = optim.AdamW(optim.weight_decay_groups(model, s.weight_decay), lr=s.lr)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 65, (B, T)) for _ in range(2))
    ddp = distributed.DistributedDataParallel(model, world) if world.world_size > 1 else None
    dp = DataParallel(model, args.workers) if ddp is None and args.workers > 1 else None
    parts = {"compute": [], "wait": [], "allreduce": [], "optimizer": [], "step": []}
    loss = None
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        if dp is not None:
            share = dp.forward_backward(x, y)
        elif ddp is None:
            _, l = model(tinygpt.tensor(x), tinygpt.tensor(y))
            l.backward()
            share = l.data
        else:
            share = ddp.forward_backward(x, y)
        t1 = time.perf_counter()
        if ddp is not None:
            world.comm.Barrier()
        t2 = time.perf_counter()
        loss = ddp.sync(share) if ddp is not None else share
        t3 = time.perf_counter()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        t4 = time.perf_counter()
        if i >= 2:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                v_ms = 1000 * v
                parts[k].append(v_ms)
    if world.is_main:
        med = {k: round(statistics.median(v), 2) for k, v in parts.items()}
        n_params = model.num_parameters()
        print(json.dumps({"preset": args.preset, "ranks": world.world_size, "workers": args.workers,
                          "batch": B, "block": T,
                          "parameters": n_params, "gradient_MB": round(4 * n_params / 1e6, 1),
                          "steps": args.steps, "median_ms": med,
                          "tokens_per_s": round(B * T / (med["step"] / 1000)), "last_loss": float(loss),
                          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}))
    if dp is not None:
        dp.close()


if __name__ == "__main__":
    main()
