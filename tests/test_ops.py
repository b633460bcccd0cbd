"""Every op: backward against finite differences (gradcheck, float64) and forward against plain NumPy,
on every device (`device` fixture: "cpu", plus "cuda" when a GPU is there). Then the properties a
gradient check cannot see: ties, repeated indices, stability at ±1e4, randomness, shape errors.
"""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import tinygpt
import tinygpt.functional as F
from op_cases import CASES, CASE_IDS, make_tensors, np_attention, np_softmax


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck(case, device, rng):
    assert tinygpt.gradcheck(case.fn, make_tensors(case.inputs(rng), device))


@pytest.mark.parametrize("case", [c for c in CASES if c.ref is not None],
                         ids=[c.name for c in CASES if c.ref is not None])
def test_forward_matches_numpy(case, device, rng):
    arrays = case.inputs(rng)
    out = case.fn(*make_tensors(arrays, device))
    expected = np.asarray(case.ref(*arrays))
    assert out.shape == expected.shape
    assert out.dtype == np.float64
    assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_takes_read_only_broadcast_grads_and_never_writes_them(case, dtype, device, rng):
    """y.sum().backward() hands y's op a read-only, stride-0 view of ones; y.backward(g) hands it g itself.
    Both must give the same gradients, and no backward may write into the gradient it is given."""
    arrays = case.inputs(rng)
    tinygpt.manual_seed(0)
    a = make_tensors(arrays, device, dtype)
    case.fn(*a).sum().backward()
    tinygpt.manual_seed(0)
    b = make_tensors(arrays, device, dtype)
    y = case.fn(*b)
    g = tinygpt.backend.to_device(np.ones(y.shape, dtype), y.device)
    y.backward(g)
    assert (tinygpt.backend.to_numpy(g) == 1).all(), "backward wrote into the caller's gradient"
    for ta, tb in zip(a, b):
        if ta.requires_grad:
            assert_allclose(tinygpt.backend.to_numpy(ta.grad), tinygpt.backend.to_numpy(tb.grad),
                            rtol=1e-6, atol=1e-7)


def _t(a, device, **kw):
    return tinygpt.tensor(a, device=device, **kw)


# --- gradients with a closed form ----------------------------------------------------------------------

def test_max_shares_gradient_among_ties(device):
    x = _t([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], device, requires_grad=True)
    x.max(axis=1).sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(x.grad), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    y = _t([5.0, 1.0, 5.0], device, requires_grad=True)
    y.max().backward()
    assert_allclose(tinygpt.backend.to_numpy(y.grad), [0.5, 0, 0.5])


def test_pow_gradients_at_zero(device):
    x = _t([0.0, 0.0, 0.0], device, requires_grad=True)
    (x ** 0 + x ** 1 + x ** 2).sum().backward()  # 0 + 1 + 0, as torch gives
    assert_allclose(tinygpt.backend.to_numpy(x.grad), [1.0, 1.0, 1.0])


def test_getitem_repeated_indices_accumulate(device):
    x = _t(np.arange(5.0), device, requires_grad=True)
    (x[[0, 0, 3, 0]] * _t([1.0, 2.0, 3.0, 4.0], device)).sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(x.grad), [7, 0, 0, 3, 0])
    w = _t(np.ones((4, 2)), device, requires_grad=True)
    w[np.array([[1, 1], [2, 1]])].sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(w.grad), [[0, 0], [3, 3], [1, 1], [0, 0]])


def test_embedding_repeated_ids_accumulate(device):
    w = _t(np.zeros((4, 3)), device, requires_grad=True)
    ids = _t(np.array([[2, 2], [0, 2]]), device)
    g = np.arange(12.0, dtype=np.float32).reshape(2, 2, 3)
    F.embedding(ids, w).backward(g)
    expected = np.zeros((4, 3), np.float32)
    expected[2] = g[0, 0] + g[0, 1] + g[1, 1]
    expected[0] = g[1, 0]
    assert_allclose(tinygpt.backend.to_numpy(w.grad), expected)


def test_embedding_out_of_range_id_raises(device):
    w = _t(np.zeros((4, 3)), device, requires_grad=True)
    with pytest.raises(IndexError, match="id 4 is out of range for a table of 4 rows"):
        F.embedding(_t(np.array([0, 4]), device), w)
    with pytest.raises(IndexError, match="id -1"):
        F.embedding(_t(np.array([-1, 2]), device), w)
    with pytest.raises(TypeError, match="integer"):
        F.embedding(_t([0.0, 1.0], device), w)


def test_cross_entropy_gradient_is_softmax_minus_onehot(device):
    z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    t = np.array([1, -1, 0])
    logits = _t(z, device, dtype=np.float64, requires_grad=True)
    F.cross_entropy(logits, _t(t, device)).backward()
    expected = np_softmax(z)
    expected[[0, 2], [1, 0]] -= 1
    expected[1] = 0  # ignored row
    assert_allclose(tinygpt.backend.to_numpy(logits.grad), expected / 2, rtol=1e-12)


def test_cross_entropy_accepts_numpy_and_list_targets(device):
    z = _t(np.zeros((2, 4)), device, requires_grad=True)
    for targets in (np.array([1, 2]), [1, 2]):
        assert math.isclose(F.cross_entropy(z, targets).item(), math.log(4), rel_tol=1e-6)
    with pytest.raises(ValueError, match="targets of shape"):
        F.cross_entropy(z, np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integer class ids"):
        F.cross_entropy(z, np.array([1.0, 2.0]))


# --- stability ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_cross_entropy_extreme_logits_are_finite(device, scale):
    z = np.array([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 1.0]]) * scale
    logits = _t(z, device, requires_grad=True)
    loss = F.cross_entropy(logits, _t(np.array([1, 2]), device))
    loss.backward()
    g = tinygpt.backend.to_numpy(logits.grad)
    assert np.isfinite(loss.item()) and np.isfinite(g).all()
    # row 0: target 1 is 2e4 below the max -> loss 2e4 exactly (up to the float32 sum)
    lp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(-(lp[0, 1] + lp[1, 2]) / 2, rel=1e-6)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_extreme_inputs_are_finite(device, fn):
    x = _t(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]), device, requires_grad=True)
    y = fn(x)
    (y * _t(np.array([[1.0, 2.0, 3.0], [1.0, -1.0, 0.5]]), device)).sum().backward()
    out = y.numpy()
    assert np.isfinite(out).all() and np.isfinite(tinygpt.backend.to_numpy(x.grad)).all()
    if fn is F.softmax:
        assert_allclose(out, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)
    else:
        assert_allclose(out[0, [0, 2]], [0, -1e4], rtol=1e-7)
        assert_allclose(out[1], [-math.log(3)] * 3, rtol=1e-6)


def test_sigmoid_extreme_inputs(device):
    x = _t([-1e4, -50.0, 0.0, 50.0, 1e4], device, requires_grad=True)
    y = F.sigmoid(x)
    y.sum().backward()
    assert_allclose(y.numpy(), [0, 0, 0.5, 1, 1], atol=1e-7)
    assert np.isfinite(tinygpt.backend.to_numpy(x.grad)).all()


@pytest.mark.parametrize("sa, sb", [((0, 3), (3,)), ((2, 0, 3), (0, 3)), ((0,), (1,)), ((3, 1), (3, 0)),
                                    ((0, 2), (1, 2))])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_zero_size_broadcasting(device, sa, sb, op):
    a = _t(np.ones(sa), device, requires_grad=True)
    b = _t(np.full(sb, 2.0), device, requires_grad=True)
    y = getattr(a, f"__{'truediv' if op == 'div' else op}__")(b)
    assert y.shape == np.broadcast_shapes(sa, sb) and y.size == 0
    y.sum().backward()
    assert a.grad.shape == sa and b.grad.shape == sb
    assert not backend_np(a.grad).any() and not backend_np(b.grad).any()  # sums over nothing are 0


def backend_np(x):
    return tinygpt.backend.to_numpy(x)


def test_matmul_with_host_operands_takes_the_tensor_dtype(device):
    x = _t(np.arange(6.0).reshape(3, 2), device, requires_grad=True)
    y = np.ones((2, 3)) @ x @ np.array([[1.0], [2.0]])
    assert y.dtype == np.float32 and y.device is x.device
    y.sum().backward()
    assert_allclose(backend_np(x.grad), [[2, 4]] * 3)


# --- forward properties -----------------------------------------------------------------------------------

def test_kv_cache_attention_is_the_last_rows_of_full_causal_attention(device, rng):
    q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))
    full = F.scaled_dot_product_attention(*(_t(a, device) for a in (q, k, v))).numpy()
    for n in (2, 1):                        # one query (decoding) needs no mask: it is the newest position
        last = F.scaled_dot_product_attention(_t(q[:, :, -n:], device), _t(k, device), _t(v, device)).numpy()
        assert_allclose(last, full[:, :, -n:], rtol=1e-5, atol=1e-6)
    # causal: the first query sees only the first key
    assert_allclose(full[:, :, 0], v[:, :, 0], rtol=1e-5, atol=1e-6)


def test_attention_mask_cache_stays_small(rng):
    from tinygpt.ops import attention
    for T in range(2, 40):                  # uncached generation: a new length every token
        q = tinygpt.tensor(rng.standard_normal((1, 1, T, 2)).astype(np.float32))
        F.scaled_dot_product_attention(q, q, q)
    assert len(attention._additive_masks) <= attention._MAX_MASKS
    assert (39, 39, np.dtype(np.float32)) in attention._additive_masks


def test_attention_matches_reference_in_float32(device, rng):
    q, k, v = (rng.standard_normal((2, 2, 5, 8)) for _ in range(3))
    out = F.scaled_dot_product_attention(*(_t(a, device) for a in (q, k, v)))
    assert out.dtype == np.float32
    assert_allclose(out.numpy(), np_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq,Tk", [(33, 33), (40, 70), (1, 70), (8, 130)])
def test_attention_on_both_transpose_paths(Tq, Tk, device, rng):
    """On the CPU kᵀ and vᵀ are copied contiguous for 32+ queries against up to 128 keys and used as views
    otherwise (ops/attention.py _transposed): both must give the float32 reference and pass gradcheck."""
    q = rng.standard_normal((1, 2, Tq, 3))
    k, v = (rng.standard_normal((1, 2, Tk, 3)) for _ in range(2))
    out = F.scaled_dot_product_attention(*(_t(a, device) for a in (q, k, v)))
    assert_allclose(out.numpy(), np_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert tinygpt.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             make_tensors([q, k, v], device), mode="random", n_directions=6)


def test_layer_norm_normalizes(device, rng):
    x = _t(rng.standard_normal((4, 16)) * 5 + 3, device)
    y = F.layer_norm(x, _t(np.ones(16), device), _t(np.zeros(16), device)).numpy()
    assert_allclose(y.mean(-1), 0, atol=1e-5)
    assert_allclose(y.var(-1), 1, rtol=1e-3)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeroes_a_fraction_p_and_rescales(device, p):
    x = _t(np.ones((200, 100)), device, requires_grad=True)
    y = F.dropout(x, p)
    out = y.numpy()
    kept = out != 0
    assert abs(1 - kept.mean() - p) < 0.02
    assert_allclose(out[kept], 1 / (1 - p), rtol=1e-6)
    y.sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(x.grad), out)  # dx = mask / (1-p)


def test_dropout_is_repeatable_under_manual_seed(device):
    x = _t(np.ones((10, 10)), device)
    tinygpt.manual_seed(5)
    a = F.dropout(x, 0.5).numpy()
    b = F.dropout(x, 0.5).numpy()
    tinygpt.manual_seed(5)
    c = F.dropout(x, 0.5).numpy()
    assert (a == c).all() and not (a == b).all()


def test_dropout_identity_and_errors(device):
    x = _t(np.ones(4), device, requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout: p must be in"):
            F.dropout(x, p)


def test_attention_dropout_is_repeatable_and_changes_output(device, rng):
    q, k, v = (_t(rng.standard_normal((1, 2, 4, 3)), device) for _ in range(3))
    tinygpt.manual_seed(1)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy()
    tinygpt.manual_seed(1)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy()
    c = F.scaled_dot_product_attention(q, k, v).numpy()
    assert (a == b).all() and not np.allclose(a, c)


def test_masked_fill_and_where_pass_no_gradient_to_filled_places(device):
    x = _t(np.ones((2, 2)), device, requires_grad=True)
    mask = np.array([[True, False], [False, True]])
    F.masked_fill(x, _t(mask, device), 0.0).sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(x.grad), ~mask)


def test_masked_fill_accepts_a_host_mask(device):
    x = _t(np.ones((2, 3)), device, requires_grad=True)
    y = F.masked_fill(x, np.array([True, False, True]), -1.0)
    assert_allclose(y.numpy(), [[-1, 1, -1]] * 2)


def test_getitem_with_tensor_index_from_the_host(device):
    x = _t(np.arange(6.0).reshape(3, 2), device, requires_grad=True)
    x[tinygpt.tensor([2, 0, 2])].sum().backward()
    assert_allclose(tinygpt.backend.to_numpy(x.grad), [[1, 1], [0, 0], [2, 2]])


def test_comparisons_give_masks_without_graph(device):
    x = _t([1.0, 2.0, 3.0], device, requires_grad=True)
    for m, expected in ((x > 2, [0, 0, 1]), (x >= 2, [0, 1, 1]), (x < 2, [1, 0, 0]), (x <= 2, [1, 1, 0])):
        assert m.dtype == np.bool_ and not m.requires_grad
        assert (m.numpy() == np.array(expected, bool)).all()


# --- clear errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda a, b: a @ b.T, "matmul: shapes"),
    (lambda a, b: tinygpt.tensor(2.0) @ a, "at least 1 dimension"),
    (lambda a, b: F.linear(a, b), "linear: input has 3 features"),
    (lambda a, b: F.layer_norm(a, b), "layer_norm: weight has shape"),
    (lambda a, b: a.permute(0, 0), "not a permutation"),
    (lambda a, b: a.sum(axis=2), "axis 2 is out of range"),
    (lambda a, b: F.gelu(a, approximate="fast"), "approximate must be"),
    (lambda a, b: F.scaled_dot_product_attention(a.reshape(1, 1, 2, 3), b.reshape(1, 1, 4, 2),
                                                 b.reshape(1, 1, 4, 2)), "do not fit"),
    (lambda a, b: F.scaled_dot_product_attention(b.reshape(1, 1, 4, 2), a[:, :2].reshape(1, 1, 2, 2),
                                                 a[:, :2].reshape(1, 1, 2, 2)), "4 queries but only 2 keys"),
    (lambda a, b: F.cat([]), "at least one"),
    (lambda a, b: F.stack([]), "at least one"),
    (lambda a, b: a ** a, "exponent must be"),
])
def test_shape_and_argument_errors(device, call, match):
    a = _t(np.ones((2, 3)), device, requires_grad=True)
    b = _t(np.ones((4, 2)), device, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match=match):
        call(a, b)
