"""The `tinygpt` command: train, sample, bench.

    tinygpt train                              # preset "speedrun" on the default corpus, checkpoints in out/
    tinygpt train --preset bigram --max-iters 3000
    tinygpt train --resume --max-iters 4000    # continue out/ckpt_last.safetensors
    tinygpt sample --out-dir out --prompt "ROMEO:" --max-new-tokens 300

Bad input (a missing corpus, an unknown preset, a damaged checkpoint, ...) prints one line on stderr,
`tinygpt: error: ...`, and exits with status 2 without a traceback and without touching existing files.
Ctrl-C, SIGTERM or SIGHUP during training saves out_dir/ckpt_last.safetensors first and exits with status
128 + the signal (130, 143, 129). A busy out-dir, a full disk, a run too big for memory, or a loss that
became nan is one line and status 2 as well.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line too (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _preset_defaults(f) -> str | None:
    """A train flag's value in each preset that has the field (the help says it: the flag defaults to None)."""
    from tinygpt.presets import PRESETS
    from tinygpt.settings import RunSettings, show

    if f.metadata["default_help"]:
        return f.metadata["default_help"]
    values = {name: show(getattr(RunSettings.from_preset(name), f.name)) for name in PRESETS
              if not (f.metadata["gpt"] and PRESETS[name].get("model") == "bigram")}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "the preset's: " + ", ".join(f"{k} {v}" for k, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    """The parser of `tinygpt train|sample|bench`; the flags come from RunSettings, SampleSettings and
    bench.BenchSettings (one per field)."""
    from tinygpt import bench
    from tinygpt.settings import RunSettings, SampleSettings, add_flags

    p = _Parser(prog="tinygpt", description="Train and sample a GPT with a hand-written autograd engine.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model (default: preset 'speedrun' on the default corpus)",
                       description="Train a model. Every option left out comes from the preset; with --resume, "
                                   "from the checkpoint.")
    add_flags(t, RunSettings, defaults=False, default_text=_preset_defaults)
    t.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Stream text from out_dir's best checkpoint (else its last one).")
    add_flags(s, SampleSettings)

    b = sub.add_parser("bench", help="time training steps (tokens/s), tinygpt against PyTorch when installed")
    bench.add_arguments(b)
    return p


def _train(args: argparse.Namespace) -> int:
    """`tinygpt train`: the flags given over the preset (or the checkpoint, with --resume); runs to max_iters."""
    from tinygpt import backend, distributed
    from tinygpt.train import RunSettings, Trainer, TrainingInterrupted

    world = distributed.init()           # under mpiexec or srun, MPI starts here; alone, nothing happens

    given = {f.name: getattr(args, f.name) for f in fields(RunSettings)
             if f.metadata["flag"] and getattr(args, f.name) is not None}
    progress = False if args.no_progress else None
    out_dir = given.pop("out_dir", "out")
    if args.resume:
        trainer = Trainer.resume(out_dir, given, progress=progress)
    else:
        given.setdefault("device", backend.default_device())
        preset = given.pop("preset", "speedrun")     # val 1.84 in ~35 s on 2 cores (BENCHMARKS.md)
        settings = RunSettings.from_preset(preset, out_dir=out_dir, **given)
        trainer = Trainer(settings, progress=progress)
    s = trainer.settings
    n = trainer.model.num_parameters()
    if world.is_main:                    # rank 0 speaks for the job (its lines, log.jsonl, checkpoints)
        print(f"tinygpt: preset {s.preset}, corpus {s.data}, {trainer.tokenizer.kind} tokenizer "
              f"(vocab {trainer.tokenizer.vocab_size}), {n:,} parameters, device {s.device}, "
              f"{'resuming at iteration ' + str(trainer.iter) if args.resume else 'out_dir ' + str(s.out_dir)}"
              f"{f', {world.world_size} ranks' if world.world_size > 1 else ''}", flush=True)
    try:
        result = trainer.run()
    except TrainingInterrupted as e:
        if world.is_main:
            sys.stderr.write(f"tinygpt: {e}\n")
        return 128 + e.signum                                 # 130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    if world.is_main:
        print(f"tinygpt: done at iteration {result.iter} in {result.elapsed_s:.1f} s, best val loss {best}; "
              f"sample with: tinygpt sample --out-dir {s.out_dir}", flush=True)
    return 0


def _sample(args: argparse.Namespace) -> int:
    """`tinygpt sample`: stream num_samples texts from out_dir's checkpoint to stdout."""
    import tinygpt
    from tinygpt import backend, checkpoint
    from tinygpt.sample import main_stream
    from tinygpt.settings import SampleSettings

    o = SampleSettings(**{f.name: getattr(args, f.name) for f in fields(SampleSettings)})      # checked
    device = backend.get_device(o.device)
    path = checkpoint.find_checkpoint(o.out_dir, o.checkpoint)
    model, tok, _ = checkpoint.load_model(path, device=device)
    if tok is None:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r} has no tokenizer, so its ids cannot be "
                                         f"turned into text")
    tok.encode(o.prompt)                                      # check the prompt before printing anything
    tinygpt.manual_seed(o.seed)
    main_stream(model, tok, o.num_samples, sys.stdout, prompt=o.prompt, max_new_tokens=o.max_new_tokens,
                temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """`tinygpt bench` (tinygpt/bench.py)."""
    from tinygpt import bench
    return int(bench.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tinygpt` console script; returns the exit status."""
    from tinygpt import backend, checkpoint, data, nn, optim, tokenizers
    from tinygpt.distributed import DistributedError, fail
    from tinygpt.models import ConfigError

    known = (data.DataError, tokenizers.TokenizerError, checkpoint.CheckpointError, ConfigError,
             backend.DeviceError, nn.StateDictError, optim.OptimizerStateError, ValueError, UnicodeDecodeError,
             NotImplementedError, OSError,    # OSError: a missing file, a read-only or full disk, ...
             DistributedError)                # no mpi4py under mpiexec, a bad $TINYGPT_COLLECTIVE_TIMEOUT
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                                   # --help (0) or a usage error (2, one line)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return {"train": _train, "sample": _sample, "bench": _bench}[args.command](args)
    except BrokenPipeError:                                   # e.g. `tinygpt sample | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0
    except known as e:                  # under mpiexec: said once, and every rank ends (distributed.fail)
        return fail(f"tinygpt: error: {' '.join(str(e).split()) or type(e).__name__}", EXIT_USAGE)
    except MemoryError:                 # what the estimate before allocating (tinygpt/memory.py) missed
        return fail("tinygpt: error: out of memory; use a smaller --batch-size, --block-size, --n-embd or "
                    "--n-layer", EXIT_USAGE)
    except KeyboardInterrupt:
        return fail("tinygpt: interrupted", EXIT_INTERRUPTED)
