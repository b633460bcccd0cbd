"""The out-dir of a training run: one writer at a time, what killed writers left behind, and log.jsonl.

    lock = OutDirLock(out_dir).acquire()       # OutDirBusyError (one line) if another run holds it
    remove_stale_temps(out_dir)                # temporary files of saves that were killed
    prepare_log(log_path, upto=iter, record=checkpoint's last log record)   # on resume
    append_log(log_path, record)               # strict JSON: nan/inf become the strings "nan"/"inf"
    lock.release()

The lock is an advisory fcntl.flock on `out_dir/.tinygpt.lock`, taken without waiting: a second `tinygpt
train` or `--resume` into a busy out-dir fails at once, before it reads or writes anything there, and the
check "does a checkpoint exist?" runs under the lock (no check-then-write race). The kernel drops the lock
when its holder dies, however it dies (a SIGKILL leaves the file behind, unlocked: the next run takes it);
forked children (the data-parallel workers) close their copy, so a worker can never keep an out-dir
locked. Not on Windows (no fcntl): there the lock is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import weakref
from pathlib import Path

from tinygpt import checkpoint

try:
    import fcntl
except ImportError:                                 # pragma: no cover - Windows
    fcntl = None

__all__ = ["OutDirBusyError", "OutDirLock", "LOCK_NAME", "remove_stale_temps", "append_log", "prepare_log",
           "read_log", "strict_json", "plot_log", "StopSignals"]

LOCK_NAME = ".tinygpt.lock"
_held: "weakref.WeakSet[OutDirLock]" = weakref.WeakSet()


class OutDirBusyError(OSError):
    """Another process is training into this out-dir (it holds the out-dir's lock)."""


class OutDirLock:
    """An exclusive, non-blocking flock on out_dir/.tinygpt.lock (the file holds the holder's pid)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> "OutDirLock":
        if self.fd is not None or fcntl is None:
            return self
        self.created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:                         # BlockingIOError: someone holds it
                os.close(fd)
                raise OutDirBusyError(f"{str(self.out_dir)!r} is in use by another tinygpt train{self._holder()}; "
                                      f"wait for it to finish, or pass another --out-dir") from None
            try:                                    # still the file at the path (not one a releaser unlinked)?
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held.add(self)
        return self

    def _holder(self) -> str:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})"

    def release(self, remove_dir: bool = False) -> None:
        """Drop the lock and delete the lock file (while still holding it: a process that opened the old
        file finds it unlinked after its flock, and opens the path again). remove_dir=True (a run that
        failed to start): also remove the out-dir if this lock created it and it is empty."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        _held.discard(self)
        if remove_dir and self.created_dir:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass

    def __del__(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


def _close_in_child() -> None:
    """After fork: close the child's copies of held locks (never LOCK_UN: that would unlock the parent)."""
    for lock in list(_held):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Delete what killed writers left in out_dir: checkpoint, log and plot temporaries. Call it only while
    holding the out-dir's lock (no live writer can own them then)."""
    out_dir = Path(out_dir)
    return (checkpoint.remove_stale_temps(out_dir)
            + checkpoint.remove_files((out_dir / "log.jsonl.tmp", out_dir / ".loss.png.tmp.png")))


# --- how a run is asked to stop ---------------------------------------------------------------------------
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopSignals:
    """First Ctrl-C, SIGTERM or SIGHUP: set a flag that the loop checks between iterations (so it stops at
    a clean point and saves). A second one: KeyboardInterrupt. Only installable from the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# --- log.jsonl ----------------------------------------------------------------------------------------------
def strict_json(value):
    """`value` with every non-finite float as the string "nan", "inf" or "-inf" (float() reads them back),
    so json.dumps(..., allow_nan=False) accepts it and any JSON parser reads the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def append_log(path: Path, record: dict) -> None:
    """Append one strict-JSON line and flush it to the disk."""
    line = json.dumps(strict_json(record), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_log(path: Path) -> list[dict]:
    """The records of log.jsonl that parse as JSON objects (a line cut short by a full disk is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def prepare_log(path: Path, upto: int, record: dict | None = None) -> None:
    """Before a run writes to log.jsonl: drop the lines after iteration `upto` (a run killed after a log
    line but before its checkpoint; a fresh run passes upto=-1), and add `record`, the checkpoint's own
    copy of its last log line, if the log lacks it (a run killed after the checkpoint but before its
    line). Rewrites the file atomically, and only when something changes."""
    if not path.is_file() and record is None:
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    keep, iters = [], set()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter", 0), int) and row.get("iter", 0) <= upto:
            keep.append(line if line.endswith("\n") else line + "\n")
            iters.add(row.get("iter"))
    if record is not None and record.get("iter") not in iters and record.get("iter", upto + 1) <= upto:
        keep.append(json.dumps(strict_json(record), allow_nan=False) + "\n")
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)
        finally:                                # a full disk: the old log stays, no half-written copy
            if tmp.exists():
                tmp.unlink()


def plot_log(log_path: Path, png_path: Path) -> Path | None:
    """Loss curves from log.jsonl as a PNG, when matplotlib is installed (pip install "tinygpt[plot]").
    The plot is derived data: if it cannot be drawn or written (a full disk), the run goes on without it."""
    try:
        return _plot(log_path, png_path)
    except Exception:
        tmp = png_path.with_name(f".{png_path.name}.tmp.png")
        if tmp.exists():
            tmp.unlink()
        return None


def _plot(log_path: Path, png_path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in read_log(log_path) if "iter" in r]
    if not rows:
        return None

    def number(v) -> float:                   # "nan" and "inf" (strict JSON) read back as floats
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    fig, ax = plt.subplots(figsize=(7, 4))
    its = [r["iter"] for r in rows]
    ax.plot(its, [number(r.get("train_loss")) for r in rows], label="train")
    ax.plot(its, [number(r.get("val_loss")) for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
