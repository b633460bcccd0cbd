"""The op suite shared by the engine tests: every differentiable op, with an independent reference.

Each `Case` has
    fn(*tensors)        the tinygpt call (float inputs are differentiated, int/bool inputs are ids/masks)
    inputs(rng)         NumPy arrays: floats in float64 (tests cast), ints and bools as they are
    ref(*arrays)        the forward in plain NumPy/math, or None where randomness makes it device-bound
    torch(T, *tensors)  the PyTorch equivalent (T is the torch module), or None

Used by test_ops.py (gradcheck + forward vs ref on every device), test_strict_device.py (the strict
device against the CPU), test_float32.py (no float64 anywhere) and test_torch_parity.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import tinygpt
import tinygpt.functional as F
import tinygpt.nn.functional as NF   # torch's signatures (the lecture's `F`)


@dataclass
class Case:
    name: str
    fn: Callable
    inputs: Callable
    ref: Callable | None = None
    torch: Callable | None = None

    def __repr__(self):
        return self.name


def make_tensors(arrays, device="cpu", dtype=np.float64, requires_grad=True):
    """Float arrays -> differentiable Tensors of `dtype` on `device`; int/bool arrays -> plain Tensors."""
    out = []
    for a in arrays:
        if a.dtype.kind == "f":
            out.append(tinygpt.tensor(a, dtype=dtype, device=device, requires_grad=requires_grad))
        else:
            out.append(tinygpt.tensor(a, device=device))
    return out


# --- NumPy references -----------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def np_cross_entropy(logits, targets, ignore_index=-1):
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    lp = np_log_softmax(z)
    keep = t != ignore_index
    return -lp[np.arange(len(t))[keep], t[keep]].mean()


def np_layer_norm(x, w, b=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def np_attention(q, k, v, causal=True, scale=None):
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
        s = np.where(j <= i + Tk - Tq, s, -np.inf)
    return np_softmax(s) @ v


def torch_kv_mask(T, Tq, Tk):
    """torch's is_causal aligns top-left; the KV-cache convention is bottom-right: an explicit mask."""
    i, j = T.arange(Tq)[:, None], T.arange(Tk)[None, :]
    return j <= i + Tk - Tq


# --- input makers --------------------------------------------------------------------------------------

def randn(*shapes, scale=1.0):
    return lambda rng: [rng.standard_normal(s) * scale for s in shapes]


def positive(*shapes):
    return lambda rng: [rng.uniform(0.5, 2.0, s) for s in shapes]


def away_from_zero(*shapes):
    """Values with |x| in [0.2, 2]: kinks (relu at 0) stay out of the finite-difference step."""
    def make(rng):
        return [rng.uniform(0.2, 2.0, s) * rng.choice([-1.0, 1.0], s) for s in shapes]
    return make


def _ce_inputs(shape, V, ignore=(), ignore_index=-1):
    def make(rng):
        logits = rng.standard_normal(shape + (V,)) * 2
        t = rng.integers(0, V, shape)
        flat = t.reshape(-1)
        for i in ignore:
            flat[i] = ignore_index
        return [logits, t]
    return make


def _reseeded(f):
    """Run f after tinygpt.manual_seed(0), so dropout draws the same mask on every call (gradcheck)."""
    def g(*args):
        tinygpt.manual_seed(0)
        return f(*args)
    return g


# --- the cases -----------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(name, fn, inputs, ref=None, torch=None):
    CASES.append(Case(name, fn, inputs, ref, torch))


# arithmetic with broadcasting, and the reflected forms
for _sa, _sb in [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 3), (4, 3)), ((3, 1), (1, 4)), ((), (2, 3))]:
    _tag = f"{_sa}{_sb}".replace(" ", "")
    case(f"add{_tag}", lambda a, b: a + b, randn(_sa, _sb), np.add, lambda T, a, b: a + b)
    case(f"sub{_tag}", lambda a, b: a - b, randn(_sa, _sb), np.subtract, lambda T, a, b: a - b)
    case(f"mul{_tag}", lambda a, b: a * b, randn(_sa, _sb), np.multiply, lambda T, a, b: a * b)
    case(f"div{_tag}", lambda a, b: a / b, positive(_sa, _sb), np.divide, lambda T, a, b: a / b)
case("radd", lambda x: 2 + x, randn((3, 4)), lambda x: 2 + x, lambda T, x: 2 + x)
case("rsub", lambda x: 2 - x, randn((3, 4)), lambda x: 2 - x, lambda T, x: 2 - x)
case("rmul", lambda x: 2.5 * x, randn((3, 4)), lambda x: 2.5 * x, lambda T, x: 2.5 * x)
case("rdiv", lambda x: 2 / x, positive((3, 4)), lambda x: 2 / x, lambda T, x: 2 / x)
case("sub_scalar", lambda x: x - 0.5, randn((3, 4)), lambda x: x - 0.5, lambda T, x: x - 0.5)
case("div_scalar", lambda x: x / 3, randn((3, 4)), lambda x: x / 3, lambda T, x: x / 3)
case("np_scalar_left", lambda x: np.float64(2.0) * x - np.sqrt(8) / (x * x + 1),
     randn((3, 4)), lambda x: 2.0 * x - np.sqrt(8) / (x * x + 1),
     lambda T, x: 2.0 * x - math.sqrt(8) / (x * x + 1))
for _p in [2, 3, 0.5, -1, -1.5, 0]:
    case(f"pow{_p}", lambda x, p=_p: x ** p, positive((3, 4)), lambda x, p=_p: x ** p,
         lambda T, x, p=_p: x ** p)
case("pow_negative_base", lambda x: x ** 3, randn((3, 4)), lambda x: x ** 3, lambda T, x: x ** 3)
case("neg", lambda x: -x, randn((3, 4)), np.negative, lambda T, x: -x)
case("exp", lambda x: x.exp(), randn((3, 4)), np.exp, lambda T, x: x.exp())
case("log", lambda x: x.log(), positive((3, 4)), np.log, lambda T, x: x.log())
case("sqrt", lambda x: x.sqrt(), positive((3, 4)), np.sqrt, lambda T, x: x.sqrt())
case("tanh", lambda x: x.tanh(), randn((3, 4)), np.tanh, lambda T, x: x.tanh())
case("F.exp_log_sqrt_tanh", lambda x: F.exp(x) + F.log(x) + F.sqrt(x) + F.tanh(x), positive((3,)),
     lambda x: np.exp(x) + np.log(x) + np.sqrt(x) + np.tanh(x),
     lambda T, x: x.exp() + x.log() + x.sqrt() + x.tanh())
case("diamond", lambda x: (x * x + x) * x.exp(), randn((3, 4)), lambda x: (x * x + x) * np.exp(x),
     lambda T, x: (x * x + x) * x.exp())

# reductions
def _torch_reduce(x, op, axis, keepdims):
    f = getattr(x, "amax" if op == "max" else op)
    if axis is None:
        y = f()
        return y.reshape((1,) * x.ndim) if keepdims else y
    return f(dim=axis, keepdim=keepdims)


for _op in ("sum", "mean", "max"):
    for _axis in (None, 0, -1, 1, (0, 2), (-1, 0), (0, 1, 2)):
        for _kd in (False, True):
            case(f"{_op}(axis={_axis},keepdims={_kd})",
                 lambda x, op=_op, ax=_axis, kd=_kd: getattr(x, op)(axis=ax, keepdims=kd),
                 randn((2, 3, 4)),
                 lambda x, op=_op, ax=_axis, kd=_kd: getattr(np, op)(x, axis=ax, keepdims=kd),
                 lambda T, x, op=_op, ax=_axis, kd=_kd: _torch_reduce(x, op, ax, kd))
case("sum_of_1d", lambda x: x.sum(), randn((5,)), np.sum, lambda T, x: x.sum())

# matmul
for _sa, _sb in [((4,), (4,)), ((4,), (4, 3)), ((3, 4), (4,)), ((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                 ((2, 3, 4), (4, 5)), ((2, 2, 3, 4), (2, 2, 4, 3)), ((2, 1, 3, 4), (5, 4, 2)),
                 ((3, 4), (2, 4, 5)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,))]:
    case(f"matmul{_sa}@{_sb}".replace(" ", ""), lambda a, b: a @ b, randn(_sa, _sb), np.matmul,
         lambda T, a, b: a @ b)
case("F.matmul", lambda a, b: F.matmul(a, b), randn((2, 3), (3, 2)), np.matmul, lambda T, a, b: a @ b)

# shapes
case("reshape", lambda x: x.reshape(4, 6), randn((2, 3, 4)), lambda x: x.reshape(4, 6),
     lambda T, x: x.reshape(4, 6))
case("reshape_tuple_-1", lambda x: x.reshape((3, -1)), randn((2, 3, 4)), lambda x: x.reshape(3, -1),
     lambda T, x: x.reshape(3, -1))
case("view", lambda x: x.view(-1), randn((2, 3)), lambda x: x.reshape(-1), lambda T, x: x.reshape(-1))
case("transpose(0,2)", lambda x: x.transpose(0, 2), randn((2, 3, 4)), lambda x: x.swapaxes(0, 2),
     lambda T, x: x.transpose(0, 2))
case("transpose(1,2)", lambda x: x.transpose(1, 2), randn((2, 3, 4, 5)), lambda x: x.swapaxes(1, 2),
     lambda T, x: x.transpose(1, 2))
case("transpose_default", lambda x: x.transpose(), randn((2, 3, 4)), lambda x: x.swapaxes(-1, -2),
     lambda T, x: x.transpose(-2, -1))
case("permute", lambda x: x.permute(2, 0, 1), randn((2, 3, 4)), lambda x: x.transpose(2, 0, 1),
     lambda T, x: x.permute(2, 0, 1))
case("permute_tuple", lambda x: x.permute((0, 2, 1, 3)), randn((2, 3, 4, 5)),
     lambda x: x.transpose(0, 2, 1, 3), lambda T, x: x.permute(0, 2, 1, 3))
case("T", lambda x: x.T, randn((3, 4)), lambda x: x.T, lambda T, x: x.T)

# indexing (numpy index arrays and lists are constants here; they move to the tensor's device)
_IDX = [
    ("int", 1), ("neg_int", -1), ("slice", slice(1, 3)), ("tuple", (slice(None), 2)),
    ("ellipsis_step", (Ellipsis, slice(None, None, 2))), ("none", (None, slice(1, None))),
    ("list_repeat", [0, 2, 0, 0]), ("array2d_repeat", np.array([[0, 1], [1, 1]])),
    ("pair_arrays_repeat", (np.array([0, 0, 2]), np.array([1, 1, 3]))),
    ("slice_and_list", (slice(None), [3, 3, 0])), ("np_int", np.int64(2)),
    ("bool_mask", np.array([True, False, True])),
]
for _n, _i in _IDX:
    case(f"getitem[{_n}]", lambda x, i=_i: x[i], randn((3, 4)), lambda x, i=_i: x[i],
         lambda T, x, i=_i: x[tuple(T.as_tensor(j) if isinstance(j, np.ndarray) else j for j in i)
                              if isinstance(i, tuple) else T.as_tensor(i) if isinstance(i, np.ndarray) else i])
case("getitem[int_tensor]", lambda x, i: x[i], lambda rng: [rng.standard_normal((4, 3)),
                                                           np.array([3, 0, 3, 3])],
     lambda x, i: x[i], lambda T, x, i: x[i])

# activations
case("relu", lambda x: x.relu(), away_from_zero((3, 4)), lambda x: np.maximum(x, 0),
     lambda T, x: T.relu(x))
case("F.relu", lambda x: F.relu(x), away_from_zero((3, 4)), lambda x: np.maximum(x, 0),
     lambda T, x: T.relu(x))
case("gelu", lambda x: F.gelu(x), randn((4, 5), scale=2.0), np_gelu,
     lambda T, x: T.nn.functional.gelu(x))
case("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), randn((4, 5), scale=2.0),
     lambda x: np_gelu(x, "tanh"), lambda T, x: T.nn.functional.gelu(x, approximate="tanh"))
case("sigmoid", lambda x: F.sigmoid(x), randn((3, 4), scale=3.0), lambda x: 1 / (1 + np.exp(-x)),
     lambda T, x: T.sigmoid(x))
case("F.tanh", lambda x: F.tanh(x), randn((3, 4)), np.tanh, lambda T, x: T.tanh(x))
case("softmax", lambda x: F.softmax(x), randn((3, 5), scale=2.0), np_softmax,
     lambda T, x: T.softmax(x, -1))
case("softmax_axis0", lambda x: F.softmax(x, axis=0), randn((3, 5)), lambda x: np_softmax(x, 0),
     lambda T, x: T.softmax(x, 0))
case("softmax_3d", lambda x: F.softmax(x, axis=-1), randn((2, 3, 4)), np_softmax,
     lambda T, x: T.softmax(x, -1))
case("log_softmax", lambda x: F.log_softmax(x), randn((3, 5), scale=2.0), np_log_softmax,
     lambda T, x: T.log_softmax(x, -1))
case("log_softmax_axis1", lambda x: F.log_softmax(x, axis=1), randn((2, 3, 4)),
     lambda x: np_log_softmax(x, 1), lambda T, x: T.log_softmax(x, 1))

# the fused nn ops
case("cross_entropy_2d", lambda z, t: F.cross_entropy(z, t), _ce_inputs((6,), 5), np_cross_entropy,
     lambda T, z, t: T.nn.functional.cross_entropy(z, t))
case("cross_entropy_3d", lambda z, t: F.cross_entropy(z, t), _ce_inputs((2, 3), 5), np_cross_entropy,
     lambda T, z, t: T.nn.functional.cross_entropy(z.reshape(-1, 5), t.reshape(-1)))
case("cross_entropy_ignore", lambda z, t: F.cross_entropy(z, t), _ce_inputs((2, 4), 5, ignore=(1, 6)),
     np_cross_entropy, lambda T, z, t: T.nn.functional.cross_entropy(z.reshape(-1, 5), t.reshape(-1),
                                                                     ignore_index=-1))
case("cross_entropy_ignore_-100", lambda z, t: F.cross_entropy(z, t, ignore_index=-100),
     _ce_inputs((7,), 4, ignore=(0, 3, 4), ignore_index=-100),
     lambda z, t: np_cross_entropy(z, t, -100),
     lambda T, z, t: T.nn.functional.cross_entropy(z, t, ignore_index=-100))
case("layer_norm", lambda x, w, b: F.layer_norm(x, w, b), randn((2, 3, 6), (6,), (6,)), np_layer_norm,
     lambda T, x, w, b: T.nn.functional.layer_norm(x, (6,), w, b))
case("layer_norm_no_bias", lambda x, w: F.layer_norm(x, w), randn((4, 6), (6,)), np_layer_norm,
     lambda T, x, w: T.nn.functional.layer_norm(x, (6,), w))
case("layer_norm_eps", lambda x, w, b: F.layer_norm(x, w, b, eps=1e-2), randn((3, 5), (5,), (5,)),
     lambda x, w, b: np_layer_norm(x, w, b, 1e-2),
     lambda T, x, w, b: T.nn.functional.layer_norm(x, (5,), w, b, eps=1e-2))
case("embedding", lambda ids, w: F.embedding(ids, w),
     lambda rng: [np.array([[1, 3, 1], [0, 1, 3]]), rng.standard_normal((5, 4))],
     lambda ids, w: w[ids], lambda T, ids, w: T.nn.functional.embedding(ids, w))
case("embedding_1d", lambda ids, w: F.embedding(ids, w),
     lambda rng: [np.array([2, 2, 2, 0], dtype=np.int32), rng.standard_normal((3, 2))],
     lambda ids, w: w[ids], lambda T, ids, w: T.nn.functional.embedding(ids.long(), w))
case("dropout_reseeded", _reseeded(lambda x: F.dropout(x, 0.3)), randn((4, 6)))
case("dropout_eval", lambda x: F.dropout(x, 0.3, training=False), randn((3, 4)), lambda x: x,
     lambda T, x: T.nn.functional.dropout(x, 0.3, training=False))
case("masked_fill", lambda x, m: F.masked_fill(x, m, -2.0),
     lambda rng: [rng.standard_normal((2, 3, 3)), np.triu(np.ones((3, 3), dtype=bool), 1)],
     lambda x, m: np.where(m, -2.0, x), lambda T, x, m: x.masked_fill(m, -2.0))
case("masked_fill_-inf_softmax", lambda x, m: F.softmax(F.masked_fill(x, m, float("-inf"))),
     lambda rng: [rng.standard_normal((2, 4, 4)), np.triu(np.ones((4, 4), dtype=bool), 1)],
     lambda x, m: np_softmax(np.where(m, -np.inf, x)),
     lambda T, x, m: T.softmax(x.masked_fill(m, float("-inf")), -1))
case("where", lambda c, a, b: F.where(c, a, b),
     lambda rng: [rng.random((3, 4)) > 0.5, rng.standard_normal((3, 4)), rng.standard_normal((4,))],
     np.where, lambda T, c, a, b: T.where(c, a, b))
case("where_scalar", lambda c, a: F.where(c, a, 0.5),
     lambda rng: [rng.random((3, 4)) > 0.5, rng.standard_normal((1, 4))],
     lambda c, a: np.where(c, a, 0.5), lambda T, c, a: T.where(c, a, T.tensor(0.5, dtype=a.dtype)))
case("where_tensor_cond", lambda x: F.where(x > 0, x, x * 0.1), away_from_zero((3, 4)),
     lambda x: np.where(x > 0, x, x * 0.1), lambda T, x: T.where(x > 0, x, x * 0.1))
case("cat0", lambda a, b: F.cat([a, b]), randn((2, 3), (4, 3)), lambda a, b: np.concatenate([a, b]),
     lambda T, a, b: T.cat([a, b]))
case("cat_last3", lambda a, b, c: F.cat([a, b, c], axis=-1), randn((2, 3, 1), (2, 3, 2), (2, 3, 3)),
     lambda a, b, c: np.concatenate([a, b, c], -1), lambda T, a, b, c: T.cat([a, b, c], -1))
case("stack0", lambda a, b: F.stack([a, b]), randn((2, 3), (2, 3)), lambda a, b: np.stack([a, b]),
     lambda T, a, b: T.stack([a, b]))
case("stack_last", lambda a, b, c: F.stack((a, b, c), axis=-1), randn((2, 3), (2, 3), (2, 3)),
     lambda a, b, c: np.stack([a, b, c], -1), lambda T, a, b, c: T.stack([a, b, c], -1))
case("linear", lambda x, w, b: F.linear(x, w, b), randn((2, 3, 4), (5, 4), (5,)),
     lambda x, w, b: x @ w.T + b, lambda T, x, w, b: T.nn.functional.linear(x, w, b))
case("linear_no_bias", lambda x, w: F.linear(x, w), randn((3, 4), (2, 4)), lambda x, w: x @ w.T,
     lambda T, x, w: T.nn.functional.linear(x, w))
case("linear_1d", lambda x, w, b: F.linear(x, w, b), randn((4,), (3, 4), (3,)),
     lambda x, w, b: x @ w.T + b, lambda T, x, w, b: T.nn.functional.linear(x, w, b))

# attention, (B, H, T, hs)
case("attention_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     randn((2, 2, 4, 3), (2, 2, 4, 3), (2, 2, 4, 3)), np_attention,
     lambda T, q, k, v: T.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
case("attention_full", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
     randn((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)), lambda q, k, v: np_attention(q, k, v, False),
     lambda T, q, k, v: T.nn.functional.scaled_dot_product_attention(q, k, v))
case("attention_kv_cache", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     randn((1, 2, 2, 3), (1, 2, 5, 3), (1, 2, 5, 3)), np_attention,
     lambda T, q, k, v: T.nn.functional.scaled_dot_product_attention(
         q, k, v, attn_mask=torch_kv_mask(T, 2, 5)))
case("attention_scale", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.7),
     randn((1, 1, 3, 2), (1, 1, 3, 2), (1, 1, 3, 2)), lambda q, k, v: np_attention(q, k, v, True, 0.7),
     lambda T, q, k, v: T.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7))
case("attention_dropout_reseeded",
     _reseeded(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)),
     randn((1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 3)))

# non-contiguous inputs (views), as a model makes them: (B, T, H, hs) -> (B, H, T, hs), sliced logits
case("attention_of_transposed_views",
     lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
     randn((2, 4, 2, 3), (2, 4, 2, 3), (2, 4, 2, 3)),
     lambda q, k, v: np_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)),
     lambda T, q, k, v: T.nn.functional.scaled_dot_product_attention(
         q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True))
case("gelu_of_transposed", lambda x: F.gelu(x.T), randn((5, 3)), lambda x: np_gelu(x.T),
     lambda T, x: T.nn.functional.gelu(x.T))
case("softmax_of_transposed", lambda x: F.softmax(x.transpose(0, 1)), randn((4, 3, 2)),
     lambda x: np_softmax(x.swapaxes(0, 1)), lambda T, x: T.softmax(x.transpose(0, 1), -1))
case("layer_norm_of_transposed", lambda x, w: F.layer_norm(x.T, w), randn((3, 5), (3,)),
     lambda x, w: np_layer_norm(x.T, w), lambda T, x, w: T.nn.functional.layer_norm(x.T, (3,), w))
case("cross_entropy_of_sliced_logits", lambda z, t: F.cross_entropy(z[:, :-1], t),
     lambda rng: [rng.standard_normal((2, 4, 5)), rng.integers(0, 5, (2, 3))],
     lambda z, t: np_cross_entropy(z[:, :-1], t),
     lambda T, z, t: T.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 5), t.reshape(-1)))

# a small network's worth of ops in one graph
case("mlp_block", lambda x, w1, w2, g: F.layer_norm(x + F.linear(F.gelu(F.linear(x, w1)), w2), g).sum(-1),
     randn((2, 3, 4), (8, 4), (4, 8), (4,)),
     lambda x, w1, w2, g: np_layer_norm(x + np_gelu(x @ w1.T) @ w2.T, g).sum(-1),
     lambda T, x, w1, w2, g: T.nn.functional.layer_norm(
         x + T.nn.functional.linear(T.nn.functional.gelu(T.nn.functional.linear(x, w1)), w2), (4,), g)
     .sum(-1))

# torch-style names and meanings (the lecture's calls): dim/keepdim, var/std unbiased, casts, triangles
case("sum(dim,keepdim)", lambda x: x.sum(1, keepdim=True), randn((3, 4)), lambda x: x.sum(1, keepdims=True),
     lambda T, x: x.sum(1, keepdim=True))
case("mean(dim=0)", lambda x: tinygpt.mean(x, 0), randn((3, 4)), lambda x: x.mean(0), lambda T, x: T.mean(x, 0))
case("var", lambda x: x.var(), randn((3, 4)), lambda x: x.var(ddof=1), lambda T, x: x.var())
case("var(dim,keepdim)", lambda x: x.var(1, keepdim=True), randn((3, 5)), lambda x: x.var(1, ddof=1, keepdims=True),
     lambda T, x: x.var(1, keepdim=True))
case("var_correction0", lambda x: x.var(dim=(0, 2), correction=0), randn((2, 3, 4)),
     lambda x: x.var((0, 2)), lambda T, x: x.var(dim=(0, 2), correction=0))
case("std", lambda x: x.std(0), randn((4, 3)), lambda x: x.std(0, ddof=1), lambda T, x: x.std(0))
case("max(dim).values", lambda x: x.max(1).values, randn((3, 5)), lambda x: x.max(1),
     lambda T, x: x.max(1).values)
case("max()", lambda x: x.max(), randn((3, 5)), np.max, lambda T, x: x.max())
case("min(dim,keepdim).values", lambda x: x.min(0, keepdim=True).values, randn((3, 5)),
     lambda x: x.min(0, keepdims=True), lambda T, x: x.min(0, keepdim=True).values)
case("clone", lambda x: x.clone() * x, randn((3, 4)), lambda x: x * x, lambda T, x: x.clone() * x)
case("tril", lambda x: tinygpt.tril(x), randn((4, 4)), np.tril, lambda T, x: T.tril(x))
case("triu(1)_batched", lambda x: x.triu(1), randn((2, 3, 4)), lambda x: np.triu(x, 1),
     lambda T, x: x.triu(1))
case("masked_fill_method", lambda x: x.masked_fill(tinygpt.tril(tinygpt.ones_like(x)) == 0, float("-inf"))
     .softmax(-1), randn((2, 4, 4)), lambda x: np_softmax(np.where(np.tril(np.ones((4, 4))) == 0, -np.inf, x)),
     lambda T, x: x.masked_fill(T.tril(T.ones(4, 4)) == 0, float("-inf")).softmax(-1))
case("unsqueeze_squeeze", lambda x: x.unsqueeze(1).squeeze(1) * x.unsqueeze(-1).squeeze(), randn((3, 4)),
     lambda x: x * x, lambda T, x: x.unsqueeze(1).squeeze(1) * x.unsqueeze(-1).squeeze())
case("cat(dim=1)", lambda a, b: tinygpt.cat((a, b), dim=1), randn((2, 3), (2, 2)),
     lambda a, b: np.concatenate([a, b], 1), lambda T, a, b: T.cat((a, b), dim=1))
case("NF.softmax(dim)", lambda x: NF.softmax(x, dim=0), randn((3, 4)), lambda x: np_softmax(x, 0),
     lambda T, x: T.softmax(x, dim=0))
case("NF.layer_norm", lambda x, w, b: NF.layer_norm(x, (5,), w, b), randn((2, 3, 5), (5,), (5,)),
     np_layer_norm, lambda T, x, w, b: T.nn.functional.layer_norm(x, (5,), w, b))
case("NF.layer_norm_no_affine", lambda x: NF.layer_norm(x, 4), randn((3, 4)),
     lambda x: np_layer_norm(x, np.ones(4)), lambda T, x: T.nn.functional.layer_norm(x, (4,)))
case("NF.cross_entropy_dim1", lambda z, t: NF.cross_entropy(z.permute(0, 2, 1), t), _ce_inputs((2, 3), 5),
     np_cross_entropy, lambda T, z, t: T.nn.functional.cross_entropy(z.permute(0, 2, 1), t))
case("NF.cross_entropy_sum", lambda z, t: NF.cross_entropy(z, t, reduction="sum"),
     _ce_inputs((6,), 5, ignore=(2,), ignore_index=-100),
     lambda z, t: np_cross_entropy(z, t, -100) * 5,
     lambda T, z, t: T.nn.functional.cross_entropy(z, t, reduction="sum"))
case("NF.cross_entropy_none", lambda z, t: NF.cross_entropy(z, t, reduction="none"), _ce_inputs((4,), 3),
     lambda z, t: -np_log_softmax(z)[np.arange(4), t],
     lambda T, z, t: T.nn.functional.cross_entropy(z, t, reduction="none"))


# --- the speedrun options' ops (tinygpt/ops/norm.py): RMSNorm, ReLU², rotary position embedding ------------
def np_rms_norm(x, w, eps=1e-5):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_rotary(x):
    """Each pair (x_i, x_{i+hs/2}) as the complex number x_i + i·x_{i+hs/2}, times e^(−iθ), θ = t·10000^(−2i/hs)."""
    T, hs = x.shape[-2:]
    h = hs // 2
    theta = np.arange(T)[:, None] * 10000.0 ** (-np.arange(h)[None, :] * 2.0 / hs)
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(-1j * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def _rope(x):
    from tinygpt.ops import norm as norm_ops
    return norm_ops.rotary(x, *norm_ops.rotary_tables(x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype))


def _torch_rope(T, x):
    Tn, hs = x.shape[-2:]
    h = hs // 2
    theta = T.arange(Tn, dtype=x.dtype)[:, None] * 10000.0 ** (-T.arange(h, dtype=x.dtype)[None, :] * 2.0 / hs)
    c, s = T.cos(theta), T.sin(theta)
    x1, x2 = x[..., :h], x[..., h:]
    return T.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)


def _norm_ops():
    from tinygpt.ops import norm as norm_ops
    return norm_ops


case("rms_norm", lambda x, w: _norm_ops().rms_norm(x, w), randn((2, 3, 6), (6,)), np_rms_norm,
     lambda T, x, w: T.nn.functional.rms_norm(x, (6,), w, eps=1e-5))
case("rms_norm_of_transposed", lambda x, w: _norm_ops().rms_norm(x.T, w) * 2, randn((3, 5), (3,)),
     lambda x, w: np_rms_norm(x.T, w) * 2, lambda T, x, w: T.nn.functional.rms_norm(x.T, (3,), w, eps=1e-5) * 2)
case("relu_squared", lambda x: _norm_ops().relu_squared(x), away_from_zero((3, 5)), lambda x: np.maximum(x, 0) ** 2,
     lambda T, x: T.relu(x) ** 2)
case("rotary", _rope, randn((2, 3, 5, 8)), np_rotary, _torch_rope)
case("rotary_of_qkv_slice", lambda x: _rope(x.reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)[1]),
     randn((2, 5, 24)), lambda x: np_rotary(x.reshape(2, 5, 3, 2, 4).transpose(2, 0, 3, 1, 4)[1]),
     lambda T, x: _torch_rope(T, x.reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)[1]))

CASE_IDS = [c.name for c in CASES]
