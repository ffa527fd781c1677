"""Graphs for the document part of a decode step: one replay instead of ~15 ops a layer.

A small model's decode is bound by per-op overhead, not arithmetic: the module's MLP, the exact tokens,
the log-sum-exp blend and their casts are about fifteen tiny ops per layer. On a GPU that is ~150 us of
kernel launches a layer on an H100's host; on a CPU it is Python and dispatch, about half of the ~160 us
the part takes (pydoc's 2% artifact, 2 cores). A decode step has fixed shapes for a given batch size, so
each (layer, shape) is captured once and replayed: as a CUDA graph on a GPU, as a traced TorchScript
graph on a CPU (bitwise the same ops, without Python between them).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor, Tensor], Tensor]
TRACER = hasattr(torch.jit, "trace")  # decided once: `graphable` runs in every layer of every step


class _Captured:
    """One captured call of `fn(*inputs)`, replayed on fresh inputs copied into its static buffers."""

    def __init__(self, fn: Step, inputs: tuple[Tensor, ...], pool):
        self.inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)  # lazy initialisation (cuBLAS workspaces) may not happen during capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        # The buffer is overwritten at this layer's next step; by then o_proj has read it.
        return self.output


class _Traced:
    """One traced call of `fn(*inputs)`: the same ops replayed without the Python that chose them. Shapes,
    per-layer branches and weights become constants, which the caller's key (layer, shapes, dtypes) and
    `forget` (weights moved) keep true."""

    def __init__(self, fn: Step, inputs: tuple[Tensor, ...]):
        with warnings.catch_warnings():
            # TracerWarning (shapes frozen: the key guarantees them) and trace's deprecation notice: the
            # tracer is in torch 2.13, which nectar pins; without it (TRACER) CPU steps run eagerly.
            warnings.simplefilter("ignore")
            self.fn = torch.jit.trace(fn, inputs, check_trace=False)

    def __call__(self, *inputs: Tensor) -> Tensor:
        return self.fn(*inputs)


class StepGraphs:
    """The graphs of one context provider, keyed by layer and the step's shapes and dtypes."""

    def __init__(self):
        self.graphs: dict[tuple, _Captured] = {}
        # One memory pool for all of a GPU's graphs.
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    def __call__(self, layer: int, scaling: float, step: Step, q: Tensor, out: Tensor, lse: Tensor) -> Tensor:
        key = (layer, scaling, q.device, torch.is_inference_mode_enabled(),
               *((x.shape, x.dtype) for x in (q, out, lse)))
        graph = self.graphs.get(key)
        if graph is None:
            graph = (_Captured(step, (q, out, lse), self.pool) if q.is_cuda else _Traced(step, (q, out, lse)))
            self.graphs[key] = graph
        return graph(q, out, lse)


_GRAPHS: "weakref.WeakKeyDictionary[object, StepGraphs]" = weakref.WeakKeyDictionary()


def graphs_for(provider) -> StepGraphs:
    """Graphs live as long as their provider (its weights are baked into them), across `bound` calls."""
    if provider not in _GRAPHS:
        _GRAPHS[provider] = StepGraphs()
    return _GRAPHS[provider]


def forget(provider) -> None:
    """Drop a provider's graphs: call it whenever its weights move, or replays would read freed memory."""
    _GRAPHS.pop(provider, None)


def graphable(provider, query: Tensor) -> bool:
    """A one-token decode step (query [b, H, 1, d]) with no gradient, by a provider that says it can be
    captured: `graphable = True` on a GPU, `traceable = True` on a CPU (set either False on an instance to
    run it eagerly)."""
    if query.shape[2] != 1 or torch.is_grad_enabled():
        return False
    if query.is_cuda:
        return getattr(provider, "graphable", False)
    return TRACER and query.device.type == "cpu" and getattr(provider, "traceable", False)
