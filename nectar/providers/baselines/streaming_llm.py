"""StreamingLLM (Xiao et al., 2023): the first tokens (attention sinks) and the most recent ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import ExactContext
from .base import Inputs, context_tokens, tokens_for_budget


@dataclass(frozen=True)
class StreamingLLM:
    name: str = "streaming_llm"

    def build(self, inputs: Inputs, budget: float) -> tuple[ExactContext, float]:
        """(the context, its bytes / the global layers' KV bytes)."""
        context = streaming_llm(inputs.full, budget, inputs.sink_tokens)
        return context, context_tokens(context) / inputs.n


def streaming_llm(full: ExactContext, budget: float, sinks: int = 4) -> ExactContext:
    """The first `sinks` tokens and the most recent ones (Xiao et al., 2023), in the global layers (a
    sliding layer keeps its window's tail exactly, for every method)."""
    n = max(k.shape[-2] for k in full.keys)
    keep = tokens_for_budget(n, budget)
    index = torch.cat([torch.arange(min(sinks, keep)), torch.arange(n - max(0, keep - sinks), n)]).unique()
    pick = [index[:0] if full.slides(layer) else index for layer in range(len(full.keys))]
    return ExactContext([k[:, i] for k, i in zip(full.keys, pick)], [v[:, i] for v, i in zip(full.values, pick)])
