"""KV-compression presses run through NVIDIA's kvpress itself, on the document alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..attention import ExactContext
from ...errors import NectarError
from ...model.models import attention_layers, attn_implementation
from .base import Inputs, context_tokens

# name -> kvpress class; each keeps (1 - compression_ratio) of the document's tokens per layer.
PRESSES = {
    "knorm": "KnormPress",
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
    "kvzip": "KVzipPress",
}


@dataclass(frozen=True)
class Press:
    """kvpress's press `name`, keeping `budget` of the document's tokens per layer; nothing in sliding layers,
    whose window's tail every method keeps exactly."""

    name: str

    def build(self, inputs: Inputs, budget: float) -> tuple[ExactContext, float]:
        context = press(inputs.model, inputs.ids, self.name, budget)
        if inputs.full.windows is not None and any(inputs.full.windows):
            context = global_layers(context, inputs.full.windows)
        return context, context_tokens(context) / inputs.n


@torch.no_grad()
def press(model, doc_ids: list[int], name: str, budget: float) -> ExactContext:
    """The document's KV cache compressed by kvpress press `name` to `budget` of its tokens."""
    if name not in PRESSES:
        raise NectarError(f"unknown press '{name}': choose from {', '.join(PRESSES)}")
    # Imported here only: importing kvpress wraps transformers' attention functions, and nectar's own
    # paths must not run through those wrappers.
    import kvpress

    compressor = getattr(kvpress, PRESSES[name])(compression_ratio=1.0 - budget)
    cache = DynamicCache()
    ids = torch.tensor([doc_ids], device=model.device)
    try:
        with attn_implementation(model, "sdpa"), compressor(model):  # KVzip refuses eager; presses run on SDPA
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    except (AttributeError, TypeError, ValueError) as e:  # a press that does not know this architecture
        raise NectarError(f"kvpress's {PRESSES[name]} does not run on {model.config.model_type} "
                          f"({type(e).__name__}: {e}): leave '{name}' out of --methods") from None
    keys = [layer.keys[0].contiguous() for layer in cache.layers]
    values = [layer.values[0].contiguous() for layer in cache.layers]
    return ExactContext(keys, values, _evicted(model, keys))


def global_layers(context: ExactContext, windows: list[int | None]) -> ExactContext:
    """`context` with nothing left in its sliding layers (`windows[layer]` set)."""
    def cut(tensors):
        return [t[..., :0, :] if w else t for t, w in zip(tensors, windows)]

    bias = None if context.bias is None else [b[:, :0] if w else b for b, w in zip(context.bias, windows)]
    return ExactContext(cut(context.keys), cut(context.values), bias)


def _evicted(model, keys: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Presses with a different budget per head (KVzip) evict by masking, not by cutting the cache:
    turn their marks into an additive bias, and clear them so that nothing else sees them."""
    layers = attention_layers(model)
    if all(getattr(m, "masked_key_indices", None) is None for m in layers):
        return None
    bias = []
    for module, k in zip(layers, keys):
        b = torch.zeros(k.shape[:2], device=k.device)
        marks = getattr(module, "masked_key_indices", None)
        if marks is not None:
            _, heads, positions = marks
            b[heads.to(k.device), positions.to(k.device)] = float("-inf")
        bias.append(b)
        module.masked_key_indices = None
    return bias
