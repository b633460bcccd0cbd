"""Tests for tinygpt.data: corpora, downloads (local only), id caches, batches."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tinygpt.backend
from tinygpt import data
from tinygpt.data import (DataError, encode_cached, get_batch, load_text, resolve_source,
                          train_val_split)
from tinygpt.tokenizers import BPETokenizer, CharTokenizer

UNREACHABLE = "http://127.0.0.1:9/input.txt"  # discard port: connection refused at once
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # the published file's


@pytest.fixture(scope="module")
def shakespeare_bytes():
    """The packaged corpus as UTF-8 bytes (checked against the published sha256 below)."""
    return data.shakespeare_text().encode("utf-8")


@pytest.fixture
def shakespeare_file(tmp_path, shakespeare_bytes):
    """A local copy of Tiny Shakespeare for the download tests (file:// or a local HTTP server)."""
    path = tmp_path / "input.txt"
    path.write_bytes(shakespeare_bytes)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache and a download URL that cannot reach anything."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TINYGPT_CACHE", str(cache))
    monkeypatch.setenv("TINYGPT_SHAKESPEARE_URL", UNREACHABLE)
    return cache


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving files from a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- load_text ----

def test_load_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo 🎉\n", encoding="utf-8")
    assert load_text(path) == "héllo 🎉\n"
    assert load_text(str(path)) == "héllo 🎉\n"


def test_load_rejects_non_txt_and_non_utf8(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n")
    with pytest.raises(DataError, match=r"'\.csv'.*\.txt"):
        load_text(tmp_path / "a.csv")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8.*0xe9 at offset 3"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="neither a file, a folder"):
        load_text(tmp_path / "missing.txt")


def test_load_folder_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first")  # no final newline: one is added
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert load_text(tmp_path) == "first\nsecond\nthird\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_text(empty)


# ---------------------------------------------------------------- shakespeare --

def test_packaged_shakespeare_is_the_published_text():
    text = data.shakespeare_text()
    assert len(text) == 1_115_394 and len(set(text)) == 65
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256
    assert text.startswith("First Citizen:\nBefore we proceed any further")
    assert load_text("shakespeare") == text == load_text()


def test_packaged_gzip_is_deterministic():
    raw = data.SHAKESPEARE_PACKAGED.read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00"         # gzip, deflate, no flags: no file name stored
    assert raw[4:8] == b"\x00\x00\x00\x00"         # mtime 0: rebuilding gives the same bytes
    assert raw[8] == 2                                # xfl 2: compression level 9
    assert 400_000 < len(raw) < 460_000


def _packaged_copy(tmp_path, monkeypatch, raw: bytes):
    path = tmp_path / "tinyshakespeare.txt.gz"
    path.write_bytes(raw)
    monkeypatch.setattr(data, "SHAKESPEARE_PACKAGED", path)


def test_flipped_byte_in_packaged_file_is_a_data_error(tmp_path, monkeypatch):
    raw = bytearray(data.SHAKESPEARE_PACKAGED.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    _packaged_copy(tmp_path, monkeypatch, bytes(raw))
    with pytest.raises(DataError, match="packaged Tiny Shakespeare .* cannot be read.*reinstall"):
        load_text("shakespeare")


def test_packaged_file_with_other_text_fails_the_sha256(tmp_path, monkeypatch, shakespeare_bytes):
    # a valid gzip (its CRC is fine) of a text with one character changed: only the sha256 can tell
    changed = shakespeare_bytes.replace(b"First Citizen", b"First Citizem", 1)
    _packaged_copy(tmp_path, monkeypatch, gzip.compress(changed, mtime=0))
    with pytest.raises(DataError, match=r"is damaged: sha256 [0-9a-f]{16}\.\.\., expected 86c4e6aa"):
        data.shakespeare_text()


def test_missing_or_truncated_packaged_file_is_a_data_error(tmp_path, monkeypatch):
    raw = data.SHAKESPEARE_PACKAGED.read_bytes()
    _packaged_copy(tmp_path, monkeypatch, raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot be read.*EOFError"):
        data.shakespeare_text()
    monkeypatch.setattr(data, "SHAKESPEARE_PACKAGED", tmp_path / "nowhere.txt.gz")
    with pytest.raises(DataError, match="cannot be read.*FileNotFoundError"):
        data.shakespeare_text()


def test_default_corpus_needs_no_network_and_writes_nothing(isolated_cache, no_network, capsys):
    assert resolve_source(None) == "shakespeare"
    text = load_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256
    assert capsys.readouterr().err == ""                  # no fallback notice
    assert not isolated_cache.exists()                     # no download, no cache


def test_download_from_file_url(isolated_cache, shakespeare_file):
    path = data.download_shakespeare(shakespeare_file.as_uri())
    assert path == isolated_cache / data.SHAKESPEARE_FILENAME
    assert path.read_bytes() == shakespeare_file.read_bytes()
    assert sorted(p.name for p in isolated_cache.iterdir()) == [data.SHAKESPEARE_FILENAME]


def test_download_from_local_http_server(isolated_cache, http_dir, monkeypatch, shakespeare_file):
    root, base = http_dir
    shutil.copy(shakespeare_file, root / "input.txt")
    monkeypatch.setenv("TINYGPT_SHAKESPEARE_URL", f"{base}/input.txt")
    assert load_text("shakespeare-download") == shakespeare_file.read_text(encoding="utf-8")
    assert [p.name for p in isolated_cache.iterdir()] == [data.SHAKESPEARE_FILENAME]
    monkeypatch.setenv("TINYGPT_SHAKESPEARE_URL", UNREACHABLE)     # cached now: no second download
    assert data.cached_shakespeare() == isolated_cache / data.SHAKESPEARE_FILENAME
    assert len(load_text("shakespeare-download")) == 1_115_394


def test_mismatched_download_leaves_no_file(isolated_cache, http_dir):
    root, base = http_dir
    (root / "input.txt").write_text("To be or not to be\n" * 100)
    with pytest.raises(DataError, match="sha256"):
        data.download_shakespeare(f"{base}/input.txt")
    assert list(isolated_cache.iterdir()) == []  # no partial or bad file


def test_failed_download_leaves_no_file(isolated_cache, http_dir):
    _, base = http_dir
    with pytest.raises(DataError, match="could not download.*404"):
        data.download_shakespeare(f"{base}/missing.txt")
    with pytest.raises(DataError, match="could not download"):
        load_text("shakespeare-download")                 # $TINYGPT_SHAKESPEARE_URL is unreachable
    assert list(isolated_cache.iterdir()) == []


def test_download_times_out(isolated_cache):
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/input.txt"
        with pytest.raises(DataError, match="could not download.*timed out"):
            data.download_shakespeare(url, timeout=0.3)
    assert list(isolated_cache.iterdir()) == []


def test_corrupt_cache_is_replaced(isolated_cache, shakespeare_file):
    isolated_cache.mkdir()
    (isolated_cache / data.SHAKESPEARE_FILENAME).write_text("truncated")
    assert data.cached_shakespeare() is None
    path = data.download_shakespeare(shakespeare_file.as_uri())
    assert path.read_bytes() == shakespeare_file.read_bytes()


# ---------------------------------------------------------------- python-stdlib --

def test_python_stdlib_corpus():
    text = load_text("python-stdlib")
    assert 1_000_000 < len(text.encode("utf-8")) <= data.STDLIB_MAX_BYTES
    assert text.startswith("# ---- ")


def test_stdlib_corpus_is_deterministic_and_capped(isolated_cache):
    a = data.build_stdlib_corpus(300_000)
    assert a == data.build_stdlib_corpus(300_000)
    assert 0 < len(a.encode("utf-8")) <= 300_000
    assert "site-packages" not in a.split("\n", 1)[0]
    path = data.stdlib_corpus_path(max_bytes=300_000)
    assert path.parent == isolated_cache and path.read_text(encoding="utf-8") == a


def test_explicit_source_is_returned_unchanged(tmp_path):
    assert resolve_source("python-stdlib") == "python-stdlib"
    assert resolve_source(tmp_path) == tmp_path


# ---------------------------------------------------------------- ids ---------

def test_train_val_split():
    ids = np.arange(100, dtype=np.uint16)
    train, val = train_val_split(ids, 0.9)
    assert len(train) == 90 and len(val) == 10
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert np.shares_memory(train, ids)  # views, not copies
    assert len(train_val_split(list(range(10)), 0.5)[0]) == 5
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(DataError, match="train_fraction"):
            train_val_split(ids, bad)
    with pytest.raises(DataError, match="empty train"):
        train_val_split(np.arange(1), 0.9)


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls."""

    def __init__(self, tok, vocab_size=None):
        self.tok, self.calls = tok, 0
        self.vocab_size = vocab_size or tok.vocab_size
        self.fingerprint = tok.fingerprint + str(self.vocab_size)

    def encode(self, text):
        self.calls += 1
        return self.tok.encode(text)


def test_encode_cached_memmaps_and_reuses(isolated_cache):
    text = "hello world, hello tinygpt\n" * 50
    tok = CountingTokenizer(CharTokenizer.from_text(text))
    ids = encode_cached(text, tok, name="hello/world")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == tok.tok.encode(text)
    again = encode_cached(text, tok, name="hello/world")
    assert tok.calls == 1 and np.array_equal(again, ids)
    files = list((isolated_cache / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy" and "/" not in files[0].name
    bpe = BPETokenizer.train(text, 260)  # another tokenizer -> another file
    assert encode_cached(text, bpe).tolist() == bpe.encode(text)
    assert len(list((isolated_cache / "tokens").iterdir())) == 2
    train, val = train_val_split(ids)
    assert isinstance(train, np.memmap)


def test_encode_cached_large_vocab_uses_uint32():
    text = "abcabc"
    tok = CountingTokenizer(CharTokenizer.from_text(text), vocab_size=70_000)
    assert encode_cached(text, tok).dtype == np.uint32
    assert data.token_dtype(65_536) == np.uint16 and data.token_dtype(65_537) == np.uint32


def _damage(path, how, vocab):
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[:len(raw) - 3])
    elif how == "header_only":
        path.write_bytes(raw[:40])
    elif how == "appended":
        path.write_bytes(raw + b"\x00\x01")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif how == "out_of_range":
        ids = np.load(path)
        ids[len(ids) // 2] = vocab                    # one id just past the vocabulary
        np.save(path, ids)
    elif how == "wrong_dtype":
        np.save(path, np.load(path).astype(np.int64))
    elif how == "two_d":
        np.save(path, np.load(path).reshape(1, -1))
    elif how == "pickled":
        np.save(path, np.array([object()] * 3), allow_pickle=True)


@pytest.mark.parametrize("how", ["empty", "truncated", "header_only", "appended", "garbage", "out_of_range",
                                 "wrong_dtype", "two_d", "pickled"])
def test_damaged_token_cache_is_rebuilt(isolated_cache, how):
    """A damaged cache file is encoded again (the right ids, no traceback) and replaced, so the run after
    it maps a healthy file without encoding."""
    text = "hello world, hello tinygpt\n" * 50
    tok = CountingTokenizer(CharTokenizer.from_text(text))
    truth = tok.tok.encode(text)
    ids = encode_cached(text, tok, name="c")
    path = Path(ids.filename)
    del ids
    _damage(path, how, tok.vocab_size)
    assert encode_cached(text, tok, name="c").tolist() == truth and tok.calls == 2
    again = encode_cached(text, tok, name="c")
    assert again.tolist() == truth and tok.calls == 2 and isinstance(again, np.memmap)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]          # no temp files left


def test_unwritable_token_cache_falls_back_to_memory(isolated_cache):
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "tokens").write_text("a file where the folder should be")
    text = "abcab"
    ids = encode_cached(text, CharTokenizer.from_text(text))
    assert ids.tolist() == [0, 1, 2, 0, 1] and not ids.flags.writeable


def test_old_temp_files_of_killed_cache_writers_are_removed(isolated_cache):
    tokens = isolated_cache / "tokens"
    tokens.mkdir(parents=True)
    old, young = tokens / ".c-abc.npy.tmp", tokens / ".c-def.npy.tmp"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    encode_cached("abc", CharTokenizer.from_text("abc"), name="c")
    assert not old.exists() and young.exists()


def test_shakespeare_char_pipeline(isolated_cache):
    text = load_text("shakespeare")
    tok = CharTokenizer.from_text(text)
    ids = encode_cached(text, tok, name="shakespeare")
    assert len(ids) == len(text) and ids.dtype == np.uint16
    assert encode_cached(load_text("shakespeare"), tok, name="shakespeare").filename == ids.filename
    assert len(list((isolated_cache / "tokens").iterdir())) == 1       # the second load hits the cache
    train, val = train_val_split(ids, 0.9)
    assert len(train) == 1003854 and len(val) == 111540
    x, y = get_batch(train, 4, 8, np.random.default_rng(1337))
    assert x.shape == y.shape == (4, 8)


# ---------------------------------------------------------------- get_batch ---

def test_get_batch_shapes_shift_and_windows():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(ids, 4, 8, np.random.default_rng(0), device="cpu")
    x, y = x.numpy(), y.numpy()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one
    for row_x, row_y in zip(x, y):
        s = row_x[0]
        assert np.array_equal(row_x, ids[s:s + 8]) and np.array_equal(row_y, ids[s + 1:s + 9])


def test_get_batch_is_deterministic():
    ids = np.random.default_rng(5).integers(0, 65, size=5000).astype(np.uint16)
    a = [t.numpy() for t in get_batch(ids, 8, 16, np.random.default_rng(42))]
    b = [t.numpy() for t in get_batch(ids, 8, 16, np.random.default_rng(42))]
    c = [t.numpy() for t in get_batch(ids, 8, 16, np.random.default_rng(43))]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_covers_every_valid_offset():
    n, block = 20, 4  # valid starts: 0 .. n - block - 1 = 15
    ids = np.arange(n, dtype=np.int32)
    rng = np.random.default_rng(0)
    starts = np.concatenate([get_batch(ids, 16, block, rng)[0].numpy()[:, 0] for _ in range(200)])
    counts = np.bincount(starts, minlength=n)
    assert set(starts.tolist()) == set(range(n - block))
    assert counts[n - block:].sum() == 0
    assert counts[:n - block].min() > 0.6 * counts[:n - block].mean()  # roughly uniform (3200 draws, 16 bins)


def test_get_batch_minimal_and_too_short_data():
    ids = np.arange(9)
    x, y = get_batch(ids, 3, 8, np.random.default_rng(0))  # exactly block_size + 1
    assert np.array_equal(x.numpy(), np.tile(np.arange(8), (3, 1)))
    with pytest.raises(DataError, match=r"block_size=9.*block_size \+ 1 = 10"):
        get_batch(ids, 3, 9, np.random.default_rng(0))


def test_get_batch_bad_arguments():
    ids = np.arange(100)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        get_batch(ids, 2, 4, rng=0)
    for bs, t in ((0, 4), (2, 0), (2.5, 4), (True, 4)):
        with pytest.raises(DataError, match="positive integer"):
            get_batch(ids, bs, t, np.random.default_rng(0))
    with pytest.raises(DataError, match="1-D integer"):
        get_batch(np.zeros((10, 10), dtype=np.int64), 2, 4, np.random.default_rng(0))
    with pytest.raises(DataError, match="1-D integer"):
        get_batch(np.linspace(0, 1, 100), 2, 4, np.random.default_rng(0))


def test_get_batch_moves_to_device_once(monkeypatch):
    calls = []
    real = tinygpt.backend.to_device

    def counting(arr, device=None):
        calls.append(arr.shape)
        return real(arr, device)

    monkeypatch.setattr(tinygpt.backend, "to_device", counting)
    x, y = get_batch(np.arange(100), 4, 8, np.random.default_rng(0), device="cpu")
    assert calls == [(4, 9)]  # one (B, T+1) copy, x and y are views of it
    assert x.device.name == "cpu"


def test_get_batch_from_memmap(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(500, dtype=np.uint16))
    ids = np.load(path, mmap_mode="r")
    x, y = get_batch(ids, 2, 10, np.random.default_rng(1))
    assert np.array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])


@pytest.mark.gpu
def test_get_batch_on_cuda_matches_cpu():
    if not tinygpt.backend.is_cuda_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    ids = np.arange(1000, dtype=np.uint16)
    xc, yc = get_batch(ids, 4, 8, np.random.default_rng(7), device="cuda")
    x, y = get_batch(ids, 4, 8, np.random.default_rng(7), device="cpu")
    assert xc.device.name == "cuda" and xc.shape == (4, 8)
    assert np.array_equal(xc.numpy(), x.numpy()) and np.array_equal(yc.numpy(), y.numpy())


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TINYGPT_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError, match="TINYGPT_CACHE"):
        data.download_shakespeare()
    with pytest.raises(DataError, match="TINYGPT_CACHE"):
        load_text("python-stdlib")
