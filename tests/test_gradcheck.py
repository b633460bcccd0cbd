"""The gradient checker must catch small backward bugs and say where; numerical_grad must be right;
the README's learner example and examples/custom_op.py must run as written."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

import tinygpt
from tinygpt import backend

ROOT = Path(__file__).resolve().parents[1]


class Cube(tinygpt.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, g):  # d(x³)/dx = 3x²
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class CubeOnePercentOff(Cube):
    @staticmethod
    def backward(ctx, g):
        return Cube.backward(ctx, g) * 1.01


class CubeOneElementOff(Cube):
    """Right everywhere except at position (1, 2), where it is 1% too large."""
    @staticmethod
    def backward(ctx, g):
        gx = Cube.backward(ctx, g)
        gx[1, 2] *= 1.01
        return gx


class MulSecondOff(tinygpt.Function):
    """a * b with d/db 1% wrong: the checker must name input 1."""
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, g * a * 1.01


def _x(shape=(3, 4), seed=0, device="cpu"):
    return tinygpt.tensor(np.random.default_rng(seed).uniform(0.5, 2.0, shape), requires_grad=True,
                          device=device)


@pytest.mark.parametrize("mode", ["full", "random"])
def test_a_right_backward_passes(mode, device):
    assert tinygpt.gradcheck(Cube.apply, [_x(device=device)], mode=mode) is True


@pytest.mark.parametrize("mode", ["full", "random"])
def test_a_backward_one_percent_wrong_is_rejected(mode, device):
    with pytest.raises(tinygpt.GradcheckError) as e:
        tinygpt.gradcheck(CubeOnePercentOff.apply, [_x(device=device)], mode=mode)
    msg = str(e.value)
    assert "absolute error" in msg and "relative error" in msg
    rel = float(re.search(r"relative error ([0-9.e+-]+)", msg).group(1))
    assert rel == pytest.approx(0.01, rel=1e-3)
    if mode == "full":
        assert "input 0 at position (0, 0)" in msg and "12 of 12 positions" in msg
    else:
        assert "random direction 0" in msg


def test_full_mode_names_the_input_and_the_position(device):
    x = _x(device=device)
    with pytest.raises(tinygpt.GradcheckError) as e:
        tinygpt.gradcheck(CubeOneElementOff.apply, [x])
    msg = str(e.value)
    assert "input 0 at position (1, 2)" in msg and "1 of 12 positions" in msg
    v = float(np.float64(x.numpy()[1, 2]))
    exact = 3 * v * v
    analytic = float(re.search(r"analytic ([0-9.e+-]+)", msg).group(1))
    numerical = float(re.search(r"numerical ([0-9.e+-]+)", msg).group(1))
    r = np.random.default_rng(0).standard_normal((3, 4))[1, 2]  # the checker's output weights, seed 0
    assert analytic == pytest.approx(1.01 * exact * r, rel=1e-5)
    assert numerical == pytest.approx(exact * r, rel=1e-5)
    abs_err = float(re.search(r"absolute error ([0-9.e+-]+)", msg).group(1))
    assert abs_err == pytest.approx(abs(0.01 * exact * r), rel=1e-2)


def test_the_wrong_input_is_named(device):
    a, b = _x(seed=1, device=device), _x(seed=2, device=device)
    with pytest.raises(tinygpt.GradcheckError, match="for input 1 at position"):
        tinygpt.gradcheck(MulSecondOff.apply, [a, b])
    with pytest.raises(tinygpt.GradcheckError, match="random direction"):
        tinygpt.gradcheck(MulSecondOff.apply, [a, b], mode="random")


def test_gradcheck_leaves_the_inputs_alone():
    x = _x()
    ids = tinygpt.tensor([0, 2, 2])
    assert tinygpt.gradcheck(lambda x, i: tinygpt.functional.embedding(i, x).exp(), [x, ids])
    assert x.dtype == np.float32 and x.grad is None and ids.dtype == np.int64


def test_gradcheck_accepts_float_numpy_arrays():
    assert tinygpt.gradcheck(lambda a, b: a @ b, [np.ones((2, 3)), np.arange(6.0).reshape(3, 2)])


def test_gradcheck_argument_errors():
    with pytest.raises(ValueError, match="mode must be"):
        tinygpt.gradcheck(Cube.apply, [_x()], mode="fast")
    with pytest.raises(ValueError, match="no floating-point Tensor"):
        tinygpt.gradcheck(lambda i: i, [tinygpt.tensor([1, 2])])
    with pytest.raises(TypeError, match="must return a Tensor"):
        tinygpt.gradcheck(lambda x: x.numpy(), [_x()])


def test_numerical_grad_matches_the_closed_form():
    rng = np.random.default_rng(3)
    x = tinygpt.tensor(rng.standard_normal((2, 3)), dtype=np.float64)
    w = tinygpt.tensor(rng.standard_normal((2, 3)), dtype=np.float64)
    r = rng.standard_normal((2, 3))

    def fn(x, w):  # L = Σ r ⊙ exp(x w) + r ⊙ x³
        return (x * w).exp() + x * x * x

    xv, wv = x.numpy().copy(), w.numpy().copy()
    gx = tinygpt.numerical_grad(fn, [x, w], 0, r)
    gw = tinygpt.numerical_grad(fn, [x, w], 1, r)
    assert_allclose(gx, r * (wv * np.exp(xv * wv) + 3 * xv ** 2), rtol=1e-7, atol=1e-8)
    assert_allclose(gw, r * xv * np.exp(xv * wv), rtol=1e-7, atol=1e-8)
    assert_allclose(x.numpy(), xv, rtol=0, atol=0)  # the input is restored exactly
    # it also differentiates what has no backward at all (a comparison and a cast)
    g = tinygpt.numerical_grad(lambda x: x * 2, [tinygpt.tensor([1.0, 2.0], dtype=np.float64)], 0,
                               np.array([1.0, -1.0]))
    assert_allclose(g, [2.0, -2.0], rtol=1e-8)


def test_readme_learner_example_runs_as_written(capsys):
    readme = (ROOT / "README.md").read_text()
    heading = "## For learners: write an op, check its gradient"
    section = readme.split(heading, 1)
    assert len(section) == 2, f"README.md has no '{heading}' section"
    body = section[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no ```python block under '{heading}'"
    exec(compile(blocks[0], "README.md:write an op", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # it prints what it promises


def test_examples_custom_op_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_op.py")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert "passes gradcheck: True" in r.stdout
    assert "BuggySoftplus is caught" in r.stdout and "relative error" in r.stdout


def _env():
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TINYGPT_DEVICE", None)
    return env


def test_gradcheck_on_a_bigger_input_in_random_mode(device):
    rng = np.random.default_rng(0)
    x = tinygpt.tensor(rng.standard_normal((2, 8, 16)), requires_grad=True, device=device)
    w = tinygpt.tensor(rng.standard_normal((16, 16)) * 0.2, requires_grad=True, device=device)
    fn = lambda x, w: tinygpt.functional.gelu(x @ w).tanh().mean(axis=-1)  # noqa: E731
    assert tinygpt.gradcheck(fn, [x, w], mode="random", n_directions=3)
    assert math.isfinite(backend.to_numpy(fn(x, w).data).sum())
