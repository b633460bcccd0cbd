"""The whole op suite on the "strict" device (tests/strict_xp.py), against the CPU.

A StrictArray refuses every NumPy call (np.exp(s), np.asarray(s), a host array mixed into device
math), exactly where CuPy would fail or silently copy. So an op that runs here forward and backward
and matches the CPU goes through `xp` only: this proves the CUDA path on a machine without a GPU.
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose

import tinygpt
import tinygpt.functional as F
from tinygpt import backend
from op_cases import CASES, CASE_IDS, make_tensors
from strict_xp import DEVICE, StrictArray, register, strict_xp


@pytest.fixture(scope="module", autouse=True)
def _strict_device():
    register()
    yield


def _run(case, arrays, device, dtype):
    """Forward, then backward with a fixed upstream gradient; returns host output and input grads."""
    tinygpt.manual_seed(0)
    ts = make_tensors(arrays, device, dtype)
    y = case.fn(*ts)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    y.backward(g)
    grads = [backend.to_numpy(t.grad) if t.grad is not None else None for t in ts if t.requires_grad]
    return y, grads


# --- the stand-in itself must be strict, or the tests below prove nothing -------------------------------

@pytest.mark.parametrize("call", [
    lambda s: np.asarray(s), lambda s: np.exp(s), lambda s: np.sum(s), lambda s: np.concatenate([s, s]),
    lambda s: np.where(s > 0, s, 0.0), lambda s: np.add.at(s, [0], 1.0), lambda s: s + np.ones(3),
    lambda s: np.maximum(s, 0), lambda s: np.ones(3) * s, lambda s: s[np.array([0, 1])],
    lambda s: strict_xp.where(np.ones(3, bool), s, s),
], ids=["asarray", "exp", "sum", "concatenate", "where", "add.at", "host+dev", "maximum", "host*dev",
        "host_index", "xp_with_host_arg"])
def test_strict_array_refuses_numpy(call):
    s = strict_xp.asarray(np.arange(3.0))
    with pytest.raises(TypeError):
        call(s)


def test_strict_array_allows_what_cupy_allows():
    s = strict_xp.asarray(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert not isinstance(s, np.ndarray)
    y = np.float32(2) * s - 1 / (s + 1.0)  # NumPy scalars on the left defer to the array
    assert isinstance(y, StrictArray) and y.dtype == np.float32
    assert isinstance(s.sum(), StrictArray) and float(s.sum()) == 15.0
    assert s.T.shape == (3, 2) and s.reshape(-1).base is not None and s.copy().base is None
    t = s.copy()
    t[0, [1, 1]] += 1
    strict_xp.add.at(t, (strict_xp.asarray([1, 1]), strict_xp.asarray([0, 0])), 5.0)
    assert_allclose(strict_xp.asnumpy(t), [[0, 2, 2], [13, 4, 5]])
    assert_allclose(strict_xp.asnumpy(strict_xp.exp(s, out=s)), np.exp(np.arange(6.0).reshape(2, 3)),
                    rtol=1e-6)


def test_strict_device_is_registered():
    dev = backend.get_device(DEVICE)
    assert dev.name == DEVICE and dev.xp is strict_xp
    x = tinygpt.tensor([1.0, 2.0], device=DEVICE)
    assert isinstance(x.data, StrictArray) and x.device is dev and x.dtype == np.float32
    assert backend.device_of(x.data) is dev and backend.get_array_module(x.data) is strict_xp


# --- every op, forward and backward -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_op_on_strict_device_matches_cpu(case, dtype, rng):
    arrays = case.inputs(rng)
    y_cpu, g_cpu = _run(case, arrays, "cpu", dtype)
    y_dev, g_dev = _run(case, arrays, DEVICE, dtype)
    assert isinstance(y_dev.data, StrictArray) and y_dev.device.name == DEVICE
    assert y_dev.dtype == y_cpu.dtype and y_dev.shape == y_cpu.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_allclose(y_dev.numpy(), y_cpu.numpy(), **tol)
    for gd, gc in zip(g_dev, g_cpu):
        assert (gd is None) == (gc is None)
        if gd is not None:
            assert gd.dtype == gc.dtype
            assert_allclose(gd, gc, **tol)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "mul(3,4)(4,)", "matmul(2,1,3,4)@(5,4,2)", "gelu", "cross_entropy_ignore", "layer_norm",
    "attention_dropout_reseeded", "embedding", "getitem[pair_arrays_repeat]", "max(axis=(0,2),keepdims=False)")],
    ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["full", "random"])
def test_gradcheck_runs_on_strict_device(case, mode, rng):
    assert tinygpt.gradcheck(case.fn, make_tensors(case.inputs(rng), DEVICE), mode=mode)


# --- Tensor plumbing on a non-CPU device ----------------------------------------------------------------

def test_tensor_api_on_strict_device():
    x = tinygpt.tensor(np.arange(4.0).reshape(2, 2), device=DEVICE, requires_grad=True)
    assert isinstance(x.numpy(), np.ndarray) and x.numpy().dtype == np.float32
    assert x.sum().item() == 6.0 and "strict" in repr(x)
    y = x.to("cpu")
    assert isinstance(y.data, np.ndarray) and y.requires_grad and y.to(DEVICE).device.name == DEVICE
    assert x.to(DEVICE) is x
    assert isinstance(tinygpt.tensor(x.data).data, StrictArray)  # a device array stays on its device
    (x * x).sum().backward()
    assert isinstance(x.grad, StrictArray)
    assert_allclose(backend.to_numpy(x.grad), 2 * np.arange(4.0).reshape(2, 2))
    assert backend.to_device(x.data, DEVICE) is x.data


def test_mixing_strict_and_cpu_raises_naming_both():
    a = tinygpt.tensor([1.0, 2.0], device=DEVICE, requires_grad=True)
    b = tinygpt.tensor([1.0, 2.0], device="cpu")
    for op in (lambda: a + b, lambda: b * a, lambda: F.where(b > 0, a, b),
               lambda: F.cat([a, b]), lambda: F.linear(a, b.reshape(1, 2))):
        with pytest.raises(tinygpt.DeviceError, match=r"'strict'.*'cpu'|'cpu'.*'strict'"):
            op()
    w = tinygpt.tensor(np.ones((3, 2)), device=DEVICE)
    with pytest.raises(tinygpt.DeviceError, match=r"'cpu'.*'strict'"):
        F.embedding(tinygpt.tensor([0, 1]), w)


def test_host_masks_indices_and_targets_move_to_the_device():
    x = tinygpt.tensor(np.ones((2, 3)), device=DEVICE, requires_grad=True)
    y = F.masked_fill(x, np.array([True, False, True]), -1.0)
    y = y + F.where(np.array([[True], [False]]), x, 0.5)
    y = y[np.array([1, 1, 0])] + y[[0, 0, 1]] + y[tinygpt.tensor([1, 0, 1])]
    y = y + np.eye(3) @ y @ np.ones((3, 3))
    loss = F.cross_entropy(y, np.array([0, 2, 1])) + F.cross_entropy(y, [1, 1, 1])
    loss.backward()
    assert isinstance(loss.data, StrictArray) and isinstance(x.grad, StrictArray)
    assert np.isfinite(backend.to_numpy(x.grad)).all()


def test_scalars_never_become_host_arrays_on_device():
    x = tinygpt.tensor([1.0, 2.0], device=DEVICE, requires_grad=True)
    y = (np.float64(2.0) * x + 1) / np.sqrt(8) - 0.5 + x ** 2 + 3 / x + 2 - x
    y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
