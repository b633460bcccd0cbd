"""Tensor behaviour: construction and dtypes, attributes, moving data, no_grad, and backward's rules
(accumulation, shared nodes, long chains, freeing saved arrays, retain_graph, clear errors)."""
import gc
import math
import weakref

import numpy as np
import pytest
from numpy.testing import assert_allclose

import tinygpt
import tinygpt.functional as F
from tinygpt import backend
from tinygpt.tensor import Tensor


def grad(t):
    return backend.to_numpy(t.grad)


# --- construction -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, dtype", [
    (1.5, np.float32), ([1.0, 2.0], np.float32), (np.float64(2.0), np.float32), (np.sqrt(8), np.float32),
    (np.ones((2, 2)), np.float32), (np.ones(2, np.float16), np.float16), ([[1, 2]], np.int64),
    (3, np.int64), (np.arange(3, dtype=np.int32), np.int32), (np.arange(3, dtype=np.uint8), np.uint8),
    ([True, False], np.bool_), ([1, 2.5], np.float32),
])
def test_constructor_dtype_rules(data, dtype, device):
    t = tinygpt.tensor(data, device=device)
    assert t.dtype == dtype
    assert_allclose(t.numpy(), np.asarray(data, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, "float64", "int64"])
def test_constructor_respects_dtype(dtype, device):
    t = tinygpt.tensor([1.0, 2.0], dtype=dtype, device=device)
    assert t.dtype == np.dtype(dtype)


def test_constructor_rejects_bad_input():
    with pytest.raises(TypeError, match="cannot make a tensor from dtype"):
        tinygpt.tensor(["a", "b"])
    with pytest.raises(TypeError, match="only floating-point tensors can require grad"):
        tinygpt.tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="only floating-point"):
        tinygpt.tensor([1, 2]).requires_grad_()


def test_constructor_from_tensor_and_arrays(device):
    a = tinygpt.tensor([1.0, 2.0], device=device)
    b = tinygpt.tensor(a, dtype=np.float64)
    assert b.dtype == np.float64 and b.device is a.device
    c = tinygpt.tensor(a.data)  # a device array stays on its device
    assert c.device is a.device


def test_attributes(device):
    t = tinygpt.tensor(np.zeros((2, 3, 4)), requires_grad=True, device=device)
    assert t.shape == (2, 3, 4) and t.ndim == 3 and t.size == 24 and len(t) == 2
    assert t.device.name == device and t.device is backend.get_device(device)
    assert t.requires_grad and t.is_leaf and t.grad is None
    y = t * 2
    assert y.requires_grad and not y.is_leaf
    assert "requires_grad=True" in repr(t) and "tensor(" in repr(t)
    assert t.T.shape == (4, 3, 2) and t.transpose(0, 1).shape == (3, 2, 4) and t.view(6, 4).shape == (6, 4)


def test_numpy_item_tolist(device):
    t = tinygpt.tensor([[1.5, 2.5]], device=device)
    a = t.numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.tolist() == [[1.5, 2.5]]
    assert t.tolist() == [[1.5, 2.5]]
    s = t.sum()
    assert s.item() == 4.0 and isinstance(s.item(), float)
    assert isinstance(tinygpt.tensor([[7]], device=device).item(), int)
    with pytest.raises(ValueError, match="one element"):
        t.item()


def test_numpy_on_cpu_is_the_same_array():
    t = tinygpt.tensor([1.0, 2.0])
    assert t.numpy() is t.data


def test_to_and_detach(device):
    t = tinygpt.tensor([1.0, 2.0], requires_grad=True, device=device)
    assert t.to(device) is t
    c = t.to("cpu")
    assert isinstance(c.data, np.ndarray) and c.requires_grad and c.is_leaf
    d = (t * 2).detach()
    assert not d.requires_grad and d.is_leaf and d._ctx is None
    assert_allclose(d.numpy(), [2.0, 4.0])
    with pytest.raises(RuntimeError, match="does not require grad"):
        d.sum().backward()


def test_zero_grad_and_requires_grad_():
    t = tinygpt.tensor([1.0, 2.0])
    assert t.requires_grad_() is t and t.requires_grad
    (t * t).sum().backward()
    assert t.grad is not None
    t.zero_grad()
    assert t.grad is None


# --- no_grad -------------------------------------------------------------------------------------------

def test_no_grad_records_nothing_and_restores():
    x = tinygpt.tensor([1.0, 2.0], requires_grad=True)
    assert tinygpt.is_grad_enabled()
    with tinygpt.no_grad():
        assert not tinygpt.is_grad_enabled()
        y = (x * 2).exp().sum()
        with tinygpt.no_grad():
            pass
        assert not tinygpt.is_grad_enabled()
    assert tinygpt.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    with pytest.raises(ZeroDivisionError):
        with tinygpt.no_grad():
            1 / 0
    assert tinygpt.is_grad_enabled()
    assert (x * 2).requires_grad


def test_ops_without_grad_inputs_record_nothing():
    x = tinygpt.tensor([1.0, 2.0])
    y = x * 3 + 1
    assert not y.requires_grad and y._ctx is None


# --- backward -----------------------------------------------------------------------------------------------

def test_gradients_accumulate_across_backward_calls(device):
    x = tinygpt.tensor([1.0, 2.0, 3.0], requires_grad=True, device=device)
    (x * x).sum().backward()
    assert_allclose(grad(x), [2, 4, 6])
    (x * 3).sum().backward()
    assert_allclose(grad(x), [5, 7, 9])
    x.zero_grad()
    x.sum().backward()
    assert_allclose(grad(x), [1, 1, 1])


def test_a_node_used_twice_gets_the_sum_of_its_gradients(device):
    x = tinygpt.tensor([0.5, -1.0], requires_grad=True, device=device)
    # diamond: a feeds b and c, both feed d.  d = a² · (a + 1), a = 3x: dd/dx = 3(3a² + 2a)
    a = x * 3
    b = a * a
    c = a + 1
    (b * c).sum().backward()
    av = 3 * np.array([0.5, -1.0])
    assert_allclose(grad(x), 3 * (3 * av ** 2 + 2 * av), rtol=1e-6)
    # a leaf used in both operands, and in two branches
    y = tinygpt.tensor([2.0], requires_grad=True, device=device)
    (y * y + y.exp() * y - y).sum().backward()
    assert_allclose(grad(y), [2 * 2 + math.exp(2) * 3 - 1], rtol=1e-6)


def test_slices_of_one_tensor_add_up_with_each_other_and_with_dense_gradients(device):
    # indexing's backward is a SparseGrad: slices add into one buffer, mixed with ordinary gradients
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((3, 2, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4)).astype(np.float32)
    x = tinygpt.tensor(xv, requires_grad=True, device=device)
    h = x * 1.0                                               # a non-leaf, so the engine sums for it
    q, k, v = h[0], h[1], h[2]
    rows = h[[0, 0, 2]]                                       # advanced index: rows 0 twice (scatter-add)
    loss = (q * w[0]).sum() + (k * w[1]).sum() + (v * w[2]).sum() + (h * h).sum() + (rows * rows).sum() \
        + (h[1] * 3.0).sum()
    loss.backward()
    expect = w + 2 * xv                                       # q, k, v and the dense h * h
    expect[0] += 2 * 2 * xv[0]                                # rows 0, 0
    expect[2] += 2 * xv[2]                                    # row 2
    expect[1] += 3.0                                          # a second slice at the same place
    assert_allclose(grad(x), expect, rtol=1e-5, atol=1e-6)
    y = tinygpt.tensor(xv, requires_grad=True, device=device)  # a leaf sliced twice
    (y[0].sum() + y[0:2].sum()).backward()
    assert_allclose(grad(y), np.array([2, 1, 0], np.float32)[:, None, None] * np.ones((3, 2, 4)))


def test_leaf_grads_never_alias(device):
    x = tinygpt.tensor([1.0, 2.0], requires_grad=True, device=device)
    y = tinygpt.tensor([3.0, 4.0], requires_grad=True, device=device)
    g = np.array([1.0, 1.0], dtype=np.float32)
    (x + y).backward(g)
    assert x.grad is not y.grad
    x.grad += 10
    assert_allclose(grad(y), [1, 1])
    assert_allclose(g, [1, 1])
    z = tinygpt.tensor([[1.0, 2.0]], requires_grad=True, device=device)
    w = tinygpt.tensor([[1.0, 2.0]], requires_grad=True, device=device)
    (z.reshape(2) + w.T.reshape(2)).sum().backward()  # view gradients are copied before they are kept
    z.grad += 1
    assert_allclose(grad(w), [[1, 1]])


def test_a_40000_op_chain(device):
    x = tinygpt.tensor([1.0], requires_grad=True, device=device)
    y = x
    for i in range(20000):
        y = y * 1.0 + 0.0 if i % 2 else (y + 1.0) * 1.0
    y.sum().backward()  # iterative topological sort: no RecursionError
    assert y.item() == 10001.0
    assert_allclose(grad(x), [1.0])


def test_saved_arrays_are_freed_after_backward():
    x = tinygpt.tensor(np.ones(1000), requires_grad=True)
    a = x * 2
    ref = weakref.ref(a.data)
    y = (a * a).sum()
    del a
    gc.collect()
    assert ref() is not None  # Mul saved it for backward
    y.backward()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("make", [
    lambda x: (x * x).sum(),
    lambda x: F.cross_entropy(x.reshape(2, 3), np.array([0, 2])),
    lambda x: F.scaled_dot_product_attention(*[x.reshape(1, 1, 2, 3)] * 3).sum(),
    lambda x: F.layer_norm(x.reshape(2, 3), x[:3] * 1).sum(),
    lambda x: (F.softmax(x) * x).sum(),
], ids=["mul", "cross_entropy", "attention", "layer_norm", "softmax"])
def test_second_backward_raises_unless_retain_graph(make, device):
    x = tinygpt.tensor(np.linspace(-1, 1, 6), requires_grad=True, device=device)
    y = make(x)
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    x2 = tinygpt.tensor(np.linspace(-1, 1, 6), requires_grad=True, device=device)
    y2 = make(x2)
    y2.backward(retain_graph=True)
    first = grad(x2).copy()
    assert_allclose(first, grad(x), rtol=1e-6)
    y2.backward(retain_graph=True)
    assert_allclose(grad(x2), 2 * first, rtol=1e-6)
    y2.backward()  # the last use may free (and overwrite) saved arrays ...
    assert_allclose(grad(x2), 3 * first, rtol=1e-6)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y2.backward()  # ... after which they are gone


def test_backward_errors(device):
    x = tinygpt.tensor([1.0, 2.0], requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match="one-element tensor"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="grad has shape"):
        (x * 2).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        tinygpt.tensor([1.0]).backward()
    (x * 2).backward(np.array([1.0, -1.0]))  # a float64 host grad is taken in x's dtype and device
    assert x.grad.dtype == np.float32 and backend.device_of(x.grad) is x.device
    assert_allclose(grad(x), [2, -2])


def test_backward_on_a_leaf(device):
    x = tinygpt.tensor([3.0], requires_grad=True, device=device)
    x.backward()
    assert_allclose(grad(x), [1.0])


def test_a_bad_custom_backward_is_named():
    class TwoGrads(tinygpt.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            return g, g

    class WrongShape(TwoGrads):
        @staticmethod
        def backward(ctx, g):
            return g[:1]

    x = tinygpt.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="TwoGrads.backward returned 2 gradients for 1 inputs"):
        TwoGrads.apply(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"WrongShape.backward returned a gradient of shape \(1,\)"):
        WrongShape.apply(x).sum().backward()


def test_function_ctx_for_custom_ops():
    seen = {}

    class Scale(tinygpt.Function):
        @staticmethod
        def forward(ctx, x, w, k=1.0):
            seen.update(xp=ctx.xp, device=ctx.device, needs=ctx.needs_input_grad)
            ctx.save_for_backward(x, w)
            ctx.k = k
            return x * w * k

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return None, (g * x * ctx.k).sum(keepdims=True).reshape(w.shape)

    x = tinygpt.tensor([1.0, 2.0])
    w = tinygpt.tensor([3.0], requires_grad=True)
    Scale.apply(x, w, k=2.0).sum().backward()
    assert seen["xp"] is np and seen["device"].name == "cpu" and seen["needs"] == (False, True)
    assert_allclose(grad(w), [6.0])
    assert x.grad is None


def test_mixing_devices_raises_naming_both():
    from strict_xp import register
    register()
    a = tinygpt.tensor([1.0], device="strict", requires_grad=True)
    b = tinygpt.tensor([1.0])
    with pytest.raises(tinygpt.DeviceError, match="different devices, 'strict' and 'cpu'"):
        a + b
    with pytest.raises(tinygpt.DeviceError, match="different devices, 'cpu' and 'strict'"):
        b @ a


def test_tensor_owns_its_data_like_torch_tensor():
    """tinygpt.tensor copies an array it would otherwise share, so in-place updates never reach the caller."""
    for a in (np.ones(3, np.float32), np.arange(6, dtype=np.int64).reshape(2, 3)[:, 1]):
        before = a.copy()
        t = tinygpt.tensor(a)
        t.data[...] = 7
        np.testing.assert_array_equal(a, before)
    src = tinygpt.tensor([1.0, 2.0])
    copy = tinygpt.tensor(src)
    copy.data[0] = 9
    assert src.numpy()[0] == 1.0
