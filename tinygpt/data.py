"""Corpora, encoded-id caches and random training batches.

The pipeline, as in "Let's build GPT"::

    text = load_text("shakespeare")                  # one big str
    ids = encode_cached(text, tok, name="shakespeare")  # 1-D uint16 memmap
    train, val = train_val_split(ids, 0.9)
    x, y = get_batch(train, batch_size=4, block_size=8, rng=rng)  # (B, T) each

We never feed the whole text at once. `get_batch` cuts `B` random
windows of `T + 1` tokens; `x = window[:-1]` and `y = window[1:]`, so
`y[b, t]` is the token that follows `x[b, :t + 1]`. One `(B, T)` batch
therefore holds `B * T` training examples, one for every context length
from 1 to `T`.

Corpora (`load_text(source)`):

* a path to a UTF-8 `.txt` file, or to a folder of `.txt` files;
* `"shakespeare"` -- Tiny Shakespeare (1,115,394 characters, 65 symbols),
  shipped inside the package (`tinygpt/corpora/tinyshakespeare.txt.gz`) and
  checked by sha256 on every load: offline, nothing written
  (`shakespeare_text`);
* `"shakespeare-download"` -- the same text, downloaded once into the cache
  (`$TINYGPT_CACHE`, default `~/.cache/tinygpt`) and checked by sha256;
* `"python-stdlib"` -- the running interpreter's own standard-library
  sources, in a fixed order, capped at ~4 MB;
* `None` -- the default, `"shakespeare"`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import numbers
import os
import platform
import re
import sysconfig
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                   "data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"   # name inside the cache folder
# The packaged copy: gzip level 9, mtime 0, no file name (Python's gzip.GzipFile(filename="", mtime=0)).
SHAKESPEARE_PACKAGED = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt.gz"
DOWNLOAD_TIMEOUT = 30.0     # seconds, for load_text("shakespeare-download")
STDLIB_MAX_BYTES = 4_000_000
DEFAULT_SOURCE = "shakespeare"
NAMED_SOURCES = ("shakespeare", "shakespeare-download", "python-stdlib")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests",
              "idle_test", "idlelib", "turtledemo"}


class DataError(ValueError):
    """A corpus that cannot be loaded, or data too short for the request."""


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


# ---- Tiny Shakespeare, shipped with the package -----------------------------

def shakespeare_text() -> str:
    """Tiny Shakespeare (1,115,394 characters, 65 symbols) from the gzip copy
    inside the package: no network, no cache. The decompressed bytes must
    match `SHAKESPEARE_SHA256`, so a damaged install is a
    `DataError`, never a silently different corpus."""
    path = SHAKESPEARE_PACKAGED
    advice = "reinstall tinygpt, or use --data shakespeare-download"
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:      # missing, truncated, bad CRC or header
        raise DataError(f"the packaged Tiny Shakespeare {path} cannot be read "
                        f"({_one_line(e)}); {advice}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"the packaged Tiny Shakespeare {path} is damaged: sha256 {digest[:16]}..., "
                        f"expected {SHAKESPEARE_SHA256[:16]}...; {advice}")
    return raw.decode("utf-8")


# ---- Cache and downloads ---------------------------------------------------

def cache_dir(cache: str | Path | None = None) -> Path:
    """The cache folder: `cache` if given, else `$TINYGPT_CACHE`, else
    `~/.cache/tinygpt`. It is created on demand by the writers."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("TINYGPT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinygpt"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_shakespeare(cache: str | Path | None = None) -> Path | None:
    """Path of a verified cached copy of Tiny Shakespeare, or None."""
    path = cache_dir(cache) / SHAKESPEARE_FILENAME
    if path.is_file() and _sha256_file(path) == SHAKESPEARE_SHA256:
        return path
    return None


def download_shakespeare(url: str | None = None, *, timeout: float = DOWNLOAD_TIMEOUT,
                         cache: str | Path | None = None) -> Path:
    """Return the cached Tiny Shakespeare file, downloading it if needed (the
    `"shakespeare-download"` corpus; `"shakespeare"` needs no network).

    The URL is `url`, else `$TINYGPT_SHAKESPEARE_URL`, else
    `SHAKESPEARE_URL` (`file://` URLs work too). Bytes stream into a
    temporary file in the cache folder; only after the sha256 matches is it
    renamed into place (`os.replace` is atomic), so a failed or corrupted
    download never leaves a partial file behind.
    """
    found = cached_shakespeare(cache)
    if found is not None:
        return found
    url = url or os.environ.get("TINYGPT_SHAKESPEARE_URL", "").strip() or SHAKESPEARE_URL
    dest = cache_dir(cache) / SHAKESPEARE_FILENAME
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tinyshakespeare-", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to the cache folder {dest.parent} ({_one_line(e)}); "
                        f"set TINYGPT_CACHE to a writable folder") from None
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            while block := r.read(1 << 16):
                f.write(block)
                digest.update(block)
        if digest.hexdigest() != SHAKESPEARE_SHA256:
            raise DataError(f"download from {url} has sha256 {digest.hexdigest()[:16]}..., "
                            f"expected {SHAKESPEARE_SHA256[:16]}...; the file was discarded, "
                            f"check the URL or put the right file at {dest}")
        os.replace(tmp, dest)
    except DataError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DataError(f"could not download Tiny Shakespeare from {url} ({_one_line(e)}); "
                        f"check the network, or use 'shakespeare' (the copy shipped with tinygpt, "
                        f"offline)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def build_stdlib_corpus(max_bytes: int = STDLIB_MAX_BYTES) -> str:
    """Concatenate this interpreter's standard-library `.py` sources.

    Deterministic: a sorted walk of `sysconfig.get_paths()["stdlib"]` that
    skips test folders and site-packages, keeps files that decode as UTF-8,
    puts a `# ---- path ----` header before each, and stops before the first
    file that would take the total past `max_bytes` UTF-8 bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test"):
                continue
            path = Path(dirpath) / name
            try:
                source = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            piece = f"# ---- {path.relative_to(root).as_posix()} ----\n{source}"
            piece += "" if piece.endswith("\n") else "\n"
            size = len(piece.encode("utf-8"))
            if total + size > max_bytes:
                return "".join(parts)
            parts.append(piece)
            total += size
    if not parts:
        raise DataError(f"found no readable .py files under the standard library at {root}; "
                        f"pass a .txt corpus instead")
    return "".join(parts)


def _write_atomic(path: Path, data, write=None, suffix: str = ".part") -> None:
    """Write `data` (bytes, or anything `write(file, data)` takes) to a temporary file beside
    `path`, then rename it into place: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if write is None:
                f.write(data)
            else:
                write(f, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stdlib_corpus_path(cache: str | Path | None = None,
                       max_bytes: int = STDLIB_MAX_BYTES) -> Path:
    """Build the python-stdlib corpus once per interpreter version; return its path."""
    path = cache_dir(cache) / f"python-stdlib-{platform.python_version()}-{max_bytes}.txt"
    if not path.is_file():
        try:
            _write_atomic(path, build_stdlib_corpus(max_bytes).encode("utf-8"))
        except OSError as e:
            raise DataError(f"cannot write the python-stdlib corpus to {path} "
                            f"({_one_line(e)}); set TINYGPT_CACHE to a writable folder") from None
    return path


# ---- Choosing and reading a corpus -----------------------------------------

def resolve_source(source: str | Path | None = None) -> str | Path:
    """`source` unchanged, or `DEFAULT_SOURCE` (the packaged Tiny
    Shakespeare) for `None`."""
    return DEFAULT_SOURCE if source is None else source


def _read_txt(path: Path) -> str:
    if path.suffix.lower() != ".txt":
        raise DataError(f"corpus file {path} has suffix {path.suffix!r}; only UTF-8 .txt "
                        f"files are accepted (rename or convert it)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not valid UTF-8 (bad byte "
                        f"{data[e.start]:#04x} at offset {e.start}); re-save it as UTF-8") from None


def load_text(source: str | Path | None = None, *, cache: str | Path | None = None,
              timeout: float = DOWNLOAD_TIMEOUT) -> str:
    """Read a corpus into one `str`.

    `source`: one of `NAMED_SOURCES`, a `.txt` path, a folder (all
    `*.txt` inside it, recursively, in sorted path order, each ending with a
    newline), or `None` for the default corpus. A named corpus wins over a
    same-named path; write `./shakespeare` to mean the folder. `timeout`
    only applies to `"shakespeare-download"`.
    """
    source = resolve_source(source)
    if source == "shakespeare":
        return shakespeare_text()
    if source == "shakespeare-download":
        return download_shakespeare(timeout=timeout, cache=cache).read_text(encoding="utf-8")
    if source == "python-stdlib":
        return stdlib_corpus_path(cache).read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus folder {path} contains no .txt files; add some or "
                            f"pass a file")
        texts = [_read_txt(p) for p in files]
        text = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
    elif path.is_file():
        text = _read_txt(path)
    else:
        raise DataError(f"corpus {str(source)!r} is neither a file, a folder, nor one of "
                        f"{', '.join(NAMED_SOURCES)}; check the spelling or the path")
    if not text:
        raise DataError(f"corpus {path} is empty; give it some text")
    return text


# ---- Encoded ids: cached, memory-mapped ------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_cached(text: str, tokenizer, *, name: str = "corpus",
                  cache: str | Path | None = None) -> np.ndarray:
    """`tokenizer.encode(text)` as a read-only, memory-mapped 1-D array.

    The ids live in `<cache>/tokens/<name>-<key>.npy` with
    `key = sha256(sha256(text) : tokenizer.fingerprint)`, stored as uint16
    (uint32 for vocabularies over 65536). The second call, or the next run,
    just maps the file: nothing is re-encoded and the ids need not fit in RAM
    (nanoGPT's `train.bin` idea). `name` only makes the file name readable.
    The cache heals: a file that does not load, has the wrong size, dtype or
    shape, or holds an id outside the vocabulary is encoded again and replaced;
    a cache that cannot be written (read-only, full) gives the ids from memory.
    """
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{text_hash}:{tokenizer.fingerprint}".encode()).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:64] or "corpus"
    path = cache_dir(cache) / "tokens" / f"{safe}-{key}.npy"
    dtype = token_dtype(tokenizer.vocab_size)
    if path.is_file():
        ids = _load_cached_ids(path, dtype, tokenizer.vocab_size)
        if ids is not None:
            return ids
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    if ids.size == 0:
        raise DataError(f"corpus {name!r} encodes to zero tokens; give it some text")
    ids = ids.astype(dtype)
    try:
        _remove_old_temps(path.parent)
        _write_atomic(path, ids, np.save, suffix=".npy.tmp")
    except OSError:                         # the cache is an optimisation: carry on from memory
        ids.flags.writeable = False
        return ids
    loaded = _load_cached_ids(path, dtype, tokenizer.vocab_size)
    return loaded if loaded is not None else ids


def _load_cached_ids(path: Path, dtype: np.dtype, vocab_size: int) -> np.ndarray | None:
    """The memory-mapped ids in `path`, or None if the file is damaged in any way we can see."""
    try:
        ids = np.load(path, mmap_mode="r")
        ok = (isinstance(ids, np.memmap) and ids.ndim == 1 and ids.dtype == dtype and ids.size > 0
              and path.stat().st_size == ids.offset + ids.nbytes          # nothing cut off or appended
              and int(ids.max()) < vocab_size)
    except (OSError, ValueError, EOFError):   # empty, truncated header, not .npy, pickled objects...
        return None
    return ids if ok else None


def _remove_old_temps(folder: Path, age_s: float = 3600.0) -> None:
    """Delete the temporary files of killed cache writers (older than an hour: none is still writing)."""
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        try:
            if time.time() - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass


def train_val_split(ids, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """First `int(n * train_fraction)` ids for training, the rest for
    validation. No shuffling: the val set is a later, unseen stretch of text.
    Returns views (no copy), so memory-mapped ids stay memory-mapped."""
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be strictly between 0 and 1, got "
                        f"{train_fraction!r}; 0.9 is usual")
    ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    n = len(ids)
    n_train = int(n * train_fraction)
    if n_train == 0 or n_train == n:
        raise DataError(f"splitting {n} ids at train_fraction={train_fraction} leaves an "
                        f"empty {'train' if n_train == 0 else 'val'} set; use more text")
    return ids[:n_train], ids[n_train:]


# ---- Batches ---------------------------------------------------------------

def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def get_batch(data, batch_size: int, block_size: int, rng: np.random.Generator,
              device=None):
    """(x, y), int64 Tensors of shape (B, T): B windows of T + 1 tokens from `data` (1-D ids, length N),
    x[b] = data[s_b : s_b + T], y[b] = data[s_b + 1 : s_b + T + 1], each start s_b uniform over the N - T
    valid starts. `rng` (a numpy.random.Generator) makes it repeatable; `device`: "cpu", "cuda", or None
    for $TINYGPT_DEVICE, else "cpu".

    The `(B, T + 1)` windows are gathered with one fancy index on the host,
    moved to the device in one copy, and `x` / `y` are views of that copy.
    On CUDA the copy is asynchronous, from a pinned staging buffer
    (`backend.upload`): the host does not wait for the GPU.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    batch_size = _check_positive_int("batch_size", batch_size)
    block_size = _check_positive_int("block_size", block_size)
    data = data if isinstance(data, np.ndarray) else np.asarray(data)
    if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        raise DataError(f"data must be a 1-D integer array of token ids, got shape "
                        f"{data.shape} and dtype {data.dtype}")
    n = len(data)
    if n < block_size + 1:
        raise DataError(f"data has {n} tokens, but block_size={block_size} needs at least "
                        f"block_size + 1 = {block_size + 1}; use a smaller block_size or "
                        f"more text")
    starts = rng.integers(0, n - block_size, size=batch_size)       # (B,)
    index = starts[:, None] + np.arange(block_size + 1)             # (B, T+1)
    windows = np.array(data[index], dtype=np.int64)                 # host copy

    import tinygpt                          # late import: tinygpt imports this module
    from tinygpt.backend import upload
    xy = upload(windows, device)            # the one host -> device copy (on CUDA: pinned, asynchronous)
    return tinygpt.tensor(xy[:, :-1], device=device), tinygpt.tensor(xy[:, 1:], device=device)
