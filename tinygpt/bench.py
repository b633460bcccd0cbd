"""`tinygpt bench`: time training steps, and race PyTorch eager on the same model in the same process.

    tinygpt bench --preset cpu --batch-size 32            # the cpu-size GPT, tinygpt vs torch
    tinygpt bench --preset video --batch-size 8 --json
    tinygpt bench --preset cpu --memory-trace 1000        # RSS over 1,000 steps (is it flat?)
    tinygpt bench --generate                              # KV-cached vs uncached sampling
    tinygpt bench --plain                                 # a learner's own loop: one process, no DataParallel
    tinygpt bench --op-overhead                           # µs per small op (16x16 add), vs torch and NumPy

A step is forward, backward, gradient clipping at 1.0 and AdamW (decay on 2-D weights), on a fixed
random batch. The two frameworks run in alternating rounds, so a noisy machine slows both alike; each
reports the median of its steps. FLOPs per step count the matmuls: 6 per weight per token for the
linear layers (forward 2, backward 4) and 12·L·T·C per token for attention's q·kᵀ and p·v. MFU is the
achieved rate over this device's measured float32 matmul rate. Peak memory is each framework's own
process's peak RSS on the CPU (measured in a child process each). On CUDA it is the most bytes each
framework's arrays held at once over two extra steps: CuPy's pool in use (not cached), read by a memory hook
at every allocation (backend.peak_device_bytes), and torch's max_memory_allocated after
reset_peak_memory_stats; the matmul-rate probe's 512 MiB is freed before either.

--plain times the loop a learner writes: `_, loss = model(x, y)`, `opt.zero_grad()`, `loss.backward()`,
`opt.step()` with a plain AdamW, in this one process (no DataParallel, no clipping), at the preset's size
with the lecture's choices (ReLU, biases, an untied head); both frameworks get the same threads (tinygpt's
thread team, torch.set_num_threads). `--workers 1` is close to it but not the same: it keeps the clipping
and the decay groups of `tinygpt train`, on the preset's GELU/tied model. Every race also reports the ratio
of each round (the rounds alternate which framework goes first): its median and range, which a loaded
machine biases less than it does the medians of the steps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

import tinygpt
from tinygpt import backend, cpu_linear, cpu_threads, optim
from tinygpt.models import GPT, GPTConfig
from tinygpt.presets import get_preset
from tinygpt.parallel import DataParallel
from tinygpt.settings import OneOf, Range, add_flags, check_fields, setting

_DEFAULTS = {"cpu": (32, 30), "video": (8, 10)}      # preset -> (batch size, steps)


@dataclass
class BenchSettings:
    """The options of `tinygpt bench`, one flag each (settings.add_flags), checked as train's are."""
    preset: str = setting("cpu", "model size", OneOf(*_DEFAULTS))
    device: str | None = setting(None, "cpu or cuda", default_help="$TINYGPT_DEVICE or cpu")
    batch_size: int | None = setting(None, "sequences per step", Range(1),
                                     default_help="32 for cpu, 8 for video")
    steps: int | None = setting(None, "timed steps per framework", Range(1),
                                default_help="30 for cpu, 10 for video")
    rounds: int = setting(5, "alternations of tinygpt and torch (with --generate: of cached and uncached, "
                             "at most 3)", Range(1))
    workers: int | None = setting(None, "CPU processes that share each batch (see tinygpt.parallel)", Range(1),
                                  default_help="one per core")
    no_torch: bool = setting(False, "time tinygpt alone", switch=True)
    no_memory: bool = setting(False, "skip the peak-RSS child processes", switch=True)
    memory_trace: int = setting(0, "instead: train N steps and report the RSS growth (0: off)", Range(0),
                                metavar="N")
    generate: bool = setting(False, "instead: tokens/s of generate() with and without the KV cache",
                             switch=True)
    plain: bool = setting(False, "the plain loop of a learner's script: model(x, y), zero_grad, backward, "
                                 "AdamW.step in this one process (no DataParallel, no clipping), ReLU, "
                                 "biases, untied head", switch=True)
    op_overhead: bool = setting(False, "instead: microseconds per small op (a + b on two 16x16 tensors "
                                       "with grad, forward and forward + backward) against torch and NumPy",
                                switch=True)
    json: bool = setting(False, "print one JSON object", switch=True)

    def __post_init__(self) -> None:
        check_fields(self)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """BenchSettings' flags, and the hidden --_child of the peak-RSS child processes."""
    add_flags(p, BenchSettings)
    p.add_argument("--_child", default=None, choices=("tinygpt", "torch"), help=argparse.SUPPRESS)


def model_config(preset: str) -> GPTConfig:
    """The preset's GPT shape, for the 65-symbol Shakespeare vocabulary."""
    if preset not in _DEFAULTS:
        raise ValueError(f"bench: --preset must be one of {', '.join(_DEFAULTS)}, got {preset!r}")
    d = get_preset(preset).model_config(65)
    d.pop("model")
    return GPTConfig(**d)


def plain_config(preset: str) -> GPTConfig:
    """The preset's shape with the lecture's choices (--plain): ReLU, biases, an untied head."""
    return dataclasses.replace(model_config(preset), activation="relu", bias=True, tie_weights=False)


def flops_per_step(config: GPTConfig, batch_size: int) -> float:
    """Matmul FLOPs of one training step (forward + backward)."""
    C, L, T, V = config.n_embd, config.n_layer, config.block_size, config.vocab_size
    linear_weights = L * (C * 3 * C + C * C + 2 * C * 4 * C) + C * V   # c_attn, c_proj, mlp, lm_head
    return batch_size * T * (6 * linear_weights + 12 * L * T * C)


def matmul_peak_gflops(device: str) -> float:
    """The best float32 n×n matmul rate seen on this device (n = 2048 CPU, 8192 CUDA). On the CPU the product
    goes through tinygpt's thread team, as a training step's GEMMs do (tinygpt/cpu_linear.py)."""
    xp = backend.get_device(device).xp
    n = 8192 if device == "cuda" else 2048
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    best = float("inf")
    for _ in range(5):
        backend.synchronize(device)
        t0 = time.perf_counter()
        cpu_linear.matmul(a, a) if device == "cpu" else a @ a
        backend.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del a
    if device == "cuda":                  # the probe's 2 × 256 MiB leave the pool: no one's peak holds them
        xp.get_default_memory_pool().free_all_blocks()
    return 2 * n ** 3 / best / 1e9


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits: a 0.4 ms GPU step stays 0.4123, not 0.41."""
    return float(f"{x:.{digits}g}")


def _setup(preset: str, batch_size: int, device: str, workers: int | None = None, plain: bool = False) -> tuple:
    """Our model, optimizer and batch, plus everything torch needs to mirror them."""
    backend.tune_allocator()                                      # as the trainer does
    config = plain_config(preset) if plain else model_config(preset)
    p = get_preset(preset)
    tinygpt.manual_seed(0)
    model = GPT(config, device=device)
    model.train()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (batch_size, config.block_size))
    tgt = rng.integers(0, config.vocab_size, (batch_size, config.block_size))
    hyper = dict(lr=p.lr, weight_decay=p.weight_decay, betas=(p.beta1, p.beta2))
    x = tinygpt.tensor(idx, device=device)
    y = tinygpt.tensor(tgt, device=device)
    if plain:                                       # the loop of a learner's script, as it is written
        opt = optim.AdamW(model.parameters(), **hyper)

        def plain_step():
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        return config, model, plain_step, (idx, tgt), hyper
    opt = optim.AdamW(optim.weight_decay_groups(model, p.weight_decay), lr=p.lr, betas=hyper["betas"])
    dp = DataParallel(model, workers) if device == "cpu" else None

    def step():
        opt.zero_grad()
        if dp is not None:
            loss = dp.forward_backward(x, y)
        else:
            _, loss = model(x, y)
            loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return config, model, step, (idx, tgt), hyper


def _torch_step(config, model, batch, hyper, device, plain: bool = False) -> Callable:
    """torch's training step on a copy of `model` (same weights, same batch, same AdamW settings)."""
    from tinygpt import bench_torch
    tmodel = bench_torch.build(config, model.state_dict(), device)
    tmodel.train()
    return bench_torch.make_step(tmodel, *batch, **hyper, plain=plain)


def _same_threads(n: int, with_torch: bool = True):
    """A `with` block in which tinygpt's thread team and (with_torch) torch's intra-op pool use n threads.
    NumPy's BLAS stays on one thread: tinygpt's GEMMs are shared out by its team (tinygpt/cpu_threads.py)."""
    stack = contextlib.ExitStack()
    old = cpu_threads.set_num_threads(n)
    stack.callback(cpu_threads.set_num_threads, old)
    if cpu_threads.team() is None:                 # one thread: no team to put BLAS on one thread
        limiter = cpu_threads.blas_single_thread()
        if limiter is not None:
            stack.callback(limiter.restore_original_limits)
    if with_torch:
        try:
            from tinygpt import bench_torch
            stack.callback(bench_torch.set_num_threads, bench_torch.set_num_threads(n))
        except ImportError:
            pass
    return stack


def _timed(step: Callable, n: int, sync: Callable[[], None]) -> list:
    """Seconds of each of n calls of step(), the device synchronized before and after each."""
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _our_pids() -> list:
    """This process and its data-parallel workers (tinygpt.parallel): their memory counts as ours."""
    return ["self"] + [p.pid for p in multiprocessing.active_children()]


def _rss_mb() -> float:
    """Current resident set size in MiB, summed over _our_pids() (Linux /proc; 0 elsewhere). Pages the
    processes share (NumPy's code, the shared weights) are counted once per process: an upper bound."""
    total = 0.0
    for pid in _our_pids():
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except OSError:
            pass
    return total


def _peak_rss_mb() -> float:
    """Peak RSS in MiB, summed over _our_pids() like _rss_mb. Linux's VmHWM, not ru_maxrss: a child
    started by fork + exec inherits its parent's ru_maxrss, which would hide the child's own peak."""
    total, found = 0.0, False
    for pid in _our_pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024          # kB
                        found = True
        except OSError:
            pass
    if found:
        return total
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


def _child_peak_rss(framework: str, preset: str, batch_size: int, device: str,
                    plain: bool = False) -> float | None:
    """Peak RSS of a fresh process that does 5 training steps with `framework` alone."""
    cmd = [sys.executable, "-m", "tinygpt.bench", "--_child", framework, "--preset", preset,
           "--batch-size", str(batch_size), "--device", device] + (["--plain"] if plain else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return None
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _child(args: argparse.Namespace) -> int:
    """The peak-RSS child process: 5 steps of one framework, then {"peak_rss_mb": ...} on stdout."""
    workers = 1 if args._child == "torch" else args.workers       # torch's process: no idle worker in it
    plain = getattr(args, "plain", False)
    config, model, step, batch, hyper = _setup(args.preset, args.batch_size, args.device, workers, plain)
    if args._child == "torch":
        step = _torch_step(config, model, batch, hyper, args.device, plain)
        del model
    for _ in range(5):
        step()
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))
    return 0


def _memory_trace(args, batch_size: int, device: str) -> dict:
    """Train N steps; RSS after a 10% warm-up and at the end: the graph must not leak."""
    _, _, step, _, _ = _setup(args.preset, batch_size, device, args.workers, getattr(args, "plain", False))
    n = args.memory_trace
    samples = []
    for i in range(1, n + 1):
        step()
        if i % max(1, n // 20) == 0 or i == n:
            samples.append((i, _rss_mb()))
    warm = next(rss for i, rss in samples if i >= max(1, n // 10))
    return {"mode": "memory-trace", "plain": bool(getattr(args, "plain", False)), "preset": args.preset, "device": device, "batch_size": batch_size,
            "steps": n, "rss_after_warmup_mb": round(warm, 1), "rss_end_mb": round(samples[-1][1], 1),
            "growth_pct": round(100 * (samples[-1][1] - warm) / warm, 2),
            "samples": [(i, round(r, 1)) for i, r in samples]}


def _generate(args, device: str) -> dict:
    """Sample 255 tokens after a 1-token prompt (so the context reaches 256) with and without the cache, in
    alternating rounds (up to 3; a noisy second of the ~1 s cached run moves its rate a lot); medians."""
    config = GPTConfig(**{**model_config("video").__dict__, "dropout": 0.0})
    model = GPT(config, device=device)
    rounds = max(1, min(args.rounds, 3))
    result = {"mode": "generate", "device": device, "context": config.block_size, "rounds": rounds}
    rates: dict[bool, list] = {True: [], False: []}
    identical = True
    for _ in range(rounds):
        outputs = {}
        for use_cache in (True, False):
            tinygpt.manual_seed(7)
            t0 = time.perf_counter()
            out = model.generate([[0]], config.block_size - 1, use_cache=use_cache)
            rates[use_cache].append((config.block_size - 1) / (time.perf_counter() - t0))
            outputs[use_cache] = out.numpy()
        identical = identical and bool(np.array_equal(outputs[True], outputs[False]))
    result["tokens_per_s_cached"] = round(statistics.median(rates[True]), 1)
    result["tokens_per_s_uncached"] = round(statistics.median(rates[False]), 1)
    result["speedup"] = round(result["tokens_per_s_cached"] / result["tokens_per_s_uncached"], 2)
    result["identical_tokens"] = identical
    return result


def run(args: argparse.Namespace) -> int:
    """Run the benchmark that `args` (BenchSettings' flags) asks for and print its report; returns 0."""
    BenchSettings(**{f.name: getattr(args, f.name, f.default) for f in fields(BenchSettings)})  # ConfigError
    device = backend.get_device(args.device).name
    preset = args.preset
    bs_default, steps_default = _DEFAULTS[preset]
    batch_size = args.batch_size or bs_default
    steps = args.steps or steps_default
    args.batch_size, args.device = batch_size, device
    if getattr(args, "_child", None):
        return _child(args)
    if getattr(args, "memory_trace", 0):
        return _report(_memory_trace(args, batch_size, device), args.json)
    if getattr(args, "generate", False):
        return _report(_generate(args, device), args.json)
    if getattr(args, "op_overhead", False):
        return _report(_op_overhead(args), args.json)
    plain = getattr(args, "plain", False)
    if plain and device == "cpu":                 # one process: both frameworks get the same threads
        threads = cpu_threads.num_cores()
        with _same_threads(threads, not getattr(args, "no_torch", False)):
            return _race(args, preset, batch_size, steps, device, plain, str(threads))
    return _race(args, preset, batch_size, steps, device, plain,
                 os.environ.get("TINYGPT_NUM_THREADS") or "auto")


def _race(args, preset: str, batch_size: int, steps: int, device: str, plain: bool, threads: str) -> int:
    """Time tinygpt's training step against torch's in alternating rounds and report (run's main mode)."""
    peak = matmul_peak_gflops(device)       # before _setup: data parallelism makes BLAS single-threaded
    config, model, step, batch, hyper = _setup(preset, batch_size, device, getattr(args, "workers", None), plain)
    sync = lambda: backend.synchronize(device)                    # noqa: E731
    racers: dict[str, Callable] = {"tinygpt": step}
    torch_version, torch_sync = None, sync
    if not getattr(args, "no_torch", False):
        try:
            from tinygpt import bench_torch
            torch_version = bench_torch.version()                 # ImportError without torch
            racers["torch"] = _torch_step(config, model, batch, hyper, device, plain)
            torch_sync = lambda: bench_torch.synchronize(device)  # noqa: E731
        except ImportError:
            pass
    losses = {}
    for name, s in racers.items():                                # warm-up; step 0's loss as a sanity check
        loss = s()
        losses[name] = float(loss.item())
        s()
    times: dict[str, list] = {name: [] for name in racers}
    round_ratios = []                                             # torch's median step / tinygpt's, per round
    rounds = max(1, min(args.rounds, steps))
    per_round = -(-steps // rounds)
    for r in range(rounds):
        order = list(racers) if r % 2 == 0 else list(racers)[::-1]    # who goes first alternates
        this_round = {}
        for name in order:
            this_round[name] = _timed(racers[name], per_round, sync if name == "tinygpt" else torch_sync)
            times[name] += this_round[name]
        if "torch" in this_round:
            round_ratios.append(statistics.median(this_round["torch"]) / statistics.median(this_round["tinygpt"]))
    tokens = batch_size * config.block_size
    flops = flops_per_step(config, batch_size)
    result: dict[str, Any] = {
        "mode": "plain" if plain else "train", "preset": preset, "device": device, "batch_size": batch_size,
        "block_size": config.block_size, "n_params": model.num_parameters(), "steps": len(times["tinygpt"]),
        "rounds": rounds, "threads": threads, "matmul_peak_gflops": round(peak, 1),
        "torch": torch_version, "first_loss": {k: round(v, 5) for k, v in losses.items()}}
    if device == "cpu":                               # the GEMMs' speed depends on it (see blas_info)
        result["blas"] = cpu_threads.blas_info()
    if plain:
        result["model"] = "relu, biases, untied head; plain AdamW, no clipping, no DataParallel"
    ms_of = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    for name, ms in ms_of.items():                    # significant digits: a fast step keeps its precision
        result[name] = {"ms_per_step": _sig(ms), "tokens_per_s": round(tokens / ms * 1000, 1),
                        "gflops": _sig(flops / ms / 1e6), "mfu": _sig(flops / ms / 1e6 / peak, 3)}
    if "torch" in times:
        result["speed_ratio_vs_torch"] = _sig(ms_of["torch"] / ms_of["tinygpt"])
        result["round_ratios"] = _spread(round_ratios)
    if device == "cuda":                              # two more steps each, under the peak trackers
        two_steps = lambda s: lambda: [s() for _ in range(2)]                  # noqa: E731
        result["tinygpt"]["peak_mem_mb"] = round(backend.peak_device_bytes(two_steps(step), device) / 2 ** 20, 1)
        if "torch" in times:
            from tinygpt import bench_torch
            result["torch"]["peak_mem_mb"] = round(
                bench_torch.peak_memory_bytes(device, two_steps(racers["torch"])) / 2 ** 20, 1)
    elif not getattr(args, "no_memory", False):
        for name in times:
            rss = _child_peak_rss(name, preset, batch_size, device, plain)
            result[name]["peak_rss_mb"] = None if rss is None else round(rss, 1)
    return _report(result, args.json)


def _spread(xs: list) -> dict:
    """{"median", "min", "max"} of xs (4 significant digits each)."""
    return {"median": _sig(statistics.median(xs)), "min": _sig(min(xs)), "max": _sig(max(xs))}


def _op_overhead(args, calls: int = 2000) -> dict:
    """Microseconds per call of one small op: c = a + b with a, b 16x16 float32 tensors that require grad,
    forward alone, and forward + c.backward(g) with the grads set to None first (as zero_grad does). Against
    torch (when installed) and a bare NumPy a + b. Rounds interleave the frameworks (`calls` calls each, timed
    as one block); medians and ranges of the per-call times over the rounds."""
    rng = np.random.default_rng(0)
    an, bn = (rng.standard_normal((16, 16), dtype=np.float32) for _ in range(2))
    gn = np.ones((16, 16), dtype=np.float32)
    a, b = (tinygpt.tensor(v, requires_grad=True) for v in (an, bn))
    g = tinygpt.tensor(gn)

    def tg_fb():
        a.grad = b.grad = None
        (a + b).backward(g)

    cases: dict[str, Callable] = {"numpy_forward": lambda: an + bn, "tinygpt_forward": lambda: a + b,
                                  "tinygpt_forward_backward": tg_fb}
    torch_version = None
    if not getattr(args, "no_torch", False):
        try:
            from tinygpt import bench_torch
            torch_version = bench_torch.version()
            cases["torch_forward"], cases["torch_forward_backward"] = bench_torch.add_op_cases(an, bn, gn)
        except ImportError:
            pass
    us: dict[str, list] = {name: [] for name in cases}
    for f in cases.values():                                  # warm-up
        for _ in range(100):
            f()
    rounds = max(1, args.rounds)
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            f = cases[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            us[name].append((time.perf_counter() - t0) / calls * 1e6)
    result: dict[str, Any] = {"mode": "op-overhead", "op": "a + b, 16x16 float32, requires_grad",
                              "calls_per_round": calls, "rounds": rounds, "torch": torch_version}
    result.update({f"{name}_us": _spread(ts) for name, ts in us.items()})
    med = {name: statistics.median(ts) for name, ts in us.items()}
    # tinygpt's time over the other's (below 1: tinygpt is faster)
    result["time_ratio_forward_vs_numpy"] = _sig(med["tinygpt_forward"] / med["numpy_forward"], 3)
    if "torch_forward" in med:
        result["time_ratio_forward_vs_torch"] = _sig(med["tinygpt_forward"] / med["torch_forward"], 3)
        result["time_ratio_forward_backward_vs_torch"] = _sig(
            med["tinygpt_forward_backward"] / med["torch_forward_backward"], 3)
    return result


def _report(result: dict, as_json: bool) -> int:
    """Print the result as one JSON object or as aligned "key: value" lines; returns 0."""
    if as_json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key:>22}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tinygpt.bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
