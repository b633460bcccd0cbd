"""Data parallelism across the processes a launcher starts: `mpiexec -n N tinygpt train`, or `srun`.

Each process (a rank) holds the whole model and runs the forward and backward on its rows of every batch,
cut as DataParallel cuts them (parallel.split_rows). With B rows and n_r of them on rank r, of W ranks:

    ∇L = (1/W) · Σ_r (W · n_r / B) · ∇L_r      each rank seeds its backward with W · n_r / B (1 for even
                                                slices, as in PyTorch's DDP); the all-reduce SUMs, then scales

    world = distributed.init()                 # from the launcher's environment; alone: world_size 1, no MPI
    world.rank, world.world_size, world.local_rank, world.is_main
    ddp = DistributedDataParallel(model)       # broadcasts rank 0's parameters
    share = ddp.forward_backward(x, y)         # this rank's rows of the (global) batch x, y
    loss = ddp.sync(share)                     # .grad is now the whole batch's gradient, on every rank

The gradients travel in one flat buffer made once: the parameters' gradients, one "has a gradient" count
per parameter, the loss and a stop flag. A Ctrl-C on any rank rides in that flag, so every rank stops
after the same iteration. On the CPU the buffer is a NumPy array reduced by MPI (mpi4py); on "cuda" it is
on the GPU and reduced by NCCL (tinygpt.cuda.nccl), which MPI starts: rank 0 makes the unique id and
broadcasts it, and each process takes GPU local_rank (mod the GPUs it sees).

Random streams: every rank draws the same batches (the whole batch, then keeps its rows) and shares the
host generator; for its dropout, each rank seeds a generator of its own from one draw of the shared one
and its rank, so the shared stream moves the same on every rank and rank 0's checkpoint holds it all.

Failure: nothing may hang. A rank whose Python raises prints one line that names it and the error and
calls MPI_Abort, which ends every rank (sys.excepthook; fail() for the errors the CLI reports). Every
collective waits at most $TINYGPT_COLLECTIVE_TIMEOUT seconds (default 600), then aborts the job likewise.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Mapping

import numpy as np

import tinygpt
from tinygpt import backend
from tinygpt.parallel import split_rows

__all__ = ["World", "DistributedDataParallel", "DistributedError", "init", "launched", "fail",
           "collective_timeout", "TIMEOUT_ENV"]

TIMEOUT_ENV = "TINYGPT_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0       # as PyTorch's NCCL default: room for a slow checkpoint or a first BPE build
ABORT_PAUSE_S = 0.5            # between a rank's last line and MPI_Abort (which may drop unforwarded output)
GRACE_S = 2.0                   # a failing rank other than 0 waits this long, so the same error is said once

_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK")


class DistributedError(RuntimeError):
    """Distributed training cannot start: no mpi4py, an MPI that does not load, a bad timeout."""


def _env_int(env: Mapping[str, str], names: tuple) -> int | None:
    for name in names:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            continue
    return None


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (mpiexec, mpirun, srun) started this process as one of several: a world size
    above 1, or a rank above 0, in its environment. Only then is MPI imported."""
    env = os.environ if env is None else env
    return (_env_int(env, _SIZE_VARS) or 1) > 1 or (_env_int(env, _RANK_VARS) or 0) > 0


def collective_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds a collective may wait for the other ranks: $TINYGPT_COLLECTIVE_TIMEOUT, else 600."""
    text = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


class World:
    """This process's place among the ranks. Alone (no launcher): rank 0 of 1, and no MPI."""

    def __init__(self, comm: Any = None, mpi: Any = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.comm, self._mpi, self.timeout = comm, mpi, timeout
        self.rank = comm.Get_rank() if comm is not None else 0
        self.world_size = comm.Get_size() if comm is not None else 1
        # the rank among the processes that share this node's memory: which GPU to take
        self.local_rank = comm.Split_type(mpi.COMM_TYPE_SHARED).Get_rank() if comm is not None else 0
        self.is_main = self.rank == 0
        self._gpu_chosen = False

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # --- collectives with a deadline ---------------------------------------------------------------------
    def allreduce_(self, buf: np.ndarray, what: str = "an all-reduce") -> np.ndarray:
        """buf ← the SUM of every rank's buf, in place (a host array)."""
        if self.comm is not None:
            self.wait(self.comm.Iallreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM), what)
        return buf

    def broadcast_(self, buf: np.ndarray, what: str = "a broadcast") -> np.ndarray:
        """buf ← rank 0's buf, in place (a host array)."""
        if self.comm is not None:
            self.wait(self.comm.Ibcast(buf, root=0), what)
        return buf

    def wait(self, request: Any, what: str) -> None:
        """Wait for a nonblocking MPI request, polling with a backoff of up to 1 ms; past the timeout, abort."""
        self.poll(request.Test, what, on_timeout=None)

    def poll(self, done: Any, what: str, on_timeout: Any = None) -> None:
        """Call done() until it is true; after self.timeout seconds, on_timeout() and abort the job."""
        deadline, pause = None, 1e-5
        while not done():
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            if now > deadline:
                if on_timeout is not None:
                    on_timeout()
                self.abort(f"tinygpt: error: rank {self.rank} of {self.world_size}: {what} did not complete "
                           f"within {self.timeout:g} s ({TIMEOUT_ENV}); another rank has stalled or died", 1)
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    # --- ending the job ----------------------------------------------------------------------------------
    def abort(self, line: str, code: int = 1) -> None:
        """Print `line` on stderr, then end every rank (MPI_Abort). MPI's own abort message is silenced, so
        the job says one line. Alone: print and exit."""
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if self.comm is None:
            os._exit(code)
        time.sleep(ABORT_PAUSE_S)                # the launcher forwards the line before it ends the job
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        self.comm.Abort(code)

    def use_gpu(self, runtime: Any = None) -> int:
        """Make GPU local_rank (mod the count) this process's, once, before the CUDA check and any allocation
        (else every rank would open a context on GPU 0 first); its index. `runtime`: a stand-in (tests)."""
        if runtime is None:
            if not self._gpu_chosen:
                self._gpu_index = backend.use_gpu(self.local_rank)
                self._gpu_chosen = True
            return self._gpu_index
        index = self.local_rank % max(runtime.device_count(), 1)
        if not self._gpu_chosen:
            runtime.use_device(index)
            self._gpu_chosen = True
        return index


_world: World | None = None


def init(device: Any = None) -> World:
    """This process's World, made once from the launcher's environment. Launched: imports mpi4py (which
    starts MPI), installs the abort hook and, for device "cuda", picks this rank's GPU. Alone: no MPI."""
    global _world
    if _world is None:
        if not launched():
            _world = World()
        else:
            timeout = collective_timeout()
            try:
                from mpi4py import MPI      # noqa: starts MPI (MPI_Init_thread); finalized at exit
            except ImportError as e:
                raise DistributedError(f"started by an MPI launcher, but mpi4py is missing ({e}); install it "
                                       f"with: pip install \"tinygpt[mpi]\"") from None
            except Exception as e:          # an MPI library that does not load or start
                raise DistributedError(f"MPI did not start ({type(e).__name__}: {' '.join(str(e).split())}); "
                                       f"see the README's 'Scale out' section") from None
            _world = World(MPI.COMM_WORLD, MPI, timeout)
            sys.excepthook = _abort_hook
    name = getattr(device, "name", device)
    if name is not None and str(name).split(":")[0] == "cuda" and _world.world_size > 1:
        _world.use_gpu()                    # before get_device("cuda") runs the CUDA check on some GPU
        backend.get_device("cuda")
    return _world


def _abort_hook(kind: type, value: BaseException, tb: Any) -> None:
    """sys.excepthook under a launcher: one line naming the rank and the error, then MPI_Abort; with
    TINYGPT_TRACEBACK=1 the traceback first. (Left alone, mpi4py's finalize at exit would wait forever.)"""
    if os.environ.get("TINYGPT_TRACEBACK"):
        traceback.print_exception(kind, value, tb)
    w = _world
    text = " ".join(str(value).split())
    fail(f"tinygpt: error: rank {w.rank} of {w.world_size} failed: {kind.__name__}{': ' + text if text else ''}",
         130 if issubclass(kind, KeyboardInterrupt) else 1, named=True)


def fail(line: str, code: int, named: bool = False) -> int:
    """Report an error that ends this rank, as one line; under a launcher, end every rank with it.

    Alone: print `line` and return `code`. Launched: name the rank in the line (unless `named`), and let
    rank 0 speak first: any other rank waits GRACE_S, so an error that every rank meets (a bad flag, a
    missing file) is printed once, by rank 0, whose abort ends the others. Then print and MPI_Abort; before
    MPI started, print and return `code` (the launcher ends the other ranks when this one exits).
    """
    w = _world
    if w is not None and w.world_size > 1:
        rank, size = w.rank, w.world_size
    elif launched():
        rank, size = _env_int(os.environ, _RANK_VARS) or 0, _env_int(os.environ, _SIZE_VARS) or "?"
    else:
        sys.stderr.write(line + "\n")
        return code
    if not named:
        where = f"rank {rank} of {size}"
        line = line.replace("error: ", f"error: {where}: ", 1) if "error: " in line else f"{line} ({where})"
    if rank != 0:
        time.sleep(GRACE_S)
    if w is not None and w.world_size > 1:
        w.abort(line, code)
    sys.stderr.write(line + "\n")
    return code


class _MpiTransport:
    """A host buffer, reduced and broadcast by MPI."""

    def __init__(self, world: World):
        self.world = world

    def allreduce_(self, buf: Any, what: str) -> None:
        self.world.allreduce_(buf, what)

    def broadcast_(self, buf: Any, what: str) -> None:
        self.world.broadcast_(buf, what)


class _NcclTransport:
    """A GPU buffer, reduced and broadcast by NCCL on the current stream; MPI carries the unique id."""

    def __init__(self, world: World, runtime: Any = None):
        if runtime is None:
            from tinygpt.cuda.nccl import Runtime
            runtime = Runtime()
        self.world, self.rt = world, runtime
        self.gpu = world.use_gpu(runtime)
        uid = np.zeros(128, dtype=np.int8)                 # ncclUniqueId: 128 bytes
        if world.is_main:
            uid[:] = runtime.unique_id()
        world.broadcast_(uid, "the broadcast of the NCCL unique id")
        self.comm = runtime.communicator(world.world_size, tuple(int(v) for v in uid), world.rank)

    def allreduce_(self, buf: Any, what: str) -> None:
        p = self.rt.pointer(buf)
        self.comm.allReduce(p, p, buf.size, self.rt.nccl_type(buf.dtype), self.rt.SUM, self.rt.stream())
        self._finish(what)

    def broadcast_(self, buf: Any, what: str) -> None:
        self.comm.bcast(self.rt.pointer(buf), buf.size, self.rt.nccl_type(buf.dtype), 0, self.rt.stream())
        self._finish(what)

    def _finish(self, what: str) -> None:
        event = self.rt.record_event()
        self.world.poll(lambda: event.done, what, on_timeout=self.comm.abort)


class DistributedDataParallel:
    """Run `model(x, y) -> (logits, loss)` on this rank's rows of each batch; sync() all-reduces the
    gradients (see the module doc). Parameters are broadcast from rank 0 when it is made.

    The transport is MPI for a model on the CPU, NCCL for one on "cuda"; `runtime` (what
    tinygpt.cuda.nccl.Runtime offers, for the tests a stand-in) makes it NCCL's with that runtime."""

    def __init__(self, model: Any, world: World | None = None, runtime: Any = None):
        self.world = world or init()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        dev = backend.device_of(self.params[0].data)
        dtypes = {p.data.dtype for p in self.params}
        if len(dtypes) != 1:
            raise DistributedError(f"the parameters must share one dtype to travel in one buffer, got {dtypes}")
        sizes = [int(p.data.size) for p in self.params]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        n = self._offsets[-1]
        # [ gradients (n) | has-a-gradient count per parameter | loss | stop flag ]: made once, reused
        self.buffer = dev.xp.zeros(n + len(self.params) + 2, dtype=dtypes.pop())
        self._small = dev.xp.zeros(2, dtype=self.buffer.dtype)       # evaluation: [loss, stop flag]
        self.transport = (_MpiTransport(self.world) if dev.name == "cpu" and runtime is None
                          else _NcclTransport(self.world, runtime))
        self.device = dev
        self.stop_agreed = False         # some rank asked to stop, as of the last collective (same on all)
        self._stop_local = False
        self.broadcast_parameters()

    def close(self) -> None:
        """Nothing to stop: the ranks are the launcher's. (The trainer closes DataParallel and this alike.)"""

    def _views(self):
        for p, lo, hi in zip(self.params, self._offsets, self._offsets[1:]):
            yield p, self.buffer[lo:hi]

    def broadcast_parameters(self) -> None:
        """Every rank's parameters ← rank 0's (in place: an optimizer's references stay valid)."""
        for p, view in self._views():
            view[...] = p.data.reshape(-1)
        self.transport.broadcast_(self.buffer, "the broadcast of the parameters")
        for p, view in self._views():
            p.data[...] = view.reshape(p.data.shape)

    # --- one step ----------------------------------------------------------------------------------------
    def _rows(self, x: Any, y: Any) -> tuple:
        xa, ya = getattr(x, "data", x), getattr(y, "data", y)
        B = xa.shape[0]
        edges = split_rows(B, self.world.world_size)
        lo, hi = edges[self.world.rank], edges[self.world.rank + 1]
        return xa[lo:hi], ya[lo:hi], (hi - lo) / B

    def forward_backward(self, x: Any, y: Any, grad_scale: float = 1.0) -> Any:
        """Add grad_scale · W · (n_r / B) · ∇(mean loss of this rank's rows) into .grad (sync() sums and
        scales); return this rank's share of the batch's mean loss, (n_r / B) · L_r, a 0-d array."""
        xs, ys, share = self._rows(x, y)
        with self._own_dropout_stream():
            if share == 0:                              # more ranks than rows: nothing to do here
                return self.device.xp.zeros((), dtype=self.buffer.dtype)
            _, loss = self.model(tinygpt.tensor(xs), tinygpt.tensor(ys))
            (loss * (grad_scale * self.world.world_size * share)).backward()
        return loss.data * share

    def sync(self, share: Any) -> Any:
        """All-reduce the gradients (SUM, then scale by 1/W) and the loss; every rank's .grad is then the
        batch's gradient. `share`: this rank's forward_backward result(s) summed. Returns the batch's loss."""
        buf, W = self.buffer, self.world.world_size
        n = self._offsets[-1]
        for i, (p, view) in enumerate(self._views()):
            if p.grad is None:
                view[...] = 0
            else:
                view[...] = p.grad.reshape(-1)
            buf[n + i] = p.grad is not None
        buf[-2] = share * W
        buf[-1] = self._stop_local
        self.transport.allreduce_(buf, "the all-reduce of the gradients")
        buf /= buf.dtype.type(W)
        tail = backend.to_numpy(buf[n:])                # the counts and the flag, on the host (one sync)
        self.stop_agreed = bool(tail[-1] > 0)
        for i, (p, view) in enumerate(self._views()):
            p.grad = view.reshape(p.data.shape) if tail[i] > 0 else None    # views of the buffer until
        return buf[-2].copy()                                               # the next sync

    def loss(self, x: Any, y: Any) -> Any:
        """The batch's mean loss, forward only, this rank on its rows (for evaluation, under no_grad in
        eval mode); all ranks get it, and agree on the stop flag. A 0-d array."""
        xs, ys, share = self._rows(x, y)
        small = self._small
        small[0] = 0
        if share:
            with tinygpt.no_grad():
                small[0] = self.model(tinygpt.tensor(xs), tinygpt.tensor(ys))[1].data * share
        small[1] = self._stop_local
        self.transport.allreduce_(small, "the all-reduce of an evaluation loss")
        self.stop_agreed = bool(backend.to_numpy(small[1]) > 0)
        return small[0].copy()

    def agree_stop(self, requested_here: bool) -> bool:
        """Note a stop asked for on this rank (it travels with the next collective); return whether the
        ranks have agreed to stop, as of the last one: the same answer on every rank."""
        self._stop_local = self._stop_local or bool(requested_here)
        return self.stop_agreed

    @contextlib.contextmanager
    def _own_dropout_stream(self):
        """This rank's dropout generator for one micro-batch: seeded by one draw from the shared host
        generator (the same draw on every rank) and the rank; the shared generator is put back after."""
        seed = int(backend.host_rng().integers(2 ** 62))
        own = int(np.random.default_rng([seed, self.world.rank]).integers(2 ** 62))
        shared = backend.get_rng_state()
        backend.set_rng_state(np.random.default_rng(own).bit_generator.state)
        dev, old = self.device, self.device.rng
        if dev.name != "cpu":
            dev.rng = dev.xp.random.default_rng(own)
        try:
            yield
        finally:
            backend.set_rng_state(shared)
            if dev.name != "cpu":
                dev.rng = old
