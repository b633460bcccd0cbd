"""A float32 graph stays float32: no op, scalar or constant may upcast it to float64, forward or backward.

NumPy 2 keeps Python floats weak, but NumPy float64 scalars (np.float64(2), np.sqrt(8), x.mean() of a
float64 array) are strong: `float32_array * np.float64(2)` is float64. Tensor.backward casts a wrong
gradient dtype back as a safety net, which would hide such a bug, so the guard below wraps every
Function's forward and backward and checks the raw arrays going in and out, and those it saves.
"""
import numpy as np
import pytest

import tinygpt
import tinygpt.functional as F
from tinygpt.function import Function
from op_cases import CASES, CASE_IDS, make_tensors

F32 = np.dtype(np.float32)


def _all_functions():
    out, todo = [], list(Function.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def _check(where, values, scalars=True):
    """Raise if any float array (or, with scalars=True, NumPy float scalar) in values is not float32."""
    for v in values:
        if isinstance(v, (list, tuple)):
            _check(where, v, scalars)
        if not scalars and isinstance(v, np.generic):
            continue
        dt = getattr(v, "dtype", None)
        if dt is not None and not isinstance(v, type) and np.dtype(dt).kind == "f" and dt != F32:
            raise AssertionError(f"{where}: float array of dtype {dt} in a float32 graph")


@pytest.fixture
def float32_guard(monkeypatch):
    """Every Function sees, saves and returns only float32 floats while this fixture is active."""
    return _install_guard(monkeypatch)


def _install_guard(monkeypatch):
    calls = []
    for cls in _all_functions():
        if "forward" in vars(cls):
            def fwd(ctx, *args, _cls=cls, _f=cls.forward, **kw):
                # scalar hyper-parameters (eps, p, scale) may be float64: ops cast them with x.dtype.type
                _check(f"{_cls.__name__}.forward input", list(args) + list(kw.values()), scalars=False)
                out = _f(ctx, *args, **kw)
                _check(f"{_cls.__name__}.forward output", [out])
                _check(f"{_cls.__name__} saved", ctx.saved or ())
                calls.append(_cls.__name__)
                return out
            monkeypatch.setattr(cls, "forward", staticmethod(fwd))
        if "backward" in vars(cls):
            def bwd(ctx, g, _cls=cls, _b=cls.backward):
                _check(f"{_cls.__name__}.backward grad_output", [g])
                grads = _b(ctx, g)
                _check(f"{_cls.__name__}.backward grad_input", grads if isinstance(grads, tuple) else [grads])
                calls.append(_cls.__name__ + ".backward")
                return grads
            monkeypatch.setattr(cls, "backward", staticmethod(bwd))
    return calls


def _run32(fn, tensors):
    y = fn(*tensors)
    assert y.dtype == F32, f"output is {y.dtype}"
    y.backward(np.ones(y.shape, np.float32))
    for t in tensors:
        if t.requires_grad:
            assert t.grad is not None and t.grad.dtype == F32, f"grad is {getattr(t.grad, 'dtype', None)}"
    return y


def test_the_guard_catches_an_upcast(monkeypatch):
    """A constant that upcasts inside an op must trip the guard (else the tests below prove nothing)."""
    class LeakyForward(Function):
        @staticmethod
        def forward(ctx, x):
            return x * np.float64(2.0)  # float32 * NumPy float64 scalar -> float64

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class LeakyBackward(LeakyForward):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):  # Tensor.backward would quietly cast this back to float32
            return g * np.sqrt(4.0)

    x = tinygpt.tensor([1.0, 2.0], requires_grad=True)
    LeakyBackward.apply(x).sum().backward()
    assert x.grad.dtype == F32  # the safety net hides the upcast ...
    calls = _install_guard(monkeypatch)
    with pytest.raises(AssertionError, match="LeakyForward.forward output: .*float64"):
        LeakyForward.apply(x)
    with pytest.raises(AssertionError, match="LeakyBackward.backward grad_input: .*float64"):
        LeakyBackward.apply(x).sum().backward()  # ... the guard does not
    assert "LeakyBackward" in calls and "Sum.backward" in calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_op_stays_float32(case, device, rng, float32_guard):
    tinygpt.manual_seed(0)
    _run32(case.fn, make_tensors(case.inputs(rng), device, np.float32))
    assert float32_guard or case.name == "dropout_eval"  # the guard did see the ops


_m = np.array([[True, False, True, False]] * 3)
SCALARS = [
    ("add_np64", lambda x: x + np.float64(0.5)), ("radd_np64", lambda x: np.float64(0.5) + x),
    ("sub_np64", lambda x: x - np.float64(1.0)), ("rsub_np64", lambda x: np.float64(1.0) - x),
    ("mul_sqrt8", lambda x: x * np.sqrt(8)), ("rmul_sqrt8", lambda x: np.sqrt(8) * x),
    ("div_np64", lambda x: x / np.float64(3.0)), ("rdiv_np64", lambda x: np.float64(3.0) / x),
    ("py_floats", lambda x: 2.5 * x - 1.5 / x + x / 7.0), ("py_ints", lambda x: 2 * x + 3 - 1 / x),
    ("pow_np64", lambda x: x ** np.float64(2.0)), ("pow_np64_frac", lambda x: x ** np.float64(0.5)),
    ("pow_py_frac", lambda x: x ** 1.5), ("pow_neg_int", lambda x: x ** -2),
    ("np64_0d_array", lambda x: x * np.array(2.0)), ("f64_host_array", lambda x: x + np.ones(4)),
    ("rf64_host_array", lambda x: np.ones(4) * x), ("list_operand", lambda x: x * [1.0, 2.0, 3.0, 4.0]),
    ("matmul_host_f64", lambda x: (np.ones((2, 3)) @ x @ np.ones((4, 2))).sum() + (x @ [0.5, 0.5, 0.5, 0.5]).sum()),
    ("mean", lambda x: x.mean() + x.mean(axis=0).sum() / np.float64(4)),
    ("masked_fill_np64", lambda x: F.masked_fill(x, _m, np.float64(-1e9))),
    ("masked_fill_-inf", lambda x: F.softmax(F.masked_fill(x, _m, -np.inf))),
    ("where_np64_b", lambda x: F.where(_m, x, np.float64(2.0))),
    ("where_np64_a", lambda x: F.where(_m, np.sqrt(2), x)),
    ("where_scalars_cmp", lambda x: F.where(x > np.float64(1.0), x, x * np.float64(0.1))),
    ("layer_norm_np64_eps", lambda x: F.layer_norm(x, tinygpt.tensor(np.ones(4)), tinygpt.tensor(np.zeros(4)),
                                                  eps=np.float64(1e-5))),
    ("dropout_np64_p", lambda x: F.dropout(x, np.float64(0.25))),
    ("gelu", lambda x: F.gelu(x) + F.gelu(x, approximate="tanh")),
    ("softmax_np64_temp", lambda x: F.softmax(x / np.float64(0.7))),
    ("cross_entropy_int32", lambda x: F.cross_entropy(x, np.array([0, 3, 1], dtype=np.int32))),
    ("attention_np64", lambda x: F.scaled_dot_product_attention(
        x.reshape(1, 1, 3, 4), x.reshape(1, 1, 3, 4) * np.sqrt(2), x.reshape(1, 1, 3, 4),
        scale=np.float64(0.3), dropout_p=np.float64(0.1))),
]


@pytest.mark.parametrize("fn", [f for _, f in SCALARS], ids=[n for n, _ in SCALARS])
def test_scalars_and_constants_never_upcast(fn, float32_guard):
    x = tinygpt.tensor(np.random.default_rng(0).uniform(0.5, 2.0, (3, 4)), requires_grad=True)
    assert x.dtype == F32
    _run32(fn, [x])


def test_float64_graph_stays_float64():
    """The other direction: float64 tensors (gradcheck's) keep float64 with Python/NumPy scalars."""
    x = tinygpt.tensor([1.0, 2.0], dtype=np.float64, requires_grad=True)
    y = (2 * x + np.float32(1.5)) / np.sqrt(8) + x ** 0.5
    y.sum().backward()
    assert y.dtype == np.float64 and x.grad.dtype == np.float64


def test_constructor_never_gives_float64_by_default():
    for data in (1.0, [1.0, 2.0], np.float64(3.0), np.sqrt(8), np.ones(3), np.ones(3, np.float32)):
        assert tinygpt.tensor(data).dtype == F32
    assert tinygpt.tensor(np.ones(3), dtype=np.float64).dtype == np.float64
