"""Data parallelism over CPU cores: each core runs the whole forward and backward on a slice of the batch.

Why: NumPy runs one op at a time on one core, and only BLAS spreads over the others. PyTorch spreads every
op over its threads. Splitting each small op between threads costs a GIL hand-off per ufunc call, so
tinygpt gives each extra core a process of its own, running the same model on its rows of the batch with
single-threaded BLAS. With B rows cut into slices of n_r rows (r = 0 is the main process):

    L  = Σ_r (n_r / B) · L_r          the batch mean is the slice means weighted by slice size
    ∇L = Σ_r (n_r / B) · ∇L_r         and so is its gradient

How:
  - Before the fork, every parameter moves into one block of shared memory (an anonymous MAP_SHARED
    mmap), so the optimizer's in-place step in the main process is every worker's step too, with no copy.
  - Each worker owns a shared block for its gradient. Per step the main process sends each worker its
    slice of (x, y) and its weight n_r/B through a pipe, runs slice 0 itself, then adds the workers'
    weighted gradients into .grad.
  - The main process alone clips, steps the optimizer and saves checkpoints. Evaluation splits its batches
    the same way, forward only.

    dp = DataParallel(model, workers=2)            # forks 1 worker; Linux only (elsewhere: 1, inline)
    loss = dp.forward_backward(x, y)               # .grad of every parameter += ∇(mean loss over the batch)
    loss = dp.loss(x, y)                           # the mean loss alone (no graph; for evaluation)
    dp.close()                                     # or use `with DataParallel(...) as dp:`

Lifetime: a worker ends when the main process sends it an empty message (close()), when its pipe reaches
end of file, or when the main process dies in any way, SIGKILL included: on Linux the kernel kills it
(prctl PR_SET_PDEATHSIG, set when the main thread forks), and a watchdog thread in every worker exits
once its parent's pid changes (a fork from another thread, a pipe some other process keeps open). Workers
ignore SIGINT, SIGTERM and SIGHUP: those are the main process's, which saves and then closes them.

Dropout: the main process sends each worker a seed per step, drawn from tinygpt's host generator, so a run
repeats exactly (and resumes exactly) for a given number of workers. Summing slices in a different order
than one process would changes the last bits of the result, so a different worker count gives a run
that differs by rounding.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import signal
import struct
import sys
import threading
import time
import warnings
from typing import Any

import numpy as np

import tinygpt
from tinygpt import backend, cpu_threads

__all__ = ["DataParallel", "choose_workers", "default_workers", "split_rows"]

_HEADER = struct.Struct("<BBqdII")     # training and backward flags, dropout seed, gradient scale, rows,
                                       # columns; then x, y
_REPLY = struct.Struct("<d")           # the slice's mean loss
_ALIGN = 64                            # bytes: each shared array starts on a cache line


MIN_FLOPS = 1e9      # a training step below ~1 GFLOP (~10 ms on one core) gains less than the pipe costs


def default_workers() -> int:
    """Processes for data parallelism: one per core ($TINYGPT_NUM_THREADS caps it) on Linux, else 1."""
    return cpu_threads.num_cores() if sys.platform.startswith("linux") else 1


def choose_workers(requested: int, model: Any, tokens: int) -> int:
    """`requested` if > 0, else default_workers() for a step of at least MIN_FLOPS (≈ 6 · parameters ·
    tokens: forward 2, backward 4 per weight per token), else 1."""
    if requested > 0:
        return requested
    return default_workers() if 6 * model.num_parameters() * tokens >= MIN_FLOPS else 1


def split_rows(rows: int, parts: int) -> list[int]:
    """Where `parts` slices of a batch of `rows` rows start and end: slice r is rows edges[r]:edges[r + 1]
    (sizes differ by at most one; with more parts than rows, some slices are empty). Used by DataParallel
    and by tinygpt.distributed, so processes and MPI ranks cut a batch the same way."""
    return [rows * r // parts for r in range(parts + 1)]


def _shared_like(arrays: list) -> list:
    """Zeroed arrays shaped like `arrays`, all in one anonymous shared mmap (inherited across fork)."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    buf = mmap.mmap(-1, max(total, 1))            # MAP_SHARED | MAP_ANONYMOUS
    return [np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=o).reshape(a.shape)
            for a, o in zip(arrays, offsets)]


class _BlasLimit:
    """Single-threaded BLAS inside a `with` block (threadpoolctl), so processes do not oversubscribe cores."""

    def __init__(self) -> None:
        self._limiter = None

    def __enter__(self) -> "_BlasLimit":
        self._limiter = cpu_threads.blas_single_thread()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            self._limiter = None


class DataParallel:
    """Run `model(x, y) -> (logits, loss)` over slices of a batch in `workers` processes (see module doc).

    The model must live on the CPU and keep its parameters (names, shapes) while wrapped; a parameter
    whose .data was replaced (e.g. by load_state_dict on another array) is copied back into shared memory
    at the next step.
    """

    def __init__(self, model: Any, workers: int | None = None):
        self.model = model
        self.params = list(model.parameters())
        if not tinygpt.is_grad_enabled():            # the workers would inherit no_grad for good
            raise RuntimeError("create DataParallel outside `with tinygpt.no_grad()`")
        if any(p.device.name != "cpu" for p in self.params):
            raise ValueError("DataParallel runs on CPU processes; the model has parameters on another device")
        workers = default_workers() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers > 1 and not sys.platform.startswith("linux"):
            workers = 1                             # fork-based: Linux only
        self.workers = workers
        self._conns: list = []
        self._procs: list = []
        self._grads: list = []
        self._shared: list = []
        self._blas = _BlasLimit()
        if workers > 1:
            self._start()

    # --- setup and teardown ------------------------------------------------------------------------------
    def _start(self) -> None:
        self._shared = _shared_like([p.data for p in self.params])
        for p, view in zip(self.params, self._shared):
            view[...] = p.data
            p.data = view
        ctx = multiprocessing.get_context("fork")
        main_thread = threading.current_thread() is threading.main_thread()
        for rank in range(1, self.workers):
            grads = _shared_like([p.data for p in self.params])
            parent_end, child_end = ctx.Pipe()
            siblings = list(self._conns) + [parent_end]      # main-side ends the child must not keep open
            proc = ctx.Process(target=_worker_loop, args=(self.model, self.params, grads, child_end),
                               kwargs=dict(parent_pid=os.getpid(), close=siblings, deathsig=main_thread),
                               name=f"tinygpt-dp{rank}", daemon=True)
            with warnings.catch_warnings():         # Python 3.12+ warns about fork with threads running
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
            self._grads.append(grads)

    def close(self) -> None:
        """Stop the workers and give each parameter private memory again. Safe to call twice."""
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        for p, view in zip(self.params, self._shared):
            if p.data is view:
                p.data = view.copy()
        self._conns, self._procs, self._grads, self._shared = [], [], [], []

    def __enter__(self) -> "DataParallel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- one micro-batch ---------------------------------------------------------------------------------
    def forward_backward(self, x: Any, y: Any, grad_scale: float = 1.0) -> Any:
        """Add grad_scale · ∇(mean loss of model(x, y)) to every parameter's .grad; return that mean loss
        (times 1, not grad_scale) as a 0-d array, without a sync. x, y: (B, T) integer Tensors or arrays."""
        return self._run(x, y, grad_scale)

    def loss(self, x: Any, y: Any) -> Any:
        """The mean loss of model(x, y) over the batch, forward only (no graph, no .grad touched), as a 0-d
        array without a sync. For evaluation, in eval mode: then it draws nothing from the host generator."""
        return self._run(x, y, None)

    def _run(self, x: Any, y: Any, grad_scale: float | None) -> Any:
        """forward_backward, or with grad_scale None the forward alone."""
        xh = np.ascontiguousarray(backend.to_numpy(getattr(x, "data", x)), dtype=np.int64)
        yh = np.ascontiguousarray(backend.to_numpy(getattr(y, "data", y)), dtype=np.int64)
        if xh.ndim != 2 or xh.shape != yh.shape:
            raise ValueError(f"DataParallel needs x and y of one (B, T) shape, got {xh.shape} and {yh.shape}")
        B = xh.shape[0]
        parts = min(self.workers, B) if self._procs else 1
        edges = split_rows(B, parts)
        backward = grad_scale is not None

        def share(rows: int) -> float | None:       # a slice's weight in the batch's mean loss, for its gradient
            return grad_scale * rows / B if backward else None

        if parts == 1:
            return _slice(self.model, xh, yh, share(B))

        for p, view in zip(self.params, self._shared):
            if p.data is not view:                  # replaced since the last step: share it again
                view[...] = p.data
                p.data = view
        rng = backend.host_rng()
        for r in range(1, parts):
            lo, hi = edges[r], edges[r + 1]
            seed = int(rng.integers(2 ** 62)) if backward else 0     # dropout masks; evaluation needs none
            head = _HEADER.pack(self.model.training, backward, seed, share(hi - lo) or 0.0, hi - lo, xh.shape[1])
            self._conns[r - 1].send_bytes(head + xh[lo:hi].tobytes() + yh[lo:hi].tobytes())
        old_threads = cpu_threads.set_num_threads(1)
        try:
            with self._blas:
                loss = _slice(self.model, xh[:edges[1]], yh[:edges[1]], share(edges[1]))
        finally:
            cpu_threads.set_num_threads(old_threads)
            replies = [self._receive(r) for r in range(1, parts)]
        total = loss * (edges[1] / B)
        for r, slice_loss in enumerate(replies, start=1):
            total = total + slice_loss * ((edges[r + 1] - edges[r]) / B)
            if not backward:
                continue
            for p, g in zip(self.params, self._grads[r - 1]):      # g: already scaled by the worker
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = g.copy()
                    else:
                        p.grad += g
        return np.asarray(total, dtype=loss.dtype)

    def _receive(self, rank: int) -> float:
        try:
            msg = self._conns[rank - 1].recv_bytes()
        except (EOFError, OSError):
            raise RuntimeError(f"data-parallel worker {rank} died (exit code {self._procs[rank - 1].exitcode}); "
                               f"run again with --workers 1 to see the error in this process") from None
        if len(msg) != _REPLY.size:
            raise RuntimeError(f"data-parallel worker {rank} failed: {msg.decode(errors='replace')}")
        return _REPLY.unpack(msg)[0]


def _slice(model: Any, x: np.ndarray, y: np.ndarray, scale: float | None) -> Any:
    """Mean loss of model(x, y) as a 0-d array; adds scale · its gradient into the parameters' .grad, or,
    with scale None, runs the forward alone (no graph)."""
    with tinygpt.no_grad() if scale is None else contextlib.nullcontext():
        _, loss = model(tinygpt.tensor(x), tinygpt.tensor(y))
    if scale is not None:
        loss.backward(np.full(loss.shape, scale, dtype=loss.dtype))
    return loss.data


PR_SET_PDEATHSIG = 1                   # linux/prctl.h
WATCHDOG_INTERVAL = 0.5                # seconds between a worker's checks that its parent is alive


def _die_with_parent(parent_pid: int, deathsig: bool) -> None:
    """Make this worker end when the main process does, however it ends (see the module doc)."""
    if deathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:      # it died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCHDOG_INTERVAL)
        os._exit(0)
    threading.Thread(target=watch, name="tinygpt-dp-watchdog", daemon=True).start()


def _worker_loop(model: Any, params: list, grads: list, conn: Any, parent_pid: int | None = None,
                 close: list = (), deathsig: bool = True) -> None:
    """A worker's life: wait for a slice, write its gradient into `grads` (unless the message asks for the
    loss alone), reply with its loss; an empty message, end of file, or the main process dying ends it."""
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:             # the main process's signals: it saves, then closes us
            signal.signal(sig, signal.SIG_IGN)
    for other in close:                 # the main process's ends of the pipes: EOF must reach us when it dies
        other.close()
    if parent_pid is not None:
        _die_with_parent(parent_pid, deathsig)
    cpu_threads.set_num_threads(1)
    _BlasLimit().__enter__()                        # for the rest of this process
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not msg:
            return
        try:
            training, backward, seed, scale, rows, cols = _HEADER.unpack_from(msg)
            ids = np.frombuffer(msg, dtype=np.int64, offset=_HEADER.size).reshape(2, rows, cols).copy()
            model.train(bool(training))
            if backward:
                backend.manual_seed(seed)           # this step's dropout masks
                for p in params:
                    p.grad = None
                loss = _slice(model, ids[0], ids[1], scale)                  # (n_r / B) · grad_scale · ∇L_r
                for p, g in zip(params, grads):
                    if p.grad is None:
                        g.fill(0)
                    else:
                        np.copyto(g, p.grad)
                    p.grad = None
            else:                                   # evaluation: the loss alone
                loss = _slice(model, ids[0], ids[1], None)
            reply = _REPLY.pack(float(loss))
        except Exception as e:                      # report, and stay alive for the main process's error
            reply = f"{type(e).__name__}: {' '.join(str(e).split())}".encode()
        conn.send_bytes(reply)
