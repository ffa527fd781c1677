"""CUDA graphs for the document part of a decode step: one replay instead of ~15 kernel launches a layer.

On a GPU a small model's decode is bound by kernel launches, not arithmetic: the module's MLP, the
log-sum-exp blend and their casts are about fifteen tiny kernels per layer, ~150 us of host time on an
H100's host, where the arithmetic takes a few. A decode step has fixed shapes for a given batch size,
so each (layer, shape) is captured once and replayed: three input copies and one launch.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor, Tensor], Tensor]


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


class StepGraphs:
    """The graphs of one context provider, keyed by layer and the step's shapes and dtypes."""

    def __init__(self):
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all of them

    def __call__(self, layer: int, scaling: float, step: Step, q: Tensor, out: Tensor, lse: Tensor) -> Tensor:
        key = (layer, scaling, q.device, torch.is_inference_mode_enabled(),
               *((x.shape, x.dtype) for x in (q, out, lse)))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Captured(step, (q, out, lse), self.pool)
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
    """A one-token decode step (query [b, H, 1, d]) on a GPU, with no gradient, by a provider that says
    it can be captured (`graphable = True`; set it False on an instance to run it eagerly)."""
    return (query.is_cuda and query.shape[2] == 1 and not torch.is_grad_enabled()
            and getattr(provider, "graphable", False))
