"""The training loop behind `tinygpt train`: data, model, AdamW, schedule, evaluation, checkpoints, logs.

    settings = RunSettings.from_preset("cpu", data="shakespeare", max_iters=500)
    result = Trainer(settings).run()            # prints "step N: train loss X, val loss Y" every eval_interval

One iteration (nanoGPT's train.py):
    lr = schedule(it)                           warmup then cosine (or constant, for the lecture's presets)
    for each of grad_accum micro-batches:       x, y (B, T) from a seeded batch generator
        loss = model(x, y) / grad_accum; loss.backward()
    clip the global gradient norm to grad_clip; AdamW step (decay on 2-D weights only); zero the grads

Every eval_interval iterations (and at the last one) it averages the loss of eval_iters batches per split in
eval mode under no_grad, appends a line to out_dir/log.jsonl, and writes out_dir/ckpt_last.safetensors
(and ckpt_best.safetensors when val loss improved).

Exact resume: a checkpoint holds the weights, the AdamW moments and step counts, the iteration, the state of
the batch generator and of the host generator (dropout on the CPU), and the settings (the schedule follows
from them). Evaluation draws its batches from a generator seeded by (seed, iteration, split), so it never
moves the training streams. A run stopped at iteration k and resumed ends bit-identical on the CPU.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import tinygpt
from tinygpt import backend, checkpoint, data, models, optim, tokenizers
from tinygpt.parallel import DataParallel, choose_workers
from tinygpt.settings import RESUMABLE, RunSettings, make_schedule, resumed_settings

__all__ = ["RunSettings", "Trainer", "TrainResult", "TrainingInterrupted", "estimate_loss", "make_schedule",
           "prepare_data", "RESUMABLE"]

class TrainingInterrupted(Exception):
    """Ctrl-C during training: the last checkpoint was saved; the message says how to resume."""


@dataclass
class TrainResult:
    iter: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    elapsed_s: float
    out_dir: Path
    history: list[dict] = field(default_factory=list)


def _corpus_name(source: str) -> str:
    return source if source in data.NAMED_SOURCES else Path(source).stem


def prepare_data(s: RunSettings, tokenizer: tokenizers.Tokenizer | None = None):
    """(tokenizer, train_ids, val_ids) for the settings' corpus: the whole text builds the tokenizer (unless
    one is given, e.g. from a checkpoint), ids are cached on disk, the first 90% train and the rest validate."""
    text = data.load_text(s.data)
    if tokenizer is None:
        if s.tokenizer == "char":
            tokenizer = tokenizers.CharTokenizer.from_text(text)
        else:
            tokenizer = tokenizers.BPETokenizer.train(text, s.bpe_vocab_size)
    ids = data.encode_cached(text, tokenizer, name=f"{_corpus_name(s.data)}-{s.tokenizer}")
    train_ids, val_ids = data.train_val_split(ids, 0.9)
    shortest = min(len(train_ids), len(val_ids))
    if shortest < s.block_size + 1:
        raise data.DataError(f"corpus {s.data!r} is too short: {len(ids)} tokens give a "
                             f"{'validation' if len(val_ids) <= len(train_ids) else 'training'} split of "
                             f"{shortest}, but block_size={s.block_size} needs at least {s.block_size + 1}; "
                             f"use more text or a smaller --block-size")
    return tokenizer, train_ids, val_ids


def estimate_loss(model, splits: dict[str, np.ndarray], eval_iters: int, batch_size: int, block_size: int,
                  seed: int, it: int, device: Any = None, should_stop=None,
                  parallel: DataParallel | None = None) -> dict[str, float]:
    """Mean loss over eval_iters batches per split, in eval mode under no_grad (each batch's rows shared
    among the processes of `parallel`, a DataParallel wrapping `model`, when given).

    The batches come from np.random.default_rng([seed, it, split index]): the same at a given iteration in
    every run, and independent of the training generators, so evaluating changes nothing about training.
    One host sync per split (the sum is read once).
    """
    out = {}
    was_training = model.training
    model.eval()
    try:
        with tinygpt.no_grad():
            for i, (name, ids) in enumerate(splits.items()):
                rng = np.random.default_rng([seed, it, i])
                total = None
                for _ in range(eval_iters):
                    if should_stop is not None and should_stop():
                        raise _Stop()
                    x, y = data.get_batch(ids, batch_size, block_size, rng, device)
                    if parallel is not None:
                        loss_data = parallel.loss(x, y)
                    else:
                        loss_data = model(x, y)[1].data
                    total = loss_data if total is None else total + loss_data
                out[name] = float(backend.to_numpy(total)) / eval_iters
    finally:
        model.train(was_training)
    return out


class _Stop(Exception):
    """Raised inside evaluation when Ctrl-C asked the run to stop."""


class _SigintFlag:
    """First Ctrl-C: set a flag that the loop checks between iterations (so it stops at a clean point and
    saves). Second Ctrl-C: the usual KeyboardInterrupt. Only installable from the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """Sets up a run (or resumes one from `out_dir/ckpt_last.safetensors`) and trains it with `run()`.

    Everything that can fail on bad input (device, corpus, config, checkpoint) fails here, in __init__,
    before anything in out_dir is touched.
    """

    def __init__(self, settings: RunSettings, *, progress: bool | None = None, out: TextIO | None = None,
                 log_interval: int | None = None, _ckpt: checkpoint.Checkpoint | None = None):
        self.out = out if out is not None else sys.stdout
        self.progress = progress
        self.device = backend.get_device(settings.device)         # CudaUnavailableError before any work
        backend.tune_allocator()                                   # glibc keeps each step's freed blocks
        out_dir = Path(settings.out_dir)
        last = checkpoint.checkpoint_path(out_dir, "last")
        ckpt = _ckpt
        if ckpt is None and last.exists():
            raise checkpoint.CheckpointError(
                f"{str(out_dir)!r} already holds a checkpoint ({last.name}); pass --resume to continue it, "
                f"or --out-dir NEW_DIR to start a new run (nothing was overwritten)")
        if settings.data is None:
            settings = replace(settings, data=str(data.resolve_source(None)))
        elif settings.data not in data.NAMED_SOURCES:
            settings = replace(settings, data=str(Path(settings.data).expanduser().resolve()))
        settings.validate()
        self.settings = s = settings
        self.log_interval = log_interval or (1 if self.device.name == "cpu" else 10)

        try:
            saved_tok = tokenizers.from_dict(ckpt.meta["tokenizer"]) if ckpt is not None else None
        except (KeyError, tokenizers.TokenizerError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {str(last)!r} has no usable tokenizer ({e})") from None
        self.tokenizer, self.train_ids, self.val_ids = prepare_data(s, saved_tok)

        tinygpt.manual_seed(s.seed)
        self.model = models.model_from_config(s.model_config(self.tokenizer.vocab_size), device=self.device)
        self.optimizer = optim.AdamW(optim.weight_decay_groups(self.model, s.weight_decay), lr=s.lr,
                                     betas=(s.beta1, s.beta2))
        self.schedule = make_schedule(s)
        self.batch_rng = np.random.default_rng([s.seed, 1])       # training batches only
        self.iter, self.best_val_loss, self.last_eval_iter = 0, None, None
        self.resumed = ckpt is not None
        if ckpt is not None:
            try:
                self.model.load_state_dict(ckpt.model_state, strict=True)
                if ckpt.optim_state is not None:
                    self.optimizer.load_state_dict(ckpt.optim_state)
                backend.set_rng_state(ckpt.meta["rng"]["host"])
                self.batch_rng.bit_generator.state = ckpt.meta["rng"]["batches"]
                self.iter = int(ckpt.meta["iter"])
                self.best_val_loss = ckpt.meta.get("best_val_loss")
                self.last_eval_iter = ckpt.meta.get("last_eval_iter")
            except (KeyError, TypeError, ValueError) as e:
                raise checkpoint.CheckpointError(f"checkpoint {str(last)!r} does not fit this run "
                                                 f"({' '.join(str(e).split())})") from None
        self.history: list[dict] = []
        self._parallel: DataParallel | None = None      # made by run() on the CPU

    @classmethod
    def resume(cls, out_dir: str | Path, overrides: dict | None = None, **kwargs: Any) -> "Trainer":
        """Continue the run saved in out_dir/ckpt_last.safetensors with the settings saved in it.

        `overrides` (setting -> value; None means left out) may change only the RESUMABLE settings:
        max_iters, eval_interval, eval_iters, device, workers, and out_dir (always this out_dir, so a run
        folder may be moved). data may name the saved corpus file by another path. Any other setting must
        equal the checkpoint's (ConfigError); every value passes its field's rule. kwargs go to Trainer
        (progress, out, log_interval)."""
        last = checkpoint.checkpoint_path(out_dir, "last")
        if not last.is_file():
            raise checkpoint.CheckpointError(f"nothing to resume: {str(last)!r} does not exist; start a run "
                                             f"without --resume, or point --out-dir at an earlier run")
        ckpt = checkpoint.load(last)
        settings = resumed_settings(ckpt, dict(overrides or {}, out_dir=str(out_dir)))
        return cls(settings, _ckpt=ckpt, **kwargs)

    # --- pieces of an iteration ---------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.settings.out_dir)

    def evaluate(self, should_stop=None) -> dict[str, float]:
        s = self.settings
        return estimate_loss(self.model, {"train": self.train_ids, "val": self.val_ids}, s.eval_iters,
                             s.batch_size, s.block_size, s.seed, self.iter, self.device, should_stop,
                             self._parallel)

    def train_step(self) -> Any:
        """One optimizer step at self.iter; returns the mean micro-batch loss as a device scalar (no sync)."""
        s = self.settings
        lr = self.schedule(self.iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = None
        for _ in range(s.grad_accum):
            x, y = data.get_batch(self.train_ids, s.batch_size, s.block_size, self.batch_rng, self.device)
            if self._parallel is not None:                    # the batch's rows shared among processes
                loss_data = self._parallel.forward_backward(x, y, 1.0 / s.grad_accum)
            else:
                _, loss = self.model(x, y)
                (loss if s.grad_accum == 1 else loss / s.grad_accum).backward()
                loss_data = loss.data
            total = loss_data if total is None else total + loss_data
        if s.grad_clip > 0:
            optim.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.iter += 1
        return total if s.grad_accum == 1 else total / s.grad_accum

    def save(self, which: str = "last", extra: dict | None = None) -> Path:
        meta = {
            "iter": self.iter, "best_val_loss": self.best_val_loss, "last_eval_iter": self.last_eval_iter,
            "settings": asdict(self.settings), "tokenizer": self.tokenizer.to_dict(),
            "rng": {"host": backend.get_rng_state(), "batches": self.batch_rng.bit_generator.state},
            "schedule": self.schedule.state_dict(), "tinygpt_version": tinygpt.__version__,
            **(extra or {}),
        }
        return checkpoint.save(checkpoint.checkpoint_path(self.out_dir, which), self.model, self.optimizer,
                               meta)

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm import tqdm

        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.jsonl"
        _truncate_log(log_path, self.iter if self.resumed else -1)    # a fresh run starts a fresh log
        start_time = time.perf_counter()
        disable = (not sys.stderr.isatty()) if self.progress is None else (not self.progress)
        if self.device.name == "cpu":
            workers = choose_workers(s.workers, self.model, s.batch_size * s.block_size)
            self._parallel = DataParallel(self.model, workers) if workers > 1 else None
        bar = tqdm(total=s.max_iters, initial=self.iter, desc="train", unit="it", file=sys.stderr,
                   disable=disable, dynamic_ncols=True)
        try:
            return self._loop(s, log_path, start_time, bar)
        finally:
            if self._parallel is not None:
                self._parallel.close()
                self._parallel = None

    def _loop(self, s: RunSettings, log_path: Path, start_time: float, bar) -> TrainResult:
        train_time, train_tokens = 0.0, 0          # since the last evaluation
        bar_time, bar_tokens = 0.0, 0              # since the last progress-bar update
        losses: dict[str, float] = {}
        with _SigintFlag() as sigint:
            try:
                while True:
                    if sigint.requested:
                        raise _Stop()
                    if (self.iter % s.eval_interval == 0 or self.iter >= s.max_iters) \
                            and self.last_eval_iter != self.iter:
                        t = time.perf_counter()
                        backend.synchronize(self.device)
                        train_time += time.perf_counter() - t
                        losses = self.evaluate(should_stop=lambda: sigint.requested)
                        self._after_eval(losses, train_tokens / train_time if train_tokens else None,
                                         start_time, log_path, bar)
                        train_time, train_tokens = 0.0, 0
                    if self.iter >= s.max_iters:
                        break
                    t = time.perf_counter()
                    loss = self.train_step()
                    log_now = self.iter % self.log_interval == 0 and not bar.disable
                    loss_value = float(backend.to_numpy(loss)) if log_now else None   # the only sync
                    dt = time.perf_counter() - t
                    train_time += dt
                    train_tokens += s.tokens_per_iter
                    bar_time += dt
                    bar_tokens += s.tokens_per_iter
                    bar.update(1)
                    if log_now:
                        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{bar_tokens / bar_time:,.0f}",
                                        refresh=False)
                        bar_time, bar_tokens = 0.0, 0
            except _Stop:                 # a second Ctrl-C raises KeyboardInterrupt: no save mid-step
                bar.close()
                path = self.save("last")
                _plot(log_path, self.out_dir / "loss.png")
                raise TrainingInterrupted(
                    f"interrupted at iteration {self.iter}; saved {path}; continue with: tinygpt train "
                    f"--resume --out-dir {self.out_dir}") from None
        bar.close()
        _plot(log_path, self.out_dir / "loss.png")
        return TrainResult(self.iter, losses.get("train"), losses.get("val"), self.best_val_loss,
                           time.perf_counter() - start_time, self.out_dir, self.history)

    def _after_eval(self, losses: dict, tokens_per_s: float | None, start_time: float, log_path: Path,
                    bar) -> None:
        it = self.iter
        self.last_eval_iter = it
        line = f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        bar.write(line, file=self.out)
        self.out.flush()
        improved = self.best_val_loss is None or losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss = losses["val"]
        record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                  "lr": self.schedule(it), "tokens_per_s": tokens_per_s,
                  "best_val_loss": self.best_val_loss,
                  "elapsed_s": round(time.perf_counter() - start_time, 3), "time": time.time()}
        if improved:
            self.save("best")
        self.save("last")
        with open(log_path, "a", encoding="utf-8") as f:      # after the checkpoint: never ahead of it
            f.write(json.dumps(record) + "\n")
        self.history.append(record)


def _truncate_log(path: Path, upto: int) -> None:
    """On resume, drop log lines from after the checkpoint (a run killed between a log line and the next
    checkpoint must not leave duplicates)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("iter", 0) <= upto:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


def _plot(log_path: Path, png_path: Path) -> Path | None:
    """Loss curves from log.jsonl as a PNG, when matplotlib is installed (pip install "tinygpt[plot]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    its = [r["iter"] for r in rows]
    ax.plot(its, [r["train_loss"] for r in rows], label="train")
    ax.plot(its, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
