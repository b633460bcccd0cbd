"""A strict stand-in for CuPy: proves, on a machine without a GPU, that no op calls NumPy on a device array.

`StrictArray` wraps a NumPy array but is NOT an ndarray: it implements the array API that CuPy arrays
have and our ops use (shape, dtype, operators, reshape, reductions, indexing, ...), and refuses every
implicit trip into NumPy:

    np.asarray(s)        -> TypeError("implicit conversion to NumPy")   (__array__)
    np.exp(s)            -> TypeError                                    (__array_ufunc__ = None)
    np.concatenate([s])  -> TypeError                                    (__array_function__)
    s + np.ones(3)       -> TypeError (a host array mixed into device math, which CuPy also refuses)

`strict_xp` is the module-like namespace that plays `cupy`: each function unwraps its StrictArray
arguments, calls NumPy, and wraps the result. Like CuPy, it refuses host ndarrays anywhere except in
`asarray` (the explicit host -> device copy); `asnumpy` is the explicit way back. Both directions are
counted (`TRANSFERS`), so a test can prove that a training step never waits for the device.

    from strict_xp import register
    register()                                   # device "strict" for tinygpt.tensor(..., device="strict")
"""
from __future__ import annotations

import builtins
import operator
from types import SimpleNamespace

import numpy as np

__all__ = ["StrictArray", "strict_xp", "register", "DEVICE", "TRANSFERS", "reset_transfers"]

DEVICE = "strict"


class StrictArray:
    """A device array that only talks to `strict_xp` (and to Python scalars / NumPy scalars)."""

    __slots__ = ("_a",)
    # NumPy scalars on the left (np.float32(2) * s) return NotImplemented and defer to __rmul__, and
    # every NumPy ufunc called on a StrictArray raises TypeError ("does not support ufuncs").
    __array_ufunc__ = None

    def __init__(self, a: np.ndarray):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"StrictArray wraps a numpy.ndarray, not {type(a).__name__}")
        self._a = a

    # --- refusing NumPy ----------------------------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion to NumPy: a StrictArray (device array) was handed to NumPy; "
                        "use the device's xp, or backend.to_numpy for an explicit copy")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"implicit conversion to NumPy: numpy.{func.__name__} was called on a StrictArray; "
                        "call it through the device's xp")

    # --- facts -------------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: StrictArray(self._a.T))
    mT = property(lambda self: StrictArray(self._a.swapaxes(-1, -2)))

    @property
    def base(self):
        """Like ndarray.base / cupy.ndarray.base: None unless this array is a view of another."""
        return None if self._a.base is None else _wrap(self._a.base)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    def __repr__(self):
        _count("to_host")
        return f"StrictArray({self._a!r})"

    # explicit, syncing conversions (CuPy allows these too); each one counts as a device -> host transfer
    def __bool__(self):
        _count("to_host")
        return bool(self._a)

    def __float__(self):
        _count("to_host")
        return float(self._a)

    def __int__(self):
        _count("to_host")
        return int(self._a)

    def item(self):
        _count("to_host")
        return self._a.item()

    def tolist(self):
        _count("to_host")
        return self._a.tolist()

    def get(self):
        """cupy.ndarray.get(): an explicit copy to a host NumPy array."""
        _count("to_host")
        return self._a.copy()

    # --- methods -----------------------------------------------------------------------------------
    def reshape(self, *shape, **kw):
        return _wrap(self._a.reshape(*shape, **kw))

    def transpose(self, *axes):
        return _wrap(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return _wrap(self._a.swapaxes(a, b))

    def astype(self, dtype, copy=True):
        return _wrap(self._a.astype(dtype, copy=copy))

    def copy(self):
        return _wrap(self._a.copy())

    def fill(self, value):
        self._a.fill(_unwrap(value))

    def ravel(self):
        return _wrap(self._a.ravel())

    def flatten(self):
        return _wrap(self._a.flatten())

    def squeeze(self, axis=None):
        return _wrap(self._a.squeeze(axis))

    def clip(self, a_min=None, a_max=None):
        return _wrap(self._a.clip(_unwrap(a_min), _unwrap(a_max)))

    def dot(self, other):
        return _wrap(self._a.dot(_unwrap(other)))

    def sum(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims))

    def mean(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._a.mean(axis=axis, dtype=dtype, keepdims=keepdims))

    def var(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._a.var(axis=axis, dtype=dtype, keepdims=keepdims))

    def max(self, axis=None, keepdims=False):
        return _wrap(self._a.max(axis=axis, keepdims=keepdims))

    def min(self, axis=None, keepdims=False):
        return _wrap(self._a.min(axis=axis, keepdims=keepdims))

    def any(self, axis=None, keepdims=False):
        return _wrap(self._a.any(axis=axis, keepdims=keepdims))

    def all(self, axis=None, keepdims=False):
        return _wrap(self._a.all(axis=axis, keepdims=keepdims))

    def argmax(self, axis=None):
        return _wrap(self._a.argmax(axis=axis))

    def argmin(self, axis=None):
        return _wrap(self._a.argmin(axis=axis))

    # --- indexing ----------------------------------------------------------------------------------
    # Integer-array indices out of range wrap around, as in CuPy (NumPy raises IndexError): an op that
    # must refuse them has to check them itself (tinygpt's embedding and cross_entropy do).
    def __getitem__(self, key):
        return _wrap(self._a[_cupy_wrap(_unwrap_index(key), self._a.shape)])

    def __setitem__(self, key, value):
        self._a[_cupy_wrap(_unwrap_index(key), self._a.shape)] = _unwrap(value)


def _binary(op, reflected=False):
    def method(self, other):
        if not isinstance(other, (StrictArray, np.ndarray, np.generic, int, float, bool, complex)):
            return NotImplemented  # e.g. a Tensor on the right: let it answer
        o = _unwrap(other)
        return _wrap(op(o, self._a) if reflected else op(self._a, o))
    return method


def _inplace(op):
    def method(self, other):
        self._a = op(self._a, _unwrap(other))  # the i-ops of ndarray return the same (mutated) array
        return self
    return method


_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor,
}
for _name, _op in _BINARY.items():
    setattr(StrictArray, f"__{_name}__", _binary(_op))
    setattr(StrictArray, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(StrictArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(StrictArray, f"__{_name}__", _binary(getattr(operator, _name)))
StrictArray.__neg__ = lambda self: _wrap(-self._a)
StrictArray.__pos__ = lambda self: _wrap(+self._a)
StrictArray.__abs__ = lambda self: _wrap(builtins.abs(self._a))
StrictArray.__invert__ = lambda self: _wrap(~self._a)
StrictArray.__hash__ = None


# --- counting the transfers ----------------------------------------------------------------------------
# Every way a value leaves the device (asnumpy, .get(), bool/int/float, .item(), .tolist(), repr) adds one
# to TRANSFERS["to_host"]; on CUDA each of these makes the host wait for the GPU (a sync). Every host ->
# device copy (asarray of host data) adds one to TRANSFERS["to_device"]. tests/test_gpu_readiness.py
# counts them over a training step.

TRANSFERS = {"to_host": 0, "to_device": 0}


def _count(kind):
    TRANSFERS[kind] += 1


def reset_transfers():
    """Zero the counters; returns the dict (read it after the code under test)."""
    TRANSFERS.update(to_host=0, to_device=0)
    return TRANSFERS


# --- wrapping and unwrapping --------------------------------------------------------------------------

def _wrap(x):
    """NumPy results back onto the device: arrays and NumPy scalars (CuPy returns 0-d arrays)."""
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic):
        return StrictArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x):
    """Arguments for NumPy: StrictArrays unwrap; host ndarrays are refused, as CuPy refuses them."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"strict device: a host numpy.ndarray {x.shape} {x.dtype} was mixed into device "
                        "math; move it explicitly with xp.asarray")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _unwrap_index(key):
    if isinstance(key, tuple):
        return tuple(_unwrap(k) for k in key)
    if isinstance(key, list):  # a list index is data (fancy indexing), as in CuPy
        return np.asarray(key)
    return _unwrap(key)


def _cupy_wrap(key, shape):
    """Integer-array parts of an index taken modulo their axis' length (CuPy's rule for fancy indexing)."""
    parts = key if isinstance(key, tuple) else (key,)
    if any(p is Ellipsis or p is None for p in parts):
        return key
    out, axis = [], 0
    for p in parts:
        if isinstance(p, np.ndarray) and p.dtype.kind in "iu" and axis < len(shape) and shape[axis] > 0:
            p = np.mod(p, shape[axis])
        out.append(p)
        axis += p.ndim if isinstance(p, np.ndarray) and p.dtype == bool else 1
    return tuple(out) if isinstance(key, tuple) else out[0]


def _fn(np_fn):
    """numpy function -> strict function: unwrap args (and out=), call NumPy, wrap the result."""
    def f(*args, **kwargs):
        out = kwargs.get("out")
        kw = {k: _unwrap(v) for k, v in kwargs.items()}
        res = np_fn(*(_unwrap(a) for a in args), **kw)
        if out is not None and res is kw["out"]:
            return out  # the same device array, as cupy returns `out`
        return _wrap(res)
    f.__name__ = getattr(np_fn, "__name__", "f")
    return f


class _Ufunc:
    """A ufunc with `.at` (CuPy has cupy.add.at): in-place, unbuffered scatter."""

    def __init__(self, uf):
        self._uf = uf
        self._call = _fn(uf)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def at(self, target, indices, values=None):
        if not isinstance(target, StrictArray):
            raise TypeError(f"strict_xp.{self._uf.__name__}.at: target must be a StrictArray")
        args = () if values is None else (_unwrap(values),)
        self._uf.at(target._a, _cupy_wrap(_unwrap_index(indices), target._a.shape), *args)

    def reduce(self, a, axis=0, **kw):
        return _wrap(self._uf.reduce(_unwrap(a), axis=axis, **kw))


class _Generator:
    """cupy.random.Generator look-alike: draws with NumPy's PCG64, returns StrictArrays."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def random(self, size=None, dtype=np.float64):
        return _wrap(self._g.random(size, dtype=dtype))

    def standard_normal(self, size=None, dtype=np.float64):
        return _wrap(self._g.standard_normal(size, dtype=dtype))

    def integers(self, low, high=None, size=None, dtype=np.int64):
        return _wrap(self._g.integers(low, high, size=size, dtype=dtype))

    def uniform(self, low=0.0, high=1.0, size=None):
        return _wrap(self._g.uniform(low, high, size))


def asarray(a, dtype=None):
    """The explicit host -> device copy (cupy.asarray): host ndarrays, lists, scalars, StrictArrays."""
    if isinstance(a, StrictArray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    _count("to_device")
    return StrictArray(np.array(a, dtype=dtype))


def asnumpy(a):
    """The explicit device -> host copy (cupy.asnumpy)."""
    if isinstance(a, StrictArray):
        _count("to_host")
        return a._a.copy()
    return np.asarray(a)


def normal_cdf(x):
    """The device's Φ(x), for backend.device_normal_cdf (CuPy's is cupyx.scipy.special.ndtr): the CPU's."""
    from tinygpt.ops.activations import normal_cdf as cpu_normal_cdf
    return _wrap(cpu_normal_cdf(_unwrap(x)))


_FUNCTIONS = [
    # creation
    "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like", "arange",
    "linspace", "eye", "triu", "tril",
    # elementwise
    "exp", "log", "log1p", "expm1", "sqrt", "square", "tanh", "abs", "sign", "copysign", "maximum",
    "minimum", "clip", "where", "isfinite", "isnan", "isinf", "logical_and", "logical_or", "logical_not",
    "sin", "cos",
    # shape
    "concatenate", "stack", "take", "take_along_axis", "broadcast_to", "expand_dims", "squeeze",
    "swapaxes", "transpose", "reshape", "ravel", "moveaxis", "tile", "repeat",
    # reductions and linear algebra
    "sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "any", "all", "cumsum", "var",
    "matmul", "dot", "einsum", "outer", "allclose", "array_equal",
]

strict_xp = SimpleNamespace(
    __name__="strict_xp", ndarray=StrictArray, asarray=asarray, array=asarray, asnumpy=asnumpy,
    normal_cdf=normal_cdf, random=SimpleNamespace(default_rng=_Generator),
    add=_Ufunc(np.add), subtract=_Ufunc(np.subtract), multiply=_Ufunc(np.multiply),
    divide=_Ufunc(np.divide), power=_Ufunc(np.power),
    inf=np.inf, nan=np.nan, pi=np.pi, e=np.e, newaxis=None,
    dtype=np.dtype, finfo=np.finfo, iinfo=np.iinfo, result_type=np.result_type,
    float16=np.float16, float32=np.float32, float64=np.float64, int8=np.int8, int16=np.int16,
    int32=np.int32, int64=np.int64, uint8=np.uint8, bool_=np.bool_, bool=np.bool_,
    **{name: _fn(getattr(np, name)) for name in _FUNCTIONS},
)
strict_xp.linalg = SimpleNamespace(norm=_fn(np.linalg.norm))


def register():
    """Register the strict device with tinygpt's backend (idempotent); returns the Device."""
    from tinygpt import backend
    return backend.register_device(DEVICE, strict_xp, StrictArray)
