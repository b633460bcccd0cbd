"""The training loop behind `tinygpt train`: data, model, AdamW, schedule, evaluation, checkpoints, logs.

    settings = RunSettings.from_preset("cpu", data="shakespeare", max_iters=500)
    result = Trainer(settings).run()            # prints "step N: train loss X, val loss Y" every eval_interval

One iteration (nanoGPT's train.py):
    lr = schedule(it)                           warmup then cosine (or constant, for the lecture's presets)
    for each of grad_accum micro-batches:       x, y (B, T) from a seeded batch generator
        loss = model(x, y) / grad_accum; loss.backward()
    clip the global gradient norm to grad_clip; AdamW step (decay on 2-D weights only); zero the grads

Every eval_interval iterations (and at the last one) it averages the loss of eval_iters batches per split in
eval mode under no_grad, writes out_dir/ckpt_last.safetensors (and ckpt_best.safetensors when val loss
improved), then appends a line to out_dir/log.jsonl.

A kill, a full disk or a nan (tinygpt/rundir.py lists what each keeps): one run per out-dir (a lock);
Ctrl-C, SIGTERM and SIGHUP save first; a nan or inf loss or weight stops the run without saving it
(TrainingDiverged); a run that cannot fit in memory is refused before allocating (tinygpt/memory.py).

Under `mpiexec` or `srun` (tinygpt/distributed.py) each rank runs the same loop on its rows of every batch,
the gradients are all-reduced before clipping, a stop signal on any rank stops all after the same
iteration, and rank 0 alone takes the out-dir's lock and writes checkpoints, logs, the plot and the bar.

Exact resume: a checkpoint holds the weights, the AdamW moments and step counts, the iteration, the state of
the batch generator and of the host generator (dropout on the CPU), and the settings (the schedule follows
from them). Evaluation draws its batches from a generator seeded by (seed, iteration, split), so it never
moves the training streams. A run stopped at iteration k and resumed ends bit-identical on the CPU.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

import numpy as np

import tinygpt
from tinygpt import backend, checkpoint, data, distributed, memory, models, optim, rundir, tokenizers
from tinygpt.parallel import DataParallel, choose_workers
from tinygpt.settings import RESUMABLE, RunSettings, make_optimizer, make_schedule, resumed_settings

__all__ = ["RunSettings", "Trainer", "TrainResult", "TrainingInterrupted", "TrainingDiverged", "estimate_loss",
           "make_schedule", "prepare_data", "RESUMABLE"]

class TrainingInterrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP during training: the last checkpoint was saved; the message says how to
    resume. `signum` is the signal (the command exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class TrainingDiverged(ValueError):
    """A loss or a weight became nan or inf: the run stopped without saving them (the last checkpoint on
    disk is the last good one)."""


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


def _out_dir_lock(out_dir) -> rundir.OutDirLock:
    """The out-dir's lock, taken by the process that writes there: under MPI rank 0 (the others hold one
    they never took, whose release does nothing)."""
    lock = rundir.OutDirLock(out_dir)
    return lock.acquire() if distributed.init().is_main else lock


class Trainer:
    """Sets up a run (or resumes one from `out_dir/ckpt_last.safetensors`) and trains it with `run()`.

    Everything that can fail on bad input (device, corpus, config, checkpoint) fails here, in __init__,
    before anything in out_dir is touched.
    """

    def __init__(self, settings: RunSettings, *, progress: bool | None = None, out: TextIO | None = None,
                 log_interval: int | None = None, _ckpt: checkpoint.Checkpoint | None = None,
                 _lock: rundir.OutDirLock | None = None):
        lock = _lock or _out_dir_lock(settings.out_dir)   # the checks below run under it
        try:
            self._init(settings, progress, out, log_interval, _ckpt)
        except BaseException:
            lock.release(remove_dir=True)          # a refused run leaves nothing behind
            raise
        self._lock: rundir.OutDirLock | None = lock

    def _init(self, settings: RunSettings, progress: bool | None, out: TextIO | None, log_interval: int | None,
              ckpt: checkpoint.Checkpoint | None) -> None:
        self.out = out if out is not None else sys.stdout
        self.progress = progress
        self.device = backend.get_device(settings.device)         # CudaUnavailableError before any work
        self.world = distributed.init(self.device)    # alone: rank 0 of 1, no MPI; launched: this rank's GPU
        backend.tune_allocator()                                   # glibc keeps each step's freed blocks
        out_dir = Path(settings.out_dir)
        last = checkpoint.checkpoint_path(out_dir, "last")
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
        if ckpt is not None:                        # its ids must be the embedding's rows, before encoding
            checkpoint.check_tokenizer(saved_tok, ckpt.meta.get("model_config"), last)
        self.tokenizer, self.train_ids, self.val_ids = prepare_data(s, saved_tok)

        config = s.model_config(self.tokenizer.vocab_size)
        if ckpt is not None:                        # sizes from the header must be the tensors' (no huge alloc)
            checkpoint.check_model_config(config, ckpt.model_state, last)
        n_params = memory.parameter_count(config)
        sized = SimpleNamespace(num_parameters=lambda: n_params)           # the model before it exists
        cpu_alone = self.device.name == "cpu" and self.world.world_size == 1     # under MPI nothing forks
        workers = choose_workers(s.workers, sized, s.batch_size * s.block_size) if cpu_alone else 1
        rows = -(-s.batch_size // self.world.world_size)                        # this rank's share of a batch
        memory.check_fits(config, rows, s.block_size, workers, self.device.name, optimizer=s.optimizer)
        tinygpt.manual_seed(s.seed)
        self.model = models.model_from_config(config, device=self.device)
        self.optimizer = make_optimizer(s, self.model)             # AdamW, or Muon + AdamW (settings.py)
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
        self._saved_iter = self.iter if ckpt is not None else None     # the last checkpoint written
        self._log_record = ckpt.meta.get("log_record") if ckpt is not None else None   # its log line

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
        lock = _out_dir_lock(out_dir)          # before reading: no run is writing it now
        try:
            ckpt = checkpoint.load(last)
            settings = resumed_settings(ckpt, dict(overrides or {}, out_dir=str(out_dir)))
            return cls(settings, _ckpt=ckpt, _lock=lock, **kwargs)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        """Release the out-dir (run() does it when it ends); for a Trainer that is built but never run."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        """One optimizer step at self.iter; returns the mean micro-batch loss as a device scalar (no sync).
        On the CPU (where reading it is free) a loss or gradient norm that is nan or inf raises
        TrainingDiverged before the update, so the weights never take it."""
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
        if isinstance(self._parallel, distributed.DistributedDataParallel):
            total = self._parallel.sync(total)      # all-reduce: every rank holds the batch's gradient now
        norm = optim.clip_grad_norm_(self.model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
        if self.device.name == "cpu":
            for what, value in (("training loss", total), ("gradient norm", norm)):
                value = None if value is None else float(value.data if isinstance(value, tinygpt.Tensor) else value)
                if value is not None and not math.isfinite(value):
                    self.optimizer.zero_grad()
                    raise self._diverged(f"the {what} is {value} at iteration {self.iter} (before its update)")
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.iter += 1
        return total if s.grad_accum == 1 else total / s.grad_accum

    def _diverged(self, what: str) -> TrainingDiverged:
        last = checkpoint.checkpoint_path(self.out_dir, "last")
        kept = (f"{last} (iteration {self._saved_iter}) is the last good checkpoint" if self._saved_iter is not None
                else "no checkpoint was written")
        return TrainingDiverged(f"{what}; stopped without saving it: {kept}; lower --lr or --grad-clip, or "
                                f"check the data")

    def save(self, which: str = "last", extra: dict | None = None) -> Path:
        """Write ckpt_{which}; TrainingDiverged (nothing written) if a weight is nan or inf."""
        if not self.world.is_main:                  # under MPI rank 0 writes (every rank holds the same state)
            return checkpoint.checkpoint_path(self.out_dir, which)
        backend.raise_device_errors(self.device)    # a bad id a GPU step recorded: its IndexError, not a nan
        for p in self.model.parameters():
            if not bool(backend.get_array_module(p.data).isfinite(p.data).all()):
                raise self._diverged(f"the weights hold nan or inf at iteration {self.iter}")
        meta = {
            "iter": self.iter, "best_val_loss": self.best_val_loss, "last_eval_iter": self.last_eval_iter,
            "settings": asdict(self.settings), "tokenizer": self.tokenizer.to_dict(),
            "rng": {"host": backend.get_rng_state(), "batches": self.batch_rng.bit_generator.state},
            "schedule": self.schedule.state_dict(), "tinygpt_version": tinygpt.__version__,
            "log_record": rundir.strict_json(self._log_record), **(extra or {}),
        }
        path = checkpoint.save(checkpoint.checkpoint_path(self.out_dir, which), self.model, self.optimizer, meta)
        if which == "last":
            self._saved_iter = self.iter
        return path

    def _stop_agreed(self, requested_here: bool) -> bool:
        """Whether to stop now: a signal here; under MPI, one on any rank, as the ranks agreed in the last
        collective, so that every rank stops on the same iteration."""
        if isinstance(self._parallel, distributed.DistributedDataParallel):
            return self._parallel.agree_stop(requested_here)
        return requested_here

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to max_iters; holds the out-dir's lock until it returns or raises."""
        s = self.settings
        if self._lock is None:                      # a second run() after the first released the out-dir
            self._lock = _out_dir_lock(self.out_dir)
        try:
            return self._run(s)
        finally:
            self.close()

    def _run(self, s: RunSettings) -> TrainResult:
        from tqdm import tqdm

        log_path = self.out_dir / "log.jsonl"
        if self.world.is_main:                      # under MPI, rank 0 alone writes in the out-dir
            self.out_dir.mkdir(parents=True, exist_ok=True)
            rundir.remove_stale_temps(self.out_dir)     # left by a killed save: no one else writes here now
            if self.resumed:                        # lines after the checkpoint go; its own line comes back
                rundir.prepare_log(log_path, self.iter, self._log_record)
            else:
                rundir.prepare_log(log_path, -1)    # a fresh run starts a fresh log
        start_time = time.perf_counter()
        disable = ((not sys.stderr.isatty()) if self.progress is None else (not self.progress)) \
            or not self.world.is_main
        if self.world.world_size > 1:               # under MPI: one process per rank, nothing forks
            self._parallel = distributed.DistributedDataParallel(self.model, self.world)
        elif self.device.name == "cpu":
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
        with rundir.StopSignals() as sigint:
            try:
                while True:
                    if self._stop_agreed(sigint.requested):
                        raise _Stop()
                    if (self.iter % s.eval_interval == 0 or self.iter >= s.max_iters) \
                            and self.last_eval_iter != self.iter:
                        t = time.perf_counter()
                        backend.synchronize(self.device)
                        train_time += time.perf_counter() - t
                        losses = self.evaluate(should_stop=lambda: self._stop_agreed(sigint.requested))
                        self._after_eval(losses, train_tokens / train_time if train_tokens else None,
                                         start_time, log_path, bar)
                        train_time, train_tokens = 0.0, 0
                    if self.iter >= s.max_iters:
                        break
                    t = time.perf_counter()
                    loss = self.train_step()
                    log_now = self.iter % self.log_interval == 0 and not bar.disable
                    # the only sync; it raises an IndexError a GPU op recorded (backend.flag_bad_ids)
                    loss_value = float(backend.to_numpy(loss)) if log_now else None
                    if loss_value is not None and not math.isfinite(loss_value):
                        raise self._diverged(f"the training loss is {loss_value} at iteration {self.iter - 1}")
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
            except _Stop:                 # a second signal raises KeyboardInterrupt: no save mid-step
                bar.close()
                path = self.save("last")
                if self.world.is_main:
                    rundir.plot_log(log_path, self.out_dir / "loss.png")
                by = "" if sigint.signum == signal.SIGINT else f" by {signal.Signals(sigint.signum).name}"
                raise TrainingInterrupted(
                    f"interrupted{by} at iteration {self.iter}; saved {path}; continue with: tinygpt train "
                    f"--resume --out-dir {self.out_dir}", sigint.signum) from None
        bar.close()
        if self.world.is_main:
            rundir.plot_log(log_path, self.out_dir / "loss.png")
        return TrainResult(self.iter, losses.get("train"), losses.get("val"), self.best_val_loss,
                           time.perf_counter() - start_time, self.out_dir, self.history)

    def _after_eval(self, losses: dict, tokens_per_s: float | None, start_time: float, log_path: Path,
                    bar) -> None:
        it = self.iter
        self.last_eval_iter = it
        line = f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if self.world.is_main:
            bar.write(line, file=self.out)
            self.out.flush()
        finite = math.isfinite(losses["train"]) and math.isfinite(losses["val"])
        improved = finite and (self.best_val_loss is None or losses["val"] < self.best_val_loss)
        if improved:
            self.best_val_loss = losses["val"]
        record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                  "lr": self.schedule(it), "tokens_per_s": tokens_per_s,
                  "best_val_loss": self.best_val_loss,
                  "elapsed_s": round(time.perf_counter() - start_time, 3), "time": time.time()}
        if not finite:                  # logged (as the strings "nan"/"inf"), never saved
            if self.world.is_main:
                rundir.append_log(log_path, record)
            raise self._diverged(f"the evaluation loss is {losses['train']} (train), {losses['val']} (val) at "
                                 f"iteration {it}")
        self._log_record = record       # saved inside the checkpoint: a kill before the log line loses nothing
        if improved:
            self.save("best")
        self.save("last")
        if self.world.is_main:
            rundir.append_log(log_path, record)  # after the checkpoint: never ahead of it
        self.history.append(record)
