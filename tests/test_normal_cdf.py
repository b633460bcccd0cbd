"""Φ, the standard normal CDF behind exact GELU (tinygpt.ops.activations.normal_cdf), on every device."""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from tinygpt import backend
from tinygpt.ops.activations import normal_cdf
from strict_xp import StrictArray, register, strict_xp


@pytest.fixture
def strict():
    register()


def _phi(x):
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in np.ravel(x)]).reshape(np.shape(x))


def test_normal_cdf_float64_is_exact():
    x = np.linspace(-9, 9, 181)
    y = normal_cdf(x)
    assert y.dtype == np.float64
    assert_allclose(y, _phi(x), rtol=1e-13, atol=0)  # up to the rounding of x/√2
    assert y[0] > 0  # the far tail has no cancellation to 0


def test_normal_cdf_float32_is_accurate():
    x = np.linspace(-8, 8, 1601).astype(np.float32)
    y = normal_cdf(x)
    assert y.dtype == np.float32
    assert_allclose(y, _phi(x.astype(np.float64)), atol=2e-7, rtol=1e-6)
    assert (np.diff(y) >= 0).all()  # monotone


def test_normal_cdf_on_strict_device(strict):
    x = strict_xp.asarray(np.linspace(-3, 3, 7).astype(np.float32))
    y = normal_cdf(x)
    assert isinstance(y, StrictArray)
    assert_allclose(backend.to_numpy(y), _phi(np.linspace(-3, 3, 7)), atol=2e-7)
