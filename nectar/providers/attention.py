"""Split attention: exact attention over the local tokens, merged by log-sum-exp with a document part.

The document part is a *context provider*: anything that maps post-RoPE queries of one layer,
shaped [batch, kv_heads, queries_per_kv_head, head_dim], to (output, lse) over the document.
The exact oracle (`ExactContext`), a learned module bank and every baseline are providers, so they
all run through the one attention function registered here.

Queries are grouped by KV head (GQA): query head h uses KV head h // groups, as in `repeat_kv`,
so `query.view(b, kv_heads, groups * L, d)` puts every query a KV head serves in one row block.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .graphs import graphable, graphs_for
from .kernels import attend, blend, empty_heads, exact_attention, merge_onto

IMPLEMENTATION = "nectar"


class ContextProvider(Protocol):
    def __call__(self, layer: int, q: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """q: [b, kv_heads, m, d] -> (out [b, kv_heads, m, d], lse [b, kv_heads, m]), both fp32."""


@dataclass
class ExactContext:
    """Exact attention over stored per-layer keys/values [kv_heads, n, d]: the oracle a module imitates.

    On a sliding-window layer (`windows[layer]` set) a query sees only the document's last tokens, so
    such a layer is served by `tail(layer)`, never called as a whole: its entry holds the tokens that end
    at position `end` (the document's length).
    """

    keys: list[Tensor]
    values: list[Tensor]
    # Per layer [kv_heads, n] (or None for a layer without one), -inf where a key counts as evicted, or as
    # padding where heads keep unequal numbers of tokens.
    bias: list[Tensor | None] | None = None
    windows: list[int | None] | None = None
    end: int = 0
    _empty_heads: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, layer: int, q: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        k, v = self.keys[layer], self.values[layer]
        if k.shape[-2] == 0:
            return _empty(q)
        bias = self.layer_bias(layer)
        if bias is not None and layer not in self._empty_heads:
            self._empty_heads[layer] = empty_heads(bias)
        return attend(q, k.to(q.dtype), v.to(q.dtype), scaling, bias, self._empty_heads.get(layer))

    def count(self, layer: int) -> int:
        return self.keys[layer].shape[-2]

    def layer_bias(self, layer: int) -> Tensor | None:
        return None if self.bias is None else self.bias[layer]

    def head_counts(self, layer: int) -> list[int]:
        """Tokens each KV head of `layer` really keeps (padding and evicted keys not counted)."""
        bias = self.layer_bias(layer)
        return [self.count(layer)] * self.keys[layer].shape[0] if bias is None else torch.isfinite(bias).sum(-1).tolist()

    def slides(self, layer: int) -> bool:
        return self.windows is not None and self.windows[layer] is not None

    def tail(self, layer: int) -> "WindowTail":
        """The document tokens a query after it can see on sliding layer `layer`: the last window - 1."""
        window = self.windows[layer]
        keep = min(window - 1, self.keys[layer].shape[-2])
        bias = None if self.layer_bias(layer) is None else self.layer_bias(layer)[:, -keep:]
        return WindowTail(self.keys[layer][:, -keep:], self.values[layer][:, -keep:], bias, self.end - keep, window)

    def prepend(self, layer: int, key: Tensor, value: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Put these tokens in front of the local keys [b, Hkv, s, d]: one attention call covers both.

        This is how a few sink tokens ride along in decode at the cost of two small concatenations, instead
        of a second attention call and merge per layer. A bias (heads keep unequal numbers) masks per KV head.
        """
        k, v = self.keys[layer][None], self.values[layer][None]
        b = key.shape[0]
        if b > 1:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        key, value = torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)
        if mask is not None:
            mask = torch.nn.functional.pad(mask, (k.shape[-2], 0))  # 0: every local query sees them
        if (bias := self.layer_bias(layer)) is not None:  # 0 on the local keys
            bias = torch.nn.functional.pad(bias.to(key.device), (0, value.shape[2] - k.shape[2]))[None, :, None, :]
            mask = bias if mask is None else mask + bias
        return key, value, mask


@dataclass
class WindowTail:
    """A sliding layer's document part: exact attention over its last tokens, masked by position.

    A query at position p sees a key at position j when p - j < window, as transformers' sliding mask
    does on the cache. Positions, not cache indices: a left-padded row sees what it would see alone.
    """

    keys: Tensor  # [kv_heads, t, d]
    values: Tensor
    bias: Tensor | None  # [kv_heads, t]
    first: int  # position of the first key
    window: int

    def __call__(self, q: Tensor, scaling: float, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q [b, kv_heads, groups * L, d] (grouped as in `nectar_attention`), positions [b or 1, L]."""
        b, h, rows, d = q.shape
        t = self.keys.shape[-2]
        if t == 0:
            return _empty(q)
        groups = rows // positions.shape[-1]
        query_pos = positions.to(q.device).expand(b, -1).unsqueeze(1).expand(b, groups, -1).reshape(b * rows)
        key_pos = self.first + torch.arange(t, device=q.device)
        seen = query_pos[:, None] - key_pos[None, :] < self.window
        mask = torch.zeros(seen.shape, device=q.device).masked_fill_(~seen, float("-inf"))[None, None]
        if self.bias is not None:
            mask = mask + self.bias.to(q.device)[None, :, None, :]
        folded = q.transpose(0, 1).reshape(1, h, b * rows, d)
        o, lse = exact_attention(folded, self.keys.to(q.dtype)[None], self.values.to(q.dtype)[None], scaling, mask)
        # A query past the window sees no key; the kernels return lse 0 for such a row, not -inf.
        blind = ~seen.any(-1).view(1, 1, -1)
        if self.bias is not None:
            blind = blind | ~torch.isfinite(mask).any(-1)
        o, lse = o.masked_fill(blind.unsqueeze(-1), 0.0), lse.masked_fill(blind, float("-inf"))
        return o.view(h, b, rows, d).transpose(0, 1), lse.view(h, b, rows).transpose(0, 1)


class NoContext:
    """No document at all: the reference point every method should beat."""

    def __call__(self, layer: int, q: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        return _empty(q)


@dataclass(eq=False)  # hashed by identity: its step graphs are keyed by it
class WithExact:
    """A provider with exact document tokens beside it, merged by log-sum-exp: the tokens a compile keeps
    exact where layers keep different numbers of them, which one prefix cache cannot hold as sinks."""

    provider: ContextProvider
    exact: ContextProvider  # an ExactContext, or nectar.quant.CodedTokens
    graphable = False

    @property
    def traceable(self) -> bool:
        # Per layer, the exact part's branches (tokens or none, blocks or rows) are fixed: a trace keeps them.
        return getattr(self.provider, "traceable", False)

    def __call__(self, layer: int, q: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        o, lse = self.provider(layer, q, scaling)
        if self.exact.count(layer) == 0:
            return o, lse
        return merge_onto(o, lse, *self.exact(layer, q, scaling))


def _empty(q: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return out, torch.full(q.shape[:-1], float("-inf"), device=q.device)


Recorder = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], None]


@dataclass
class Binding:
    """What one attention layer sees of the document while bound.

    `sinks` are document tokens attended exactly as if local: they join the local keys.
    `context` covers the rest of the document.
    `recorder(layer, q, o_ctx, lse_ctx, o_loc, lse_loc)` sees every call, for capture; its (o_ctx, lse_ctx)
    come from `reference` when one is set (the exact document, while `context` is a fitted bank whose
    outputs drive the model: queries as the modules will see them, targets as they should be).
    """

    layer: int
    context: ContextProvider
    sinks: ExactContext | None = None
    recorder: Recorder | None = None
    reference: ContextProvider | None = None
    slot: int = 0  # this layer's place among the layers that have modules: the recorder's index
    tail: WindowTail | None = None  # set on a sliding layer: its whole document part, no module


_BINDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, Binding]" = weakref.WeakKeyDictionary()


def bind(module: torch.nn.Module, binding: Binding) -> None:
    _BINDINGS[module] = binding


def unbind(module: torch.nn.Module) -> None:
    _BINDINGS.pop(module, None)


def nectar_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Drop-in for transformers' attention functions: query [b, H, L, d], key/value [b, Hkv, s, d].

    Arguments in SDPA's order: kvpress's wrapper passes `dropout` by position.
    """
    b, heads, length, d = query.shape
    kv_heads = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    binding = _BINDINGS.get(module)
    if binding is not None and binding.sinks is not None and binding.tail is None:
        key, value, attention_mask = binding.sinks.prepend(binding.layer, key, value, attention_mask)
    out, lse = exact_attention(query, key, value, scaling, attention_mask)
    if binding is not None:
        # [b, H, L] is laid out as [b, Hkv, groups * L]: views, no copies.
        q = query.reshape(b, kv_heads, -1, d)
        out, lse = out.reshape(b, kv_heads, -1, d), lse.reshape(b, kv_heads, -1)
        if binding.tail is not None:
            if kwargs.get("position_ids") is None:
                raise ValueError("a sliding-window layer needs the queries' position_ids")
            out = blend(out, lse, *binding.tail(q, scaling, kwargs["position_ids"]))
        elif binding.recorder is None and graphable(binding.context, query):
            out = graphs_for(binding.context)(binding.layer, scaling, _document_step(binding, scaling), q, out, lse)
        else:
            o_ctx, lse_ctx = binding.context(binding.layer, q, scaling)
            if binding.recorder is not None:
                target = (o_ctx, lse_ctx) if binding.reference is None else binding.reference(binding.layer, q, scaling)
                binding.recorder(binding.slot, q, *target, out, lse)
            out = blend(out, lse, o_ctx, lse_ctx)
    return out.to(query.dtype).reshape(b, heads, length, d).transpose(1, 2).contiguous(), None


def _document_step(binding: Binding, scaling: float):
    """The document part of a step and its merge, as one function of tensors: what a CUDA graph captures."""
    def step(q: Tensor, out: Tensor, lse: Tensor) -> Tensor:
        return blend(out, lse, *binding.context(binding.layer, q, scaling))
    return step


def nectar_mask(batch_size: int, cache_position: Tensor, kv_length: int, *args, **kwargs) -> Tensor | None:
    """transformers' additive eager mask, or None for one query with no padding (a decode step).

    None there means "every key": the attention kernel is faster without a mask on a one-query step,
    and the prepended sink tokens need no columns of their own. With more than one query the mask is
    always built, since the local keys then follow the sinks and a kernel's own causal flag would align
    the triangle to the wrong corner.
    """
    if cache_position.shape[0] == 1:
        kwargs.pop("allow_torch_fix", None)
        kwargs["allow_is_causal_skip"] = True
        if sdpa_mask(batch_size, cache_position, kv_length, *args, **kwargs) is None:
            return None
    return eager_mask(batch_size, cache_position, kv_length, *args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, nectar_attention)
# Without a mask entry of the same name transformers builds no causal mask at all.
AttentionMaskInterface.register(IMPLEMENTATION, nectar_mask)
