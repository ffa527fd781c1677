"""The document side: run the document once and keep its exact keys and values, per layer."""
from __future__ import annotations

import torch
from torch import nn

from .attention import ExactContext


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> ExactContext:
    """Run the document once and keep its post-RoPE keys/values per layer, [kv_heads, n, d] each."""
    out = model(input_ids=ids.view(1, -1).to(model.device), use_cache=True)
    cache = out.past_key_values
    keys = [layer.keys[0].contiguous() for layer in cache.layers]
    values = [layer.values[0].contiguous() for layer in cache.layers]
    return ExactContext(keys, values)


def split_sinks(full: ExactContext, sinks: int) -> tuple[ExactContext, ExactContext]:
    """(the first `sinks` tokens, the rest): sinks stay exact, a module learns the rest."""
    head = ExactContext([k[:, :sinks] for k in full.keys], [v[:, :sinks] for v in full.values])
    tail = ExactContext([k[:, sinks:] for k in full.keys], [v[:, sinks:] for v in full.values])
    return head, tail
