"""The CPU's threads: one team that the GEMMs and the elementwise kernels share, like PyTorch's intra-op pool.

Why a team of our own, and BLAS on one thread. NumPy releases the GIL inside a ufunc loop and a GEMM, so
Python threads can keep two cores busy. But OpenBLAS has threads of its own, and after each GEMM they spin
on the other cores for a while, waiting for the next one (OPENBLAS_THREAD_TIMEOUT, read once when NumPy
loads). A kernel that hands half its work to a thread of ours right after a GEMM finds that core taken.
Measured on the 2-core box: a GEMM then a half-and-half attention forward took 2.30 ms with OpenBLAS on 2
threads and 2.89 ms on 1, against 2.28 ms for the GEMM then the attention on one thread alone; so
threading gained nothing next to OpenBLAS's threads. So while the team has more than one thread, NumPy's
BLAS runs on one (threadpoolctl), and a big GEMM is split by rows over the team (cpu_kernels.matmul):
3-5% slower than OpenBLAS's own 2 threads, and the elementwise work gains the second core back.

A hand-off to a worker costs 10-40 µs here (a sleeping vCPU has to be woken), so work is shared out only
where each part is worth it: whole-op tasks (half the batch of an attention, one of a Linear's two
backward GEMMs) rather than single ufunc calls.

`TINYGPT_NUM_THREADS` (or set_num_threads) sets the team's size; 1 means no team, and BLAS left alone.
A team started inside a task, or from a second thread while the team is busy, runs its tasks inline.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Sequence

BLOCK = 65536            # elements per cache block: 256 KiB of float32. A block and its 2-3 temporaries
                         # still fit a 1 MiB L2, and each NumPy call (~1 µs of overhead) does enough work:
                         # 20-25% faster than 16K blocks for GELU, softmax, layer norm and AdamW here
MIN_PARALLEL = 1 << 18   # elements below which an elementwise kernel runs inline (see parallel_blocks)


def num_cores() -> int:
    """Cores to use: $TINYGPT_NUM_THREADS, else the cores this process may run on."""
    env = os.environ.get("TINYGPT_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


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


# --- the team -------------------------------------------------------------------------------------------
class _Worker:
    """One thread that runs the jobs handed to it, one at a time: `go` starts a job, `done` ends it."""

    def __init__(self, index: int) -> None:
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job: Callable[[], None] | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, name=f"tinygpt-{index}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.go.acquire()
            job, self.job = self.job, None
            if job is None:                # Team.close
                return
            try:
                job()
            except BaseException as e:     # handed to the caller of Team.run
                self.error = e
            finally:
                self.done.release()


class Team:
    """n - 1 worker threads plus the calling thread. run(tasks) shares a list of tasks among them."""

    def __init__(self, n: int) -> None:
        self.size = n
        self._busy = threading.Lock()
        self._workers = [_Worker(i) for i in range(1, n)]
        self.runs = 0                      # run() calls that used the workers (the tests count them)

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Call every task once and return when all are done: the caller takes the first share of the
        list, each worker a later one (contiguous shares, as even as the count allows). A task's exception
        is raised here, after every task has finished."""
        parts = min(self.size, len(tasks))
        if parts <= 1 or not self._busy.acquire(blocking=False):    # nested, or busy: inline
            for task in tasks:
                task()
            return
        try:
            self.runs += 1
            edges = [len(tasks) * i // parts for i in range(parts + 1)]
            started = []
            for w, lo, hi in zip(self._workers, edges[1:-1], edges[2:]):
                w.job = _in_order(tasks[lo:hi])
                w.go.release()
                started.append(w)
            error = None
            try:
                _in_order(tasks[:edges[1]])()
            except BaseException as e:
                error = e
            for w in started:              # wait for every worker, even through Ctrl-C: they write our arrays
                while True:
                    try:
                        w.done.acquire()
                        break
                    except KeyboardInterrupt as e:
                        error = error or e
                error, w.error = error or w.error, None
            if error is not None:
                raise error
        finally:
            self._busy.release()


    def close(self) -> None:
        """End the worker threads (a team of another size replaces this one)."""
        with self._busy:
            for w in self._workers:
                w.job = None
                w.go.release()
            self._workers = []


def _in_order(tasks: Sequence[Callable[[], None]]) -> Callable[[], None]:
    def job() -> None:
        for task in tasks:
            task()
    return job


_team: Team | None = None


def _forget_team_after_fork() -> None:
    """A forked child has none of its parent's threads: its team must be made anew there."""
    global _team
    _team = None


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


def edges(n: int, parts: int, align: int = 1) -> list:
    """parts + 1 cut points of [0, n), as even as `align` (a multiple every cut but the last falls on) allows."""
    return [(n * i // parts) // align * align for i in range(parts)] + [n]


def parallel_blocks(fn: Callable[[int, int], None], n: int, block: int = BLOCK, align: int = 1,
                    item_size: int = 1) -> None:
    """Call fn(lo, hi) over [0, n) in blocks of about `block` items, split evenly among the threads.

    `align`: block edges fall on multiples of it (so a block holds whole matrices). `item_size`: elements
    per item (a row's length), to judge whether the work is big enough to share out.
    """
    block = max(align, block // align * align)

    def over(lo: int, hi: int) -> Callable[[], None]:
        def task() -> None:
            for s in range(lo, hi, block):
                fn(s, min(s + block, hi))
        return task

    parts = num_threads() if n * item_size >= MIN_PARALLEL else 1
    parts = max(1, min(parts, n // align))
    if parts > 1:        # shared out: fewer, longer NumPy calls (a call under ~10 µs gains nothing from a
        # second thread: the two take turns at the GIL), up to 4 cache blocks at once
        block = max(block, min(-(-n // parts), 4 * block) // align * align)
    cuts = edges(n, parts, align)
    run([over(cuts[i], cuts[i + 1]) for i in range(parts)])
