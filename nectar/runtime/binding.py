"""The decode side: run a model with its document attention served by a context provider, not a KV cache."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from ..providers import attention
from ..providers.attention import Binding, ContextProvider, ExactContext, NoContext, Recorder, WindowTail
from ..model.models import attention_layers, attn_implementation, check_supported, layer_windows
from ..model.padding import positions_after


@contextmanager
def bound(
    model: nn.Module,
    context: ContextProvider,
    sinks: ExactContext | None = None,
    recorder: Recorder | None = None,
    reference: ContextProvider | None = None,
) -> Iterator[nn.Module]:
    """Inside, every attention layer merges exact local attention with `context` (plus exact `sinks`);
    a `recorder` sees each layer's queries, with targets from `reference` if given (see `Binding`).

    A sliding-window layer has no module: it attends exactly to the document's last tokens, taken from
    `sinks` when they hold them (a compiled document) or else from `context` (the exact document).
    """
    check_supported(model)
    windows = layer_windows(model.config)
    modeled = [layer for layer, window in enumerate(windows) if window is None]
    layers = attention_layers(model)
    for module in layers:
        layer = module.layer_idx
        tail = None if windows[layer] is None else _tail(layer, context, sinks)
        slot = modeled.index(layer) if tail is None else -1
        attention.bind(module, Binding(layer, context, sinks, recorder, reference, slot, tail))
    try:
        with attn_implementation(model, attention.IMPLEMENTATION):
            yield model
    finally:
        for module in layers:
            attention.unbind(module)


def _tail(layer: int, context: ContextProvider, sinks: ExactContext | None) -> WindowTail:
    for source in (sinks, context):  # an ExactContext, or a server's per-row sinks (nectar.serve.rowsinks)
        if hasattr(source, "slides") and source.slides(layer):
            return source.tail(layer)
    if isinstance(context, NoContext):
        return WindowTail(torch.zeros(0, 0, 0), torch.zeros(0, 0, 0), None, 0, 1)
    raise ValueError(f"layer {layer} slides over a window, but nothing bound holds the document's last tokens")


def cacheable(model: nn.Module, sinks: ExactContext | None = None) -> bool:
    """Whether sink tokens may go in a prefix cache for `generate`: not when some layer slides, since the
    sinks lie outside its window and the cache would show them to it, nor when layers keep different
    numbers of exact tokens (or heads do), since one cache length (and one mask) serves every layer."""
    even = sinks is None or (len({k.shape[-2] for k in sinks.keys}) <= 1 and sinks.bias is None)
    return even and all(window is None for window in layer_windows(model.config))


def generation_inputs(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                      sinks: ExactContext | None = None) -> dict:
    """`generate` keywords for prompts that follow an n-token document whose `sinks` stay exact.

    The sink tokens go in the cache up front, as a prefix cache would hold them, so decoding reads them
    with the local keys instead of concatenating them in front in every layer at every step (as `attach`
    does for a `generate` it does not set up). transformers expects the ids of cached tokens in
    `input_ids`; any id will do, since only their keys and values are read. Generated tokens start at
    `input_ids.shape[1]`.
    """
    device = model.device
    inputs = {"input_ids": ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": positions_after(n, attention_mask).to(device)}
    if sinks is None or sinks.keys[0].shape[-2] == 0:
        return inputs
    if not cacheable(model, sinks):
        raise ValueError("sinks of a model with sliding layers, or of uneven length, are bound (`bound(..., "
                         "sinks=)`), not cached")
    if sinks.bias is not None:
        raise ValueError("tokens with an eviction bias cannot be cached exactly")
    b, s = ids.shape[0], sinks.keys[0].shape[-2]
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(sinks.keys, sinks.values)):
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
    modules, sinks = artifact.providers(model)
    with bound(model, modules, sinks=sinks):
        yield model
