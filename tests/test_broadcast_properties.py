"""Property tests: broadcasting binary ops and reductions on random shapes, forward against NumPy and
backward against the closed form (the upstream gradient summed back over the broadcast axes)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose

import tinygpt
from tinygpt import unbroadcast

SETTINGS = settings(max_examples=40, deadline=None)


def sum_to(x, shape):
    """Undo broadcasting by hand: sum new leading axes away, then every axis that was 1 in `shape`."""
    while x.ndim > len(shape):
        x = x.sum(axis=0)
    for i, s in enumerate(shape):
        if s == 1 and x.shape[i] != 1:
            x = x.sum(axis=i, keepdims=True)
    return x


# op, numpy op, closed-form (da, db) given upstream g and the broadcast a, b
OPS = {
    "add": (lambda a, b: a + b, np.add, lambda g, a, b: (g, g)),
    "sub": (lambda a, b: a - b, np.subtract, lambda g, a, b: (g, -g)),
    "mul": (lambda a, b: a * b, np.multiply, lambda g, a, b: (g * b, g * a)),
    "div": (lambda a, b: a / b, np.divide, lambda g, a, b: (g / b, -g * a / (b * b))),
}

_values = st.floats(0.25, 4.0, allow_nan=False, allow_infinity=False)


@st.composite
def operand_pairs(draw, dtype=np.float64):
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4))
    a_shape, b_shape = shapes.input_shapes
    a = draw(hnp.arrays(dtype, a_shape, elements=_values))
    b = draw(hnp.arrays(dtype, b_shape, elements=_values))
    sign = draw(hnp.arrays(np.int8, a_shape, elements=st.sampled_from([-1, 1])))
    return a * sign.astype(dtype), b, shapes.result_shape


@pytest.mark.parametrize("name", list(OPS))
@SETTINGS
@given(data=operand_pairs(), seed=st.integers(0, 2 ** 16))
def test_broadcasting_binary_ops(name, data, seed):
    a, b, out_shape = data
    op, np_op, closed = OPS[name]
    ta = tinygpt.tensor(a, dtype=np.float64, requires_grad=True)
    tb = tinygpt.tensor(b, dtype=np.float64, requires_grad=True)
    y = op(ta, tb)
    assert y.shape == out_shape
    assert_allclose(y.numpy(), np_op(a, b), rtol=1e-14, atol=0)
    g = np.random.default_rng(seed).standard_normal(out_shape)
    y.backward(g)
    da, db = closed(g, *np.broadcast_arrays(a, b))
    assert ta.grad.shape == a.shape and tb.grad.shape == b.shape
    assert_allclose(ta.grad, sum_to(da, a.shape), rtol=1e-12, atol=1e-12)
    assert_allclose(tb.grad, sum_to(db, b.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPS))
@settings(max_examples=25, deadline=None)
@given(data=operand_pairs(np.float32))
def test_broadcasting_binary_ops_float32(name, data):
    a, b, out_shape = data
    op, np_op, _ = OPS[name]
    ta, tb = tinygpt.tensor(a, requires_grad=True), tinygpt.tensor(b, requires_grad=True)
    y = op(ta, tb)
    assert y.dtype == np.float32 and y.shape == out_shape
    assert_allclose(y.numpy(), np_op(a, b), rtol=1e-6)
    y.backward(np.ones(out_shape, np.float32))
    assert ta.grad.dtype == np.float32 and tb.grad.dtype == np.float32
    assert ta.grad.shape == a.shape and tb.grad.shape == b.shape


@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=1, min_dims=0, max_dims=4, max_side=4),
       seed=st.integers(0, 2 ** 16))
def test_unbroadcast_is_sum_to(shapes, seed):
    (shape,) = shapes.input_shapes
    g = np.random.default_rng(seed).standard_normal(shapes.result_shape)
    assert_allclose(unbroadcast(g, shape), sum_to(g, shape), rtol=1e-12, atol=1e-12)


@st.composite
def reductions(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    ndim = len(shape)
    axis = draw(st.one_of(
        st.none(),
        hnp.valid_tuple_axes(ndim, min_size=0),
        st.integers(-ndim, ndim - 1) if ndim else st.none(),
    ))
    keepdims = draw(st.booleans())
    size = int(np.prod(shape))
    # distinct values, so max has one winner per slice and a closed-form gradient
    x = draw(st.permutations(list(range(size)))) if size else []
    return np.asarray(x, dtype=np.float64).reshape(shape) * 0.37 - 1.0, axis, keepdims


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@SETTINGS
@given(case=reductions(), seed=st.integers(0, 2 ** 16))
def test_reductions(op, case, seed):
    x, axis, keepdims = case
    t = tinygpt.tensor(x, dtype=np.float64, requires_grad=True)
    y = getattr(t, op)(axis=axis, keepdims=keepdims)
    expected = getattr(np, op)(x, axis=axis, keepdims=keepdims)
    assert y.shape == expected.shape
    assert_allclose(y.numpy(), expected, rtol=1e-13, atol=1e-13)
    g = np.random.default_rng(seed).standard_normal(expected.shape)
    y.backward(g)
    axes = _axes(axis, x.ndim)
    gk = g if keepdims else np.expand_dims(g, axes)  # put the reduced axes back as size 1
    n = int(np.prod([x.shape[a] for a in axes]))
    if op == "sum":
        dx = np.broadcast_to(gk, x.shape)
    elif op == "mean":
        dx = np.broadcast_to(gk / max(n, 1), x.shape)
    else:
        dx = (x == x.max(axis=axes, keepdims=True)) * gk
    assert t.grad.shape == x.shape
    assert_allclose(t.grad, dx, rtol=1e-12, atol=1e-12)
