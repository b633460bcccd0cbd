"""The backend seam: device lookup and errors, CUDA without CuPy, $TINYGPT_DEVICE, moving arrays, random
state, and the import rules (only backend.py imports CuPy; tinygpt never imports torch)."""
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

import tinygpt
from tinygpt import backend
from strict_xp import DEVICE, StrictArray, register, strict_xp

PKG = Path(tinygpt.__file__).resolve().parent


@pytest.fixture
def strict():
    return register()


# --- devices ----------------------------------------------------------------------------------------

def test_get_device_cpu():
    dev = backend.get_device("cpu")
    assert dev.name == "cpu" and dev.xp is np and dev.array_type is np.ndarray
    assert backend.get_device(dev) is dev and repr(dev) == "device('cpu')"


def test_unknown_device_raises():
    with pytest.raises(tinygpt.DeviceError, match="unknown device 'tpu'; use 'cpu' or 'cuda'"):
        backend.get_device("tpu")
    with pytest.raises(tinygpt.DeviceError, match="'gpu'"):
        tinygpt.tensor([1.0], device="gpu")


@pytest.fixture
def unchecked_cuda(monkeypatch):
    """Forget the "cuda" device and the cached CUDA check (both come back after the test)."""
    monkeypatch.setattr(backend, "_DEVICES", {k: v for k, v in backend._DEVICES.items() if k != "cuda"})
    monkeypatch.setattr(backend, "_cuda_status", backend._UNCHECKED)


@pytest.fixture
def no_cupy(monkeypatch, unchecked_cuda):
    """Pretend CuPy is not installed (whether or not it is)."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: None)
    monkeypatch.setattr(backend, "_cupy_error", "ModuleNotFoundError: No module named 'cupy'")


def test_cuda_without_cupy_says_how_to_install(no_cupy):
    assert not backend.is_cuda_available()
    for ask in (lambda: backend.get_device("cuda"), lambda: tinygpt.tensor([1.0], device="cuda"),
                lambda: tinygpt.tensor([1.0]).to("cuda:0")):
        with pytest.raises(tinygpt.CudaUnavailableError) as e:
            ask()
        msg = str(e.value)
        assert 'pip install "tinygpt[cuda]"' in msg and '"tinygpt[cuda13]"' in msg
        assert "No module named 'cupy'" in msg and "\n" not in msg
    assert issubclass(tinygpt.CudaUnavailableError, tinygpt.DeviceError)
    assert issubclass(tinygpt.DeviceError, RuntimeError)


def test_cuda_with_cupy_but_no_gpu(monkeypatch, unchecked_cuda):
    class Runtime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = type("FakeCupy", (), {"cuda": type("cuda", (), {"runtime": Runtime})})
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    assert not backend.is_cuda_available()
    with pytest.raises(tinygpt.CudaUnavailableError, match="needs an NVIDIA GPU.*cudaErrorNoDevice"):
        backend.get_device("cuda")


def test_import_cupy_remembers_the_failure(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert backend._import_cupy() is None
    assert backend._cupy_error.startswith(("ImportError", "ModuleNotFoundError"))


def test_default_device_from_env(monkeypatch, strict):
    monkeypatch.delenv("TINYGPT_DEVICE", raising=False)
    assert backend.default_device() == "cpu" and tinygpt.tensor([1.0]).device.name == "cpu"
    monkeypatch.setenv("TINYGPT_DEVICE", "  ")
    assert backend.default_device() == "cpu"
    monkeypatch.setenv("TINYGPT_DEVICE", DEVICE)
    assert backend.default_device() == DEVICE
    t = tinygpt.tensor([1.0, 2.0])
    assert t.device.name == DEVICE and isinstance(t.data, StrictArray)
    assert tinygpt.tensor([1.0], device="cpu").device.name == "cpu"
    monkeypatch.setenv("TINYGPT_DEVICE", "tpu")
    with pytest.raises(tinygpt.DeviceError, match="'tpu'"):
        tinygpt.tensor([1.0])


def test_default_device_cuda_from_env_without_cupy(monkeypatch, no_cupy):
    monkeypatch.setenv("TINYGPT_DEVICE", "cuda")
    with pytest.raises(tinygpt.CudaUnavailableError, match=r'pip install "tinygpt\[cuda\]"'):
        tinygpt.tensor([1.0])


def test_device_of_and_array_module(strict):
    s = strict_xp.zeros(3)
    assert backend.device_of(np.zeros(3)).name == "cpu" and backend.device_of(np.float32(1)).name == "cpu"
    assert backend.device_of(s) is strict and backend.device_of([1, 2]).name == "cpu"
    assert backend.get_array_module(np.zeros(2), 1.0) is np
    assert backend.get_array_module(np.zeros(2), s) is strict_xp
    assert backend.get_array_module() is np


def test_to_numpy_and_to_device(strict):
    a = np.arange(3.0)
    assert backend.to_numpy(a) is a and backend.to_device(a, "cpu") is a
    s = backend.to_device(a, DEVICE)
    assert isinstance(s, StrictArray) and backend.to_device(s, strict) is s
    back = backend.to_numpy(s)
    assert isinstance(back, np.ndarray) and np.array_equal(back, a)
    assert isinstance(backend.to_device(s, "cpu"), np.ndarray)
    assert_allclose(backend.to_numpy([1, 2]), [1, 2])


@pytest.mark.parametrize("on_strict", [False, True])
def test_scatter_add_accumulates_repeats(on_strict, strict):
    xp = strict_xp if on_strict else np
    target = xp.zeros((4, 2))
    idx = xp.asarray(np.array([1, 1, 3, 1]))
    vals = xp.asarray(np.arange(8.0).reshape(4, 2))
    backend.scatter_add(xp, target, idx, vals)
    assert_allclose(backend.to_numpy(target), [[0, 0], [0 + 2 + 6, 1 + 3 + 7], [0, 0], [4, 5]])


def test_synchronize_waits_for_the_cuda_stream_only(strict):
    waits = []

    class Stream:
        def synchronize(self):
            waits.append(1)

    class Cuda:                                              # what synchronize may touch of CuPy
        get_current_stream = staticmethod(Stream)

    class Module:                                            # an array module that records a stream wait
        cuda = Cuda

    assert backend.synchronize(backend.Device("cuda", Module, object)) is None
    assert waits == [1]                                      # one wait on the current stream
    for device in ("cpu", None, DEVICE, backend.Device("cpu", Module, np.ndarray)):
        assert backend.synchronize(device) is None
    assert waits == [1]                                      # a no-op elsewhere, even with a .cuda attribute
    with pytest.raises(backend.DeviceError, match="unknown device"):
        backend.synchronize("tpu")


# --- random state ---------------------------------------------------------------------------------------

def test_manual_seed_makes_host_rng_repeatable():
    tinygpt.manual_seed(123)
    a = backend.host_rng().random(5)
    tinygpt.manual_seed(123)
    assert_allclose(backend.host_rng().random(5), a)
    assert backend.device_rng("cpu") is backend.host_rng()
    backend.manual_seed(124)
    assert not np.allclose(backend.host_rng().random(5), a)


def test_device_rng_is_reseeded(strict):
    tinygpt.manual_seed(7)
    r1 = backend.to_numpy(backend.device_rng(DEVICE).random((4,), dtype=np.float32))
    assert backend.device_rng(DEVICE) is backend.device_rng(DEVICE)
    tinygpt.manual_seed(7)
    r2 = backend.to_numpy(backend.device_rng(DEVICE).random((4,), dtype=np.float32))
    assert_allclose(r1, r2)


def test_rng_state_round_trips_through_json():
    tinygpt.manual_seed(3)
    state = json.loads(json.dumps(backend.get_rng_state()))
    a = backend.host_rng().random(3)
    backend.host_rng().random(10)
    backend.set_rng_state(state)
    assert_allclose(backend.host_rng().random(3), a)


# --- import rules ---------------------------------------------------------------------------------------

def _imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value).split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value).split(".")[0])
    return names


# The one exception: `tinygpt bench` races PyTorch eager when torch happens to be installed, and keeps
# that competitor in its own module, imported only by the benchmark (never by training or sampling).
TORCH_ALLOWED = {PKG / "bench_torch.py"}


def _module_level_imports(path):
    """The imports of a module's top level (not inside a function): what importing it imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))], type_ignores=[])
    found = set()
    for node in ast.walk(top):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


# CuPy may be imported by backend.py and the tinygpt/cuda package only (nccl.py: cupy.cuda.nccl), and only
# lazily, inside functions: importing tinygpt never imports CuPy.
CUPY_ALLOWED = {PKG / "backend.py"} | set((PKG / "cuda").glob("*.py"))


def test_only_backend_and_the_cuda_package_import_cupy_and_nothing_imports_torch():
    files = sorted(PKG.rglob("*.py"))
    assert PKG / "backend.py" in files and len(files) > 5
    for f in files:
        found = _imports(f)
        if f not in TORCH_ALLOWED:
            assert "torch" not in found, f"{f.relative_to(PKG.parent)} imports torch (tests only!)"
        if f not in CUPY_ALLOWED:
            assert not {"cupy", "cupyx"} & found, \
                f"{f.relative_to(PKG.parent)} imports CuPy; only backend.py and tinygpt/cuda may"
        assert not {"cupy", "cupyx"} & _module_level_imports(f), \
            f"{f.relative_to(PKG.parent)} imports CuPy at import time; import it inside a function"
    assert {"cupy", "cupyx"} <= _imports(PKG / "backend.py")


def test_the_import_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nif x:\n    from cupy import ndarray\ndef f():\n    import torch.nn\n")
    assert {"os", "cupy", "torch"} <= _imports(f)


def test_import_tinygpt_imports_neither_torch_nor_cupy():
    code = ("import sys, tinygpt, tinygpt.functional, tinygpt.gradcheck; "
            "assert not {'torch', 'cupy'} & set(sys.modules), {'torch', 'cupy'} & set(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=120)
    assert r.returncode == 0, r.stderr


def test_no_tinygpt_module_imports_torch_at_import_time():
    code = ("import sys, pkgutil, importlib, tinygpt\n"
            "for m in pkgutil.walk_packages(tinygpt.__path__, 'tinygpt.'):\n"
            "    if m.name != 'tinygpt.__main__':\n"
            "        importlib.import_module(m.name)\n"
            "bad = {'torch', 'cupy'} & set(sys.modules)\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=120)
    assert r.returncode == 0, r.stderr
