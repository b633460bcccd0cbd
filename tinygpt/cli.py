"""The `tinygpt` command: train, sample, bench.

    tinygpt train                              # preset "cpu" on the default corpus, checkpoints in out/
    tinygpt train --preset bigram --max-iters 3000
    tinygpt train --resume --max-iters 4000    # continue out/ckpt_last.safetensors
    tinygpt sample --out-dir out --prompt "ROMEO:" --max-new-tokens 300

Bad input (a missing corpus, an unknown preset, a damaged checkpoint, ...) prints one line on stderr,
`tinygpt: error: ...`, and exits with status 2 without a traceback and without touching existing files.
Ctrl-C during training saves out_dir/ckpt_last.safetensors first and exits with status 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line too (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from tinygpt.presets import PRESETS

    p = _Parser(prog="tinygpt", description="Train and sample a GPT with a hand-written autograd engine.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model (default: preset 'cpu' on the default corpus)",
                       description="Train a model. Every option left out comes from the preset; with --resume, "
                                   "from the checkpoint.")
    t.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: cpu)")
    t.add_argument("--data", help="a UTF-8 .txt file or folder, 'shakespeare' (default: Tiny Shakespeare, "
                                  "shipped with tinygpt), 'shakespeare-download' or 'python-stdlib'")
    t.add_argument("--tokenizer", help="char (default) or bpe")
    t.add_argument("--bpe-vocab-size", type=int, help="vocabulary size of --tokenizer bpe (default 512)")
    t.add_argument("--device", help="cpu (default: $TINYGPT_DEVICE or cpu) or cuda")
    t.add_argument("--max-iters", type=int, help="iteration to stop at (the lr schedule does not change)")
    t.add_argument("--warmup-iters", type=int, help="linear warmup length (default: the preset's)")
    t.add_argument("--lr-decay-iters", type=int, help="cosine decay reaches min_lr here (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay on 2-D weights")
    t.add_argument("--grad-clip", type=float, help="clip the global gradient norm (0: off; default 1.0)")
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    t.add_argument("--block-size", type=int, help="context length in tokens")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--eval-interval", type=int, help="evaluate and checkpoint every N iterations")
    t.add_argument("--eval-iters", type=int, help="batches averaged per evaluation")
    t.add_argument("--n-layer", type=int, help="transformer blocks")
    t.add_argument("--n-head", type=int, help="attention heads (must divide --n-embd)")
    t.add_argument("--n-embd", type=int, help="channels")
    t.add_argument("--dropout", type=float, help="dropout probability")
    t.add_argument("--bias", type=_bool, help="biases in Linear and LayerNorm layers (true/false)")
    t.add_argument("--seed", type=int, help="random seed (default 1337)")
    t.add_argument("--workers", type=int, help="CPU processes that share each batch (default 0: one per "
                                              "core when the model is big enough; 1: off)")
    t.add_argument("--out-dir", help="where checkpoints, log.jsonl and loss.png go (default: out)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Stream text from out_dir's best checkpoint (else its last one).")
    s.add_argument("--out-dir", default="out", help="the training run's folder (default: out)")
    s.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; below 1 is more conservative")
    s.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with mass p")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default=None, help="cpu or cuda (default: $TINYGPT_DEVICE or cpu)")

    b = sub.add_parser("bench", help="time training steps (tokens/s), tinygpt against PyTorch when installed")
    try:
        from tinygpt.bench import add_arguments        # the bench module owns its options
    except ImportError:
        b.add_argument("--preset", default="cpu", help="cpu or video")
        b.add_argument("--device", default=None)
        b.add_argument("--batch-size", type=int, default=None)
        b.add_argument("--steps", type=int, default=None)
        b.add_argument("--json", action="store_true", help="print one JSON object")
    else:
        add_arguments(b)
    return p


_TRAIN_KEYS = ("preset", "data", "tokenizer", "bpe_vocab_size", "device", "max_iters", "warmup_iters",
               "lr_decay_iters", "lr", "min_lr", "weight_decay", "grad_clip", "batch_size", "block_size",
               "grad_accum", "eval_interval", "eval_iters", "n_layer", "n_head", "n_embd", "dropout", "bias",
               "seed", "workers")


def _train(args: argparse.Namespace) -> int:
    from tinygpt import backend
    from tinygpt.train import RunSettings, Trainer, TrainingInterrupted

    given = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
    progress = False if args.no_progress else None
    out_dir = args.out_dir or "out"
    if args.resume:
        trainer = Trainer.resume(out_dir, given, progress=progress)
    else:
        given.setdefault("device", backend.default_device())
        preset = given.pop("preset", "cpu")
        settings = RunSettings.from_preset(preset, out_dir=out_dir, **given)
        trainer = Trainer(settings, progress=progress)
    s = trainer.settings
    n = trainer.model.num_parameters()
    print(f"tinygpt: preset {s.preset}, corpus {s.data}, {trainer.tokenizer.kind} tokenizer "
          f"(vocab {trainer.tokenizer.vocab_size}), {n:,} parameters, device {s.device}, "
          f"{'resuming at iteration ' + str(trainer.iter) if args.resume else 'out_dir ' + str(s.out_dir)}",
          flush=True)
    try:
        result = trainer.run()
    except TrainingInterrupted as e:
        sys.stderr.write(f"tinygpt: {e}\n")
        return EXIT_INTERRUPTED
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(f"tinygpt: done at iteration {result.iter} in {result.elapsed_s:.1f} s, best val loss {best}; "
          f"sample with: tinygpt sample --out-dir {s.out_dir}", flush=True)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import tinygpt
    from tinygpt import backend, checkpoint
    from tinygpt.sample import main_stream

    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise ValueError(f"--num-samples must be >= 1 and --max-new-tokens >= 0, got {args.num_samples} and "
                         f"{args.max_new_tokens}")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1) \
            or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise ValueError(f"need --temperature >= 0, --top-k >= 1 and 0 < --top-p <= 1, got {args.temperature}, "
                         f"{args.top_k}, {args.top_p}")
    device = backend.get_device(args.device)
    path = checkpoint.find_checkpoint(args.out_dir, args.checkpoint)
    model, tok, _ = checkpoint.load_model(path, device=device)
    if tok is None:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r} has no tokenizer, so its ids cannot be "
                                         f"turned into text")
    tok.encode(args.prompt)                                   # check the prompt before printing anything
    tinygpt.manual_seed(args.seed)
    main_stream(model, tok, args.num_samples, sys.stdout, prompt=args.prompt,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib
    try:
        bench = importlib.import_module("tinygpt.bench")      # lazy: the perf tooling is optional
    except ModuleNotFoundError as e:
        if e.name != "tinygpt.bench":
            raise
        raise NotImplementedError("tinygpt bench is not available yet in this version") from None
    return int(bench.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tinygpt` console script; returns the exit status."""
    from tinygpt import backend, checkpoint, data, nn, optim, tokenizers
    from tinygpt.models import ConfigError

    known = (data.DataError, tokenizers.TokenizerError, checkpoint.CheckpointError, ConfigError,
             backend.DeviceError, nn.StateDictError, optim.OptimizerStateError, ValueError, UnicodeDecodeError,
             NotImplementedError, OSError)    # OSError: a missing file, a read-only or full disk, ...
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
    except known as e:
        sys.stderr.write(f"tinygpt: error: {' '.join(str(e).split()) or type(e).__name__}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("tinygpt: interrupted\n")
        return EXIT_INTERRUPTED
