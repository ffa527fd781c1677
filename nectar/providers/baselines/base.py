"""What every baseline shares: the inputs it may read, and how its bytes are counted.

A baseline is fixed before any question is seen (query-agnostic), as a compiled document is; it builds an
`ExactContext` (a subset of the document's keys, maybe reweighted), so every method is answered by the same
split-attention path as nectar. Each is a small dataclass with a `name` and `build(inputs, budget)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..attention import ExactContext


@dataclass(frozen=True)
class Inputs:
    """What a baseline may read: the model, the document's ids and exact prefill, the sink tokens nectar keeps,
    the attention scale, and (made on first call) the training queries nectar fits on."""

    model: object
    ids: list[int]
    full: ExactContext
    sink_tokens: int
    scaling: float
    queries: Callable[[], torch.Tensor]

    @property
    def n(self) -> int:
        return len(self.ids)


def tokens_for_budget(n: int, budget: float) -> int:
    """Tokens whose exact K/V fit in `budget` x the document's KV bytes."""
    return max(1, int(budget * n))


def context_tokens(context) -> float:
    """Tokens kept per (layer, head) on average by an exact context (0 for none)."""
    if not isinstance(context, ExactContext):
        return 0.0
    if context.bias is None:
        return sum(k.shape[-2] for k in context.keys) / len(context.keys)
    return sum(torch.isfinite(b).float().mean(0).sum().item() for b in context.bias) / len(context.bias)
