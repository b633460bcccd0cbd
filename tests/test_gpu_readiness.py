"""GPU readiness (issue 16), checked without a GPU, plus `gpu` tests for a machine that has one:

  * the cuda12 / cuda13 / cuda extras;
  * the CUDA check behind is_cuda_available() and --device cuda (NVRTC, cuBLAS, cuRAND), with a fake CuPy;
  * CuPy arrays recognised before "cuda" was used (a fake cupy module in sys.modules);
  * the batch upload: pinned staging buffers and an asynchronous copy, with a fake CuPy;
  * the device error flag: bad embedding ids and cross-entropy targets raise the CPU's IndexError at the next
    read, and a training step on the strict device (tests/strict_xp.py) moves nothing to the host;
  * the bench's peak GPU memory (a memory hook; torch's reset peak), with fakes;
  * scripts/gpu_check.sh: one line and exit 3 without a GPU, and the plan it runs on one.
"""
from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tinygpt
import tinygpt.functional as F
from tinygpt import backend, bench, kernels
from tinygpt.cli import main
from strict_xp import DEVICE, StrictArray, register, reset_transfers, strict_xp

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
no_gpu_here = pytest.mark.skipif(backend.is_cuda_available(), reason="CUDA works here")


@pytest.fixture
def strict():
    return register()


@pytest.fixture
def unchecked_cuda(monkeypatch):
    """Forget the "cuda" device and the cached CUDA check; both come back after the test."""
    monkeypatch.setattr(backend, "_DEVICES", {k: v for k, v in backend._DEVICES.items() if k != "cuda"})
    monkeypatch.setattr(backend, "_cuda_status", backend._UNCHECKED)


# --- extras -----------------------------------------------------------------------------------------------

def _extras():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(kw)


def test_cuda_extras_bring_cupy_with_its_cuda_libraries():
    extras = _extras()
    assert extras["cuda12"] == ["cupy-cuda12x[ctk]>=14"]
    assert extras["cuda13"] == ["cupy-cuda13x[ctk]>=14"]
    assert extras["cuda"] == extras["cuda12"]                    # the alias: CUDA 12 runs on the most drivers


# --- the CUDA check -----------------------------------------------------------------------------------------

class FakeCupy:
    """What backend._probe_cuda touches of CuPy, on NumPy; `broken` names a library that fails to load."""
    float32 = np.float32

    def __init__(self, broken=None, runtime_version=12080, wrong=False, gpus=1):
        self.broken, self.wrong = broken, wrong
        self.cuda = SimpleNamespace(
            runtime=SimpleNamespace(getDeviceCount=lambda: gpus, runtimeGetVersion=lambda: runtime_version),
            get_current_stream=lambda: SimpleNamespace(synchronize=lambda: None))
        self.random = SimpleNamespace(default_rng=self._rng)
        self.ndarray = np.ndarray

    def zeros(self, n, dtype):
        return np.zeros(n, dtype)

    def ones(self, shape, dtype):
        if self.broken == "cublas":
            class NoBlas(np.ndarray):
                def __matmul__(self, other):
                    raise RuntimeError("libcublas.so.12: cannot open shared object file: No such file")
            return np.ones(shape, dtype).view(NoBlas)
        return np.ones(shape, dtype)

    def RawKernel(self, code, name):
        if self.broken == "nvrtc":
            raise RuntimeError("CompileException: cannot load libnvrtc.so.12\nsecond line\n  third")

        def launch(grid, block, args):
            if not self.wrong:
                args[0][:] = 2 * np.arange(block[0], dtype=np.float32)
        return launch

    def _rng(self, seed):
        if self.broken == "curand":
            raise ImportError("libcurand.so.10: cannot open shared object file")
        return np.random.default_rng(seed)


@pytest.mark.parametrize("broken, lib", [("nvrtc", "NVRTC"), ("cublas", "cuBLAS"), ("curand", "cuRAND")])
@pytest.mark.parametrize("version", [12080, 13000])
def test_cuda_check_names_the_missing_library_in_one_line(broken, lib, version, monkeypatch, unchecked_cuda):
    monkeypatch.setattr(backend, "_import_cupy", lambda: FakeCupy(broken, version))
    assert backend.is_cuda_available() is False
    with pytest.raises(tinygpt.CudaUnavailableError) as e:
        backend.get_device("cuda")
    msg = str(e.value)
    assert msg == backend.cuda_problem() and "\n" not in msg
    major = version // 1000
    assert f"({lib}: " in msg and f'pip install "cuda-toolkit[nvrtc,cublas,curand]=={major}.*"' in msg
    assert "never a second cupy-cudaXX" in msg


def test_cuda_check_passes_and_runs_once(monkeypatch, unchecked_cuda):
    fake, probes = FakeCupy(), []
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    real = backend._probe_cuda
    monkeypatch.setattr(backend, "_probe_cuda", lambda cp: probes.append(cp) or real(cp))
    assert backend.is_cuda_available() and backend.is_cuda_available()
    dev = backend.get_device("cuda")
    assert dev.xp is fake and dev.array_type is np.ndarray and backend.cuda_problem() is None
    assert probes == [fake]                                      # cached: probed once
    assert tinygpt.cuda.is_available()


def test_cuda_check_catches_a_wrong_result_and_never_raises(monkeypatch, unchecked_cuda):
    monkeypatch.setattr(backend, "_import_cupy", lambda: FakeCupy(wrong=True))
    assert not backend.is_cuda_available()
    assert "NVRTC check gave 0.0 instead of 992.0" in backend.cuda_problem()
    monkeypatch.setattr(backend, "_cuda_status", backend._UNCHECKED)
    monkeypatch.setattr(backend, "_probe_cuda", lambda cp: 1 / 0)
    assert not backend.is_cuda_available()
    assert backend.cuda_problem().startswith("device 'cuda' could not be checked (ZeroDivisionError")
    monkeypatch.setattr(backend, "_cuda_status", backend._UNCHECKED)
    monkeypatch.setattr(backend, "_import_cupy", lambda: FakeCupy(gpus=0))
    assert "needs an NVIDIA GPU, but CuPy found none" in backend.cuda_problem()


@no_gpu_here
@pytest.mark.parametrize("argv", [["train", "--max-iters", "1", "--out-dir", "OUT"], ["bench", "--steps", "1"],
                                  ["sample", "--out-dir", "OUT"]], ids=["train", "bench", "sample"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinygpt: error: device 'cuda' ")
    assert not (tmp_path / "out").exists()


# --- CuPy arrays before "cuda" was used ---------------------------------------------------------------------

@pytest.fixture
def fake_cupy_module(monkeypatch):
    """A `cupy` in sys.modules whose arrays are StrictArrays, with "cuda" (and "strict") not registered yet,
    and the CUDA check passed. The fused CUDA kernels are off (the stand-in has no RawModule)."""
    fake = SimpleNamespace(**vars(strict_xp))
    fake.__name__ = "cupy"
    monkeypatch.setattr(backend, "_DEVICES", {"cpu": backend._DEVICES["cpu"]})
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    monkeypatch.setattr(backend, "_cuda_status", None)
    with kernels.disabled():
        yield fake


def test_a_cupy_array_is_on_cuda_before_cuda_was_used(fake_cupy_module):
    a = fake_cupy_module.asarray(np.arange(6.0).reshape(2, 3))
    assert "cuda" not in backend._DEVICES
    t = tinygpt.tensor(a)                                        # was: TypeError
    assert t.device.name == "cuda" and isinstance(t.data, StrictArray) and t.data is not a
    assert backend.device_of(a) is backend.get_device("cuda") and backend.get_array_module(a) is fake_cupy_module
    np.testing.assert_array_equal((t * 2).numpy(), np.arange(6.0).reshape(2, 3) * 2)


def test_cupy_ids_go_to_the_models(fake_cupy_module):
    from tinygpt.models import GPT, GPTConfig
    ids = fake_cupy_module.asarray(np.array([[1, 2, 3], [4, 5, 6]]))
    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=8, activation="relu"),
                device="cuda")                                # relu: the fake has no cupyx for GELU
    logits, loss = model(ids, ids)                               # raw CuPy arrays, not Tensors
    assert logits.shape == (2, 3, 8) and np.isfinite(loss.item())


def test_device_of_never_imports_cupy():
    code = ("import sys, numpy as np, tinygpt\nfrom tinygpt import backend\n"
            "assert backend.device_of(object()).name == 'cpu' and backend.device_of([1]).name == 'cpu'\n"
            "assert 'cupy' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


# --- the batch upload -----------------------------------------------------------------------------------------

class FakeEvent:
    def __init__(self, log, block=False, disable_timing=True):
        self.log, self.done, self.stream = log, False, None

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):
        self.log.append("wait")
        self.done = True


class FakeDeviceArray:
    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.source, self.stream = shape, np.dtype(dtype), None, None

    def set(self, arr, stream=None):
        self.source, self.stream = arr, stream               # the copy happens "later": keep the view


class StagingCupy:
    def __init__(self):
        self.log, self.events, self.pinned = [], [], []
        stream = SimpleNamespace(name="current")

        def alloc_pinned_memory(n):
            self.pinned.append(n)
            return bytearray(n)

        def event(**kw):
            self.events.append(FakeEvent(self.log, **kw))
            return self.events[-1]

        self.cuda = SimpleNamespace(alloc_pinned_memory=alloc_pinned_memory, Event=event,
                                    get_current_stream=lambda: stream)

    def empty(self, shape, dtype):
        return FakeDeviceArray(shape, dtype)


def test_upload_copies_asynchronously_from_pinned_buffers_it_reuses_when_done(monkeypatch):
    cp = StagingCupy()
    dev = backend.Device("cuda", cp, FakeDeviceArray)
    monkeypatch.setitem(backend._DEVICES, "cuda", dev)
    batches = [np.arange(12).reshape(3, 4) + 100 * i for i in range(backend._Stager.DEPTH)]
    outs = [backend.upload(b, "cuda") for b in batches]
    for out, b in zip(outs, batches):                            # none done: each still has its own buffer
        assert out.stream is cp.cuda.get_current_stream() and out.shape == b.shape and out.dtype == b.dtype
        np.testing.assert_array_equal(out.source, b)
    assert len(cp.pinned) == backend._Stager.DEPTH and cp.log == []
    cp.events[1].done = True                                     # the second copy finished: its buffer is free
    out = backend.upload(batches[0] + 7, "cuda")
    assert len(cp.pinned) == backend._Stager.DEPTH and cp.log == []   # reused, no wait
    assert out.source.base is outs[1].source.base or np.shares_memory(out.source, outs[1].source)
    np.testing.assert_array_equal(outs[0].source, batches[0])   # copies in flight untouched
    out = backend.upload(batches[0] * 3, "cuda")                 # DEPTH in flight: wait for the oldest, reuse it
    assert cp.log == ["wait"] and len(cp.pinned) == backend._Stager.DEPTH
    assert np.shares_memory(out.source, outs[0].source)
    np.testing.assert_array_equal(out.source, batches[0] * 3)
    big = backend.upload(np.ones((50, 50), np.int64), "cuda")    # bigger than a buffer: a new one for its slot
    np.testing.assert_array_equal(big.source, np.ones((50, 50)))


def test_get_batch_uploads_through_backend_upload(strict, monkeypatch):
    from tinygpt import data
    calls = []
    real = backend.upload
    monkeypatch.setattr(backend, "upload", lambda host, device=None: calls.append(host.shape) or real(host, device))
    x, y = data.get_batch(np.arange(100), 4, 8, np.random.default_rng(0), DEVICE)
    assert calls == [(4, 9)] and isinstance(x.data, StrictArray)
    np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)


# --- the device error flag --------------------------------------------------------------------------------

def _cpu_error(fn):
    with pytest.raises(IndexError) as e:
        fn("cpu")
    return str(e.value)


W = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
CASES = {
    "embedding": lambda d: F.embedding(tinygpt.tensor(np.array([[0, 5, 2], [9, 1, -3]]), device=d),
                                       tinygpt.tensor(W, device=d)).sum(),
    "cross_entropy": lambda d: F.cross_entropy(tinygpt.tensor(W[:4], device=d),
                                               tinygpt.tensor(np.array([1, -100, 7, -1]), device=d),
                                               ignore_index=-100),
}


def _clear(device):
    """Drop an error an earlier test left pending on the device."""
    try:
        backend.raise_device_errors(device)
    except IndexError:
        pass


@pytest.mark.parametrize("name", CASES)
def test_bad_ids_raise_the_cpu_error_at_the_next_read_without_a_sync(name, strict):
    fn = CASES[name]
    expected = _cpu_error(fn)
    _clear(DEVICE)
    moved = reset_transfers()
    out = fn(DEVICE)                                             # no raise, nothing read back
    assert moved["to_host"] == 0
    with pytest.raises(IndexError) as e:
        out.item()
    assert str(e.value) == expected                              # the first bad id, in order (9 / 7)
    out.item()                                                   # cleared: the next read does not raise


def test_the_first_error_stays_until_it_is_raised(strict):
    _clear(DEVICE)
    first = _cpu_error(CASES["cross_entropy"])
    CASES["cross_entropy"](DEVICE)
    CASES["embedding"](DEVICE)
    with pytest.raises(IndexError, match="cross_entropy: target 7"):
        backend.raise_device_errors(DEVICE)
    assert first.startswith("cross_entropy: target 7")
    backend.raise_device_errors(DEVICE)                          # nothing pending
    F.embedding(tinygpt.tensor([[1, 2]], device=DEVICE), tinygpt.tensor(W, device=DEVICE)).sum().item()
    with pytest.raises(backend.DeviceError, match="device arrays"):
        backend.flag_bad_ids(np.array([1]), 3, "x {}")


def _strict_trainer(tmp_path, **kw):
    from tinygpt.settings import RunSettings
    from tinygpt.train import Trainer
    s = RunSettings(**{**dict(device=DEVICE, n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4,
                              max_iters=4, eval_interval=100, eval_iters=1, dropout=0.1, grad_accum=2,
                              out_dir=str(tmp_path / "out")), **kw})
    return Trainer(s, progress=False, log_interval=1)


def test_a_training_step_moves_nothing_to_the_host(strict, tmp_path):
    """The acceptance test of issue 16: with logging off a step reads nothing back from the device (on CUDA
    each read is a sync); it uploads one batch per micro-batch."""
    trainer = _strict_trainer(tmp_path)
    moved = reset_transfers()
    for _ in range(3):
        loss = trainer.train_step()
    assert moved == {"to_host": 0, "to_device": 3 * 2}
    assert isinstance(loss.data if hasattr(loss, "data") else loss, StrictArray)
    trainer.close()


def test_the_loop_reads_the_device_only_when_it_logs(strict, tmp_path, monkeypatch):
    trainer = _strict_trainer(tmp_path)
    trainer.progress = True                                      # a bar: a log line (one read) every step
    per_step, real = [], trainer.train_step

    def counted():
        reset_transfers()
        out = real()
        per_step.append(reset_transfers()["to_host"])
        return out
    monkeypatch.setattr(trainer, "train_step", counted)
    moved = reset_transfers()
    trainer.run()
    assert per_step == [0, 0, 0, 0]                              # the steps: never
    assert moved["to_host"] > 0                                  # the log lines and evaluations: yes


def test_a_bad_id_in_the_data_raises_the_cpus_error_at_log_time(strict, tmp_path):
    _clear(DEVICE)
    cpu = _strict_trainer(tmp_path / "cpu", device="cpu", workers=1)
    dev = _strict_trainer(tmp_path / "dev")
    V = cpu.model.config.vocab_size
    for t in (cpu, dev):
        t.train_ids = t.train_ids.copy()
        t.train_ids[:] = V + 3
    with pytest.raises(IndexError) as e:
        cpu.train_step()
    assert str(e.value) == f"embedding: id {V + 3} is out of range for a table of {V} rows"
    loss = dev.train_step()                                      # queued, not raised
    with pytest.raises(IndexError) as d:
        backend.to_numpy(loss)                                   # the trainer's log-time read
    assert str(d.value) == str(e.value)
    dev.train_step()
    with pytest.raises(IndexError, match="out of range"):
        dev.save()                                               # a checkpoint: the error, not a nan check
    for t in (cpu, dev):
        t.close()


# --- the bench's peak GPU memory ------------------------------------------------------------------------------

class PoolCupy:
    """A CuPy pool and its memory hooks: malloc/free change used_bytes and call the active hooks."""

    def __init__(self, used=1000):
        self.used, self.total, self.freed_all, self.hooks = used, used, 0, []
        outer = self

        class MemoryHook:
            def __enter__(self):
                outer.hooks.append(self)
                return self

            def __exit__(self, *exc):
                outer.hooks.remove(self)

            def malloc_postprocess(self, **kw):
                pass

        self.cuda = SimpleNamespace(memory_hook=SimpleNamespace(MemoryHook=MemoryHook),
                                    get_current_stream=lambda: SimpleNamespace(synchronize=lambda: None))
        self.pool = SimpleNamespace(used_bytes=lambda: self.used, total_bytes=lambda: self.total,
                                    free_all_blocks=self._free_all)

    def _free_all(self):
        self.freed_all += 1
        self.total = self.used

    def get_default_memory_pool(self):
        return self.pool

    def malloc(self, n):
        self.used += n
        self.total = max(self.total, self.used)
        for h in list(self.hooks):
            h.malloc_postprocess(device_id=0, size=n, mem_size=n, mem_ptr=1, pmem_id=1)

    def free(self, n):
        self.used -= n


def test_peak_device_bytes_sees_the_peak_inside_a_step(monkeypatch):
    cp = PoolCupy(used=1000)
    monkeypatch.setitem(backend._DEVICES, "cuda", backend.Device("cuda", cp, object))

    def step():                       # activations up, then freed: the pool ends where it began
        cp.malloc(512)
        cp.malloc(256)
        cp.free(512)
        cp.malloc(100)
        cp.free(356)
    assert backend.peak_device_bytes(step, "cuda") == 1000 + 768
    assert cp.hooks == []                                        # the hook is off again
    cp.total = 1000 + 2 ** 29                                    # a cached 512 MiB (the old report) is no peak
    assert backend.peak_device_bytes(lambda: None, "cuda") == 1000
    assert backend.peak_device_bytes(lambda: None, "cpu") is None


def test_the_matmul_probe_is_freed_before_the_memory_is_measured(monkeypatch):
    cp = PoolCupy()

    class Mat:
        def __matmul__(self, other):
            return self
    cp.asarray = lambda a: Mat()
    monkeypatch.setitem(backend._DEVICES, "cuda", backend.Device("cuda", cp, object))
    monkeypatch.setattr(np.random, "default_rng", lambda seed: SimpleNamespace(
        standard_normal=lambda shape, dtype: np.zeros((1, 1), dtype)))
    assert bench.matmul_peak_gflops("cuda") > 0 and cp.freed_all == 1


def test_torch_peak_is_reset_before_the_measured_steps(monkeypatch):
    torch = pytest.importorskip("torch")
    from tinygpt import bench_torch
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: log.append("max") or 4096)
    assert bench_torch.peak_memory_bytes("cuda", lambda: log.append("steps")) == 4096
    assert log == ["sync", "reset", "steps", "sync", "max"]
    assert bench_torch.peak_memory_bytes("cpu", lambda: log.append("no")) is None and log[-1] == "max"


# --- scripts/gpu_check.sh -----------------------------------------------------------------------------------

def _run_script(tmp_path, *args, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUPY_SITE")}
    e.update(PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, cwd=tmp_path,
                          timeout=timeout)


@no_gpu_here
def test_gpu_check_without_a_gpu_says_so_in_one_line_at_once(tmp_path):
    t0 = time.monotonic()
    r = _run_script(tmp_path, str(tmp_path / "logs"))
    assert time.monotonic() - t0 < 60
    assert r.returncode == 3, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no usable GPU here: device 'cuda' "), lines


@no_gpu_here
def test_gpu_check_finds_a_preinstalled_cupy_and_puts_it_on_pythonpath(tmp_path):
    """A CuPy outside this interpreter's packages (as on the project's GPU machines) is found by CUPY_SITE and
    used through PYTHONPATH; here it is a stand-in that sees no GPU, so the line says so."""
    site = tmp_path / "site-packages"
    (site / "cupy").mkdir(parents=True)
    (site / "cupy" / "__init__.py").write_text(
        "class _R:\n    @staticmethod\n    def getDeviceCount():\n        raise RuntimeError('stand-in: no GPU')\n"
        "class cuda:\n    runtime = _R\nndarray = type('ndarray', (), {})\n__version__ = '14.0.stand-in'\n")
    r = _run_script(tmp_path, str(tmp_path / "logs"), env={"CUPY_SITE": str(site)})
    assert r.returncode == 3
    assert "needs an NVIDIA GPU, but CuPy found none (RuntimeError: stand-in: no GPU)" in r.stdout + r.stderr


def test_gpu_check_usage_errors(tmp_path):
    r = _run_script(tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("usage: scripts/gpu_check.sh LOGDIR [WHEELDIR]")
    r = _run_script(tmp_path, str(tmp_path / "logs"), str(tmp_path / "no-such-wheels"))
    assert r.returncode == 2 and "no-such-wheels" in r.stderr and r.stderr.count("\n") == 1


def test_gpu_check_plan(tmp_path):
    """TINYGPT_GPU_CHECK_PLAN=1: what the script would run on a GPU machine, one stage a line, run nowhere."""
    r = _run_script(tmp_path, str(tmp_path / "logs"), env={"TINYGPT_GPU_CHECK_PLAN": "1"})
    assert r.returncode == 0, r.stderr
    plan = r.stdout
    assert "-m pytest -m gpu" in plan and "--junitxml" in plan and "timeout -s INT" in plan
    assert "-m tinygpt train --device cuda" in plan and "--data shakespeare" in plan
    for preset in ("cpu", "video"):
        assert f"-m tinygpt bench --device cuda --preset {preset} --json" in plan
        assert f"TINYGPT_KERNELS=reference {sys.executable} -m tinygpt bench --device cuda --preset {preset}" \
            in plan
    assert "-m tinygpt bench --device cuda --generate --json" in plan
    assert "pip install" not in plan                              # no wheel folder given, nothing installed


# --- on a GPU (pytest -m gpu) -----------------------------------------------------------------------------

_no_gpu = pytest.mark.skipif(not backend.is_cuda_available(), reason="needs CuPy and a CUDA GPU")


def gpu(test):
    return pytest.mark.gpu(_no_gpu(test))


@gpu
def test_gpu_check_passes_and_a_fresh_process_takes_cupy_arrays():
    code = ("import cupy, tinygpt\nfrom tinygpt import backend\n"
            "t = tinygpt.tensor(cupy.arange(6, dtype=cupy.float32))\n"
            "assert t.device.name == 'cuda' and backend.cuda_problem() is None\n"
            "print(float((t * 2).sum().item()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "30.0", r.stderr


@gpu
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_gpu_bad_ids_raise_the_cpu_error_at_the_next_read(name, fused):
    expected = _cpu_error(CASES[name])
    backend.raise_device_errors("cuda")
    with contextlib.nullcontext() if fused else kernels.disabled():
        out = CASES[name]("cuda")
    with pytest.raises(IndexError) as e:
        out.item()
    assert str(e.value) == expected


@gpu
def test_gpu_upload_is_asynchronous_and_right():
    cp = backend.get_device("cuda").xp
    host = [np.random.default_rng(i).integers(0, 100, (8, 65)) for i in range(12)]
    outs = [backend.upload(h, "cuda") for h in host]
    for h, o in zip(host, outs):
        assert isinstance(o, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(o), h)


@gpu
def test_gpu_peak_memory_counts_a_step_not_the_cache():
    cp = backend.get_device("cuda").xp
    pool = cp.get_default_memory_pool()
    big = cp.ones(2 ** 27, cp.float32)                           # 512 MiB, then freed: cached, not used
    del big
    base = pool.used_bytes()
    peak = backend.peak_device_bytes(lambda: cp.ones(2 ** 20, cp.float32).sum(), "cuda")
    assert base + 4 * 2 ** 20 <= peak < base + 2 ** 27
