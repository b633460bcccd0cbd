"""The CPU's threads: one team that the GEMMs and the elementwise kernels share, like PyTorch's intra-op pool.

Why a team of our own, and BLAS on one thread. NumPy releases the GIL inside a ufunc loop and a GEMM, so
Python threads can keep two cores busy. But OpenBLAS has threads of its own, and after each GEMM they spin
on the other cores for a while, waiting for the next one (OPENBLAS_THREAD_TIMEOUT, read once when NumPy
loads). A kernel that hands half its work to a thread of ours right after a GEMM finds that core taken:
measured on the 2-core box, a (2048, 128) x (128, 512) GEMM on OpenBLAS's 2 threads followed by an attention
forward split over 2 of our threads took 2.30 ms, no less than with the attention on one thread (2.28 ms).
So while the team has more than one thread, NumPy's BLAS runs on one (threadpoolctl), and big GEMMs are
cut by rows over the team (tinygpt/cpu_linear.py): about as fast as OpenBLAS's own threads, and the
second core is free for the rest.

Two ways to hand out work:
  run(tasks)        the caller takes the first share and waits for the rest; a share that no worker has
                    started (it is waking, which costs 10-40 µs on a VM whose idle cores sleep, or busy)
                    is taken back by the caller.
  submit(fn, writes) an async job: the caller goes on at once. Linear's backward hands its weight
                    gradients to a worker this way; Tensor.backward calls wait() at its end, and the engine
                    calls ready(array) before it reads an array a job may still be writing.
Shares are cut by the count alone, never by timing, so results do not depend on which thread ran what.

`TINYGPT_NUM_THREADS` (or set_num_threads) sets the team's size; 1 means no team, and BLAS left alone.
A run started inside a task, or from a second thread while the team is busy, runs its tasks inline.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, Sequence

BLOCK = 65536            # elements per cache block: 256 KiB of float32. A block and its 2-3 temporaries
                         # still fit a 1 MiB L2, and each NumPy call (~1 µs of overhead) does enough work:
                         # 20-25% faster than 16K blocks for GELU, softmax, layer norm and AdamW here
MIN_PARALLEL = 1 << 18   # elements below which an elementwise kernel runs inline (see parallel_blocks)


def num_cores() -> int:
    """Cores to use: $TINYGPT_NUM_THREADS, else the cores this process may run on."""
    env = os.environ.get("TINYGPT_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if not _affinity:                      # a system call: asked once per process (the ops ask ~180 times a step)
        try:
            _affinity.append(max(1, len(os.sched_getaffinity(0))))
        except AttributeError:
            _affinity.append(max(1, os.cpu_count() or 1))
    return _affinity[0]


_affinity: list = []


_limit: int | None = None                 # set_num_threads' cap (data-parallel processes use 1)


def num_threads() -> int:
    """Threads the team shares work among: num_cores(), capped by set_num_threads()."""
    n = num_cores()
    return n if _limit is None else max(1, min(n, _limit))


def set_num_threads(n: int | None) -> int | None:
    """Cap the team at n threads (None: no cap); returns the previous cap."""
    global _limit
    old, _limit = _limit, n
    return old


# --- BLAS on one thread -----------------------------------------------------------------------------
_blas_controller: list = []


def blas_single_thread():
    """Limit the BLAS libraries loaded in this process (NumPy's OpenBLAS) to one thread; returns the
    threadpoolctl limiter (its restore_original_limits() undoes it), or None without threadpoolctl.
    torch's intra-op threads are OpenMP's, not BLAS's: a torch loaded beside it keeps them."""
    if not _blas_controller:
        try:
            from threadpoolctl import ThreadpoolController
            _blas_controller.append(ThreadpoolController())
        except ImportError:
            _blas_controller.append(None)
    if _blas_controller[0] is None:
        return None
    return _blas_controller[0].limit(limits=1, user_api="blas")


def blas_info() -> dict:
    """What NumPy's BLAS is and which kernels it runs, for benchmark reports: {"library", "version",
    "kernels" (OpenBLAS's name for the CPU it tuned for: Haswell = AVX2, SkylakeX = AVX-512), "threads"},
    plus "forced_by" when $OPENBLAS_CORETYPE picked the kernels instead of the CPU (some machines set it
    for old OpenBLAS builds; a current NumPy's GEMMs can run at half speed under it). {} without
    threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    lib = next((lib for lib in blas if "numpy" in lib.get("filepath", "")), blas[0] if blas else None)
    if lib is None:
        return {}
    out = {"library": lib.get("internal_api"), "version": lib.get("version"),
           "kernels": lib.get("architecture"), "threads": lib.get("num_threads")}
    if lib.get("internal_api") == "openblas" and os.environ.get("OPENBLAS_CORETYPE"):
        out["forced_by"] = "OPENBLAS_CORETYPE=" + os.environ["OPENBLAS_CORETYPE"]
    return out


# --- the team -------------------------------------------------------------------------------------------
class _Job:
    """One piece of work for a worker; `done` is held until it has run (its exception kept for the caller)."""
    __slots__ = ("fn", "done", "error", "finished")

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn, self.error, self.finished = fn, None, False
        self.done = threading.Lock()
        self.done.acquire()

    def wait(self) -> None:
        """Block until the job has run, even through Ctrl-C (it writes arrays the caller owns); raise its
        exception, once."""
        interrupted = None
        while True:
            try:
                self.done.acquire()
                break
            except KeyboardInterrupt as e:
                interrupted = e
        self.done.release()                # later waits return at once
        error, self.error = self.error, None
        if interrupted is not None:
            raise interrupted
        if error is not None:
            raise error


class _Worker:
    """One thread. It takes shares of the team's current run first (the caller is waiting for those),
    then its own queue of async jobs in order; `_wake` is released once per share or job offered."""

    def __init__(self, team: "Team", index: int) -> None:
        self._team = team
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Semaphore(0)
        self.unfinished: list = []         # async jobs handed here and not yet waited for (caller's list)
        threading.Thread(target=self._loop, name=f"tinygpt-{index}", daemon=True).start()

    def submit(self, fn: Callable[[], None] | None) -> _Job:
        job = _Job(fn)
        self._queue.append(job)
        self._wake.release()
        return job

    def _loop(self) -> None:
        shares = self._team._shares
        while True:
            self._wake.acquire()
            while True:                    # until there is nothing left to take
                try:
                    job = shares.popleft()
                except IndexError:
                    try:
                        job = self._queue.popleft()
                    except IndexError:
                        break
                    if job.fn is None:     # Team.close
                        return
                _run(job)


def _run(job: _Job) -> None:
    try:
        job.fn()
    except BaseException as e:             # handed to whoever waits for the job
        job.error = e
    finally:
        job.finished = True
        job.done.release()


class Team:
    """n - 1 worker threads plus the calling thread. run(tasks) shares a list of tasks among them and
    waits; submit(fn) hands fn to a worker and returns at once (wait() or ready() collects it)."""

    def __init__(self, n: int) -> None:
        self.size = n
        self._busy = threading.Lock()
        self._shares: collections.deque = collections.deque()   # the current run's shares, not yet taken
        self._workers = [_Worker(self, i) for i in range(1, n)]
        self._pending: dict = {}           # id(array) -> the async job that writes it
        self.owner = threading.get_ident() # the thread that may submit async jobs
        self.runs = 0                      # run() and submit() calls that offered work to the workers

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Call every task once and return when all are done. The list is cut into `size` contiguous
        shares (as even as the count allows); the caller runs the first, then takes back any share no
        worker has started yet (a worker may be busy with an async job, or still waking up), then waits
        for the shares the workers took. A task's exception is raised here, after every share is done.

        The cuts depend on the count alone, never on timing: a GEMM's rounding depends on where its rows
        are cut, so the same inputs and thread count give the same bits, whichever thread runs a share."""
        parts = min(self.size, len(tasks))
        if parts <= 1 or not self._busy.acquire(blocking=False):    # nested, or busy: inline
            for task in tasks:
                task()
            return
        try:
            self.runs += 1
            cuts = edges(len(tasks), parts)
            shares = [_Job(_in_order(tasks[lo:hi])) for lo, hi in zip(cuts, cuts[1:])]
            self._shares.extend(shares[1:])
            for w in self._workers[:parts - 1]:
                w._wake.release()
            _run(shares[0])
            while True:                    # take back what no worker has started
                try:
                    job = self._shares.popleft()
                except IndexError:
                    break
                _run(job)
            error = None
            for job in shares:             # every share, even after an error: they write our arrays
                try:
                    job.wait()
                except BaseException as e:
                    error = error or e
            if error is not None:
                raise error
        finally:
            self._busy.release()

    def submit(self, fn: Callable[[], None], writes: Sequence = ()) -> None:
        """Run fn on a worker while the caller goes on; `writes`: the arrays fn fills, which ready()
        waits for. Only the team's owner (the thread that started it) submits; module-level submit() runs
        fn inline on any other thread, and ready() and wait() do nothing there."""
        w = min(self._workers, key=lambda w: len(w.unfinished))
        self.runs += 1
        job = w.submit(fn)
        w.unfinished.append(job)
        if len(w.unfinished) > 64:         # forget the finished ones now and then
            w.unfinished = [j for j in w.unfinished if not j.finished]
        for a in writes:
            self._pending.setdefault(id(a), []).append(job)

    def ready(self, *arrays) -> None:
        """Wait for the async jobs that write any of `arrays`."""
        for a in arrays:
            for job in self._pending.pop(id(a), ()):
                job.wait()

    def wait(self) -> None:
        """Wait for every async job, running here the ones no worker has started (from the back of each
        queue, while the worker takes from the front); raise the first exception among them."""
        error = None
        for w in self._workers:
            while True:
                try:
                    job = w._queue.pop()
                except IndexError:
                    break
                if job.fn is None:         # a close() sentinel stays for the worker
                    w._queue.append(job)
                    break
                _run(job)
        for w in self._workers:
            for job in w.unfinished:
                try:
                    job.wait()
                except BaseException as e:
                    error = error or e
            w.unfinished = []
        self._pending.clear()
        if error is not None:
            raise error

    def close(self) -> None:
        """End the worker threads (a team of another size replaces this one), after their queued jobs."""
        with self._busy:
            for w in self._workers:
                w.submit(None)
            self._workers = []


def _range(fn: Callable[[int, int], None], lo: int, hi: int) -> Callable[[], None]:
    return lambda: fn(lo, hi)


def _in_order(tasks: Sequence[Callable[[], None]]) -> Callable[[], None]:
    def job() -> None:
        for task in tasks:
            task()
    return job


_team: Team | None = None


def _forget_team_after_fork() -> None:
    """A forked child has none of its parent's threads: its team must be made anew there (and its
    cores asked again: a launcher may have pinned it)."""
    global _team
    _team = None
    _affinity.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_team_after_fork)


def team() -> Team | None:
    """The team for num_threads() threads, started on first use (BLAS goes to one thread then); None for 1."""
    global _team
    n = num_threads()
    if n <= 1:
        return None
    if _team is None or _team.size != n:
        blas_single_thread()               # for the rest of the process (the limiter is not kept)
        if _team is not None:
            _team.wait()
            _team.close()
        _team = Team(n)
    return _team


def run(tasks: Sequence[Callable[[], None]]) -> None:
    """Run the tasks on the team (inline without one)."""
    t = team() if len(tasks) > 1 else None
    if t is None:
        for task in tasks:
            task()
    else:
        t.run(tasks)


def both(first: Callable[[], Any], second: Callable[[], Any]) -> tuple:
    """(first(), second()), the two called at once on the team (one after the other without one)."""
    out: list = [None, None]
    run([lambda: out.__setitem__(0, first()), lambda: out.__setitem__(1, second())])
    return out[0], out[1]


def submit(fn: Callable[[], None], writes: Sequence = ()) -> None:
    """Run fn on a worker while the caller goes on (inline without a team, or from a thread other than
    the one that started the team); see Team.submit."""
    t = team()
    if t is None or threading.get_ident() != t.owner:
        fn()
    else:
        t.submit(fn, writes)


def ready(*arrays) -> None:
    """Wait until no async job still writes any of `arrays` (cheap when none does)."""
    if _team is not None and _team._pending and threading.get_ident() == _team.owner:
        _team.ready(*arrays)


def wait() -> None:
    """Wait for every async job (the end of a backward pass); raise the first exception among them."""
    if _team is not None and threading.get_ident() == _team.owner:
        _team.wait()


def edges(n: int, parts: int, align: int = 1) -> list:
    """parts + 1 cut points of [0, n), as even as `align` (a multiple every cut but the last falls on) allows."""
    return [(n * i // parts) // align * align for i in range(parts)] + [n]


def split(fn: Callable[[int, int], None], n: int, parts: int, align: int = 1) -> None:
    """fn(lo, hi) over [0, n) in `parts` contiguous ranges (cut by edges()) at once on the team."""
    parts = max(1, min(parts, n // max(1, align)))
    cuts = edges(n, parts, align)
    run([_range(fn, lo, hi) for lo, hi in zip(cuts, cuts[1:])])


def parallel_blocks(fn: Callable[[int, int], None], n: int, block: int = BLOCK, align: int = 1,
                    item_size: int = 1) -> None:
    """Call fn(lo, hi) over [0, n) in blocks of about `block` items, split among the threads.

    `align`: block edges fall on multiples of it (so a block holds whole matrices). `item_size`: elements
    per item (a row's length), to judge whether the work is big enough to share out.
    """
    block = max(align, block // align * align)
    parts = num_threads() if n * item_size >= MIN_PARALLEL else 1
    parts = max(1, min(parts, n // align))
    if parts > 1:        # shared out: fewer, longer NumPy calls (a call under ~10 µs gains nothing from a
        # second thread: the two take turns at the GIL), up to 4 cache blocks at once
        block = max(block, min(-(-n // parts), 4 * block) // align * align)

    def blocks(lo: int, hi: int) -> None:
        for s in range(lo, hi, block):
            fn(s, min(s + block, hi))

    split(blocks, n, parts, align)
