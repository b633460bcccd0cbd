"""Shared fixtures: the `device` fixture runs a test on "cpu", and on "cuda" only when CuPy sees a GPU."""
import numpy as np
import pytest

import tinygpt
from tinygpt import backend

_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not backend.is_cuda_available(), reason="needs CuPy and a CUDA GPU")]),
]


@pytest.fixture(params=_DEVICES)
def device(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    tinygpt.manual_seed(0)


@pytest.fixture
def corpus(tmp_path):
    """3000 random words from eight ("the cat sat on a mat. and dog") in tmp_path/corpus.txt."""
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "and ", "dog\n"]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(rng.choice(words, 3000)), encoding="utf-8")
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (AssertionError)."""
    import socket
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is the test oracle; not installed")
