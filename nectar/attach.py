"""Run a model with its document attention served by a context provider instead of a KV cache."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from . import attention
from .attention import Binding, ContextProvider, ExactContext, Recorder


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules in layer order (those transformers tags with a `layer_idx`)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(layers, key=lambda m: m.layer_idx)


@contextmanager
def bound(
    model: nn.Module,
    context: ContextProvider,
    kept: ExactContext | None = None,
    recorder: Recorder | None = None,
) -> Iterator[nn.Module]:
    """Inside, every attention layer merges exact local attention with `context` (plus exact `kept` tokens)."""
    previous = model.config._attn_implementation
    layers = attention_layers(model)
    for module in layers:
        attention.bind(module, Binding(module.layer_idx, context, kept, recorder))
    model.set_attn_implementation(attention.IMPLEMENTATION)
    try:
        yield model
    finally:
        for module in layers:
            attention.unbind(module)
        model.set_attn_implementation(previous)


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> ExactContext:
    """Run the document once and keep its post-RoPE keys/values per layer, [kv_heads, n, d] each."""
    out = model(input_ids=ids.view(1, -1).to(model.device), use_cache=True)
    cache = out.past_key_values
    keys = [layer.keys[0].contiguous() for layer in cache.layers]
    values = [layer.values[0].contiguous() for layer in cache.layers]
    return ExactContext(keys, values)


def split_context(full: ExactContext, sink: int) -> tuple[ExactContext, ExactContext]:
    """(first `sink` tokens, the rest): sinks stay exact, a module learns the rest."""
    head = ExactContext([k[:, :sink] for k in full.keys], [v[:, :sink] for v in full.values])
    tail = ExactContext([k[:, sink:] for k in full.keys], [v[:, sink:] for v in full.values])
    return head, tail


def positions_after(n: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for (left-padded) tokens that follow an n-token document."""
    return n + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def generation_inputs(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                      kept: ExactContext | None = None) -> dict:
    """`generate` keywords for prompts that follow an n-token document whose `kept` tokens stay exact.

    The kept tokens go in the cache up front, as a prefix cache would hold them, so decoding reads them
    with the local keys instead of concatenating them in front in every layer at every step (as `attach`
    does for a `generate` it does not set up; ~1% of a CPU decode step, within noise). transformers expects
    the ids of cached tokens in `input_ids`; any id will do, since only their keys and values are read.
    Generated tokens start at `input_ids.shape[1]`.
    """
    device = model.device
    inputs = {"input_ids": ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": positions_after(n, attention_mask).to(device)}
    if kept is None or kept.keys[0].shape[-2] == 0:
        return inputs
    if kept.bias is not None:
        raise ValueError("tokens with an eviction bias cannot be cached exactly")
    b, s = ids.shape[0], kept.keys[0].shape[-2]
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(kept.keys, kept.values)):
        cache.update(k[None].expand(b, -1, -1, -1).contiguous(), v[None].expand(b, -1, -1, -1).contiguous(), layer)

    def front(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([x.new_full((b, s), value), x], dim=1)

    return {"input_ids": front(inputs["input_ids"], 0), "attention_mask": front(inputs["attention_mask"], 1),
            "position_ids": front(inputs["position_ids"], 0), "past_key_values": cache}


@contextmanager
def attach(model: nn.Module, artifact, tokenizer=None) -> Iterator[nn.Module]:
    """Run `model` on a compiled document: no document KV cache, its modules stand in for it.

    Tokens after the document take positions n, n+1, ... (`artifact.n`): pass `position_ids`, e.g.
    `positions_after(artifact.n, attention_mask)`, or use `nectar.ask`, which does it for you.
    """
    artifact.check_compatible(model, tokenizer)
    modules, kept = artifact.providers(model)
    with bound(model, modules, kept=kept):
        yield model
