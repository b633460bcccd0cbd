"""`tinygpt.viz`: see inside the engine and the model.

    from tinygpt import viz
    viz.to_dot(loss, params=model)                 # the autograd graph as Graphviz DOT text
    viz.render(loss, "graph.svg", params=model)    # ... drawn (Graphviz's dot, or pip install 'tinygpt[viz]')
    viz.draw_dot(loss)                             # in Jupyter, micrograd style: shows itself
    with viz.capture_attention(model) as att:      # att[layer]: (B, nh, T, T) attention weights
        model(idx)
    with viz.record_stats(model) as rec:           # per-layer activation and gradient statistics
        model(x, y)[1].backward()
    viz.param_stats(model)                         # grad:data ratio per weight

graph.py draws the graph; probes.py records what flows through a model. Nothing here runs unless called.
"""
from tinygpt.viz.graph import DotGraph, RendererNotFound, available_renderer, draw_dot, render, to_dot
from tinygpt.viz.probes import (ArrayStats, LayerStats, ParamStats, Recording, attention_probs,
                                capture_attention, default_modules, param_stats, record_stats)

__all__ = ["to_dot", "draw_dot", "DotGraph", "render", "available_renderer", "RendererNotFound",
           "capture_attention", "attention_probs", "record_stats", "default_modules", "Recording",
           "LayerStats", "ArrayStats", "param_stats", "ParamStats"]
