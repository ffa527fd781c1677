"""The document side: run the document once and keep its exact keys and values, per layer."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..providers.attention import ExactContext
from ..model.models import layer_windows


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, chunk: int = 2048, whole: bool = False) -> ExactContext:
    """Run the document once and keep its post-RoPE keys/values per layer, [kv_heads, n, d] each.

    The document goes through in chunks of `chunk` tokens, each attending to the cache of the ones
    before: attention's working memory then grows with chunk x n, not n^2 (a 32k-token single pass
    holds GBs of scores), and no logits are computed but the last position's. A sliding layer keeps
    only the tokens its window sees, unless `whole`: then every prefix of the document is a slice.
    """
    ids = ids.view(1, -1).to(model.device)
    cache = DynamicCache() if whole else DynamicCache(config=model.config)
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start: start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    keys = [layer.keys[0].contiguous() for layer in cache.layers]
    values = [layer.values[0].contiguous() for layer in cache.layers]
    windows = layer_windows(model.config)
    return ExactContext(keys, values, windows=windows if any(windows) else None, end=ids.shape[1])


def prefix(full: ExactContext, n: int) -> ExactContext:
    """The first n tokens of a document prefilled `whole`, as prefilling them alone would give (views)."""
    return ExactContext([k[:, :n] for k in full.keys], [v[:, :n] for v in full.values], windows=full.windows, end=n)


def as_cache(model: nn.Module, full: ExactContext, batch: int = 1) -> DynamicCache:
    """transformers' own cache holding a prefilled document (each row a copy), for stock `generate`."""
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(full.keys, full.values)):
        cache.update(k[None].expand(batch, -1, -1, -1).contiguous(), v[None].expand(batch, -1, -1, -1).contiguous(),
                     layer)
    return cache


def window_tails(full: ExactContext) -> ExactContext | None:
    """What every method keeps of a model with sliding layers: their exact tails, nothing in the global
    layers. None when no layer slides."""
    if full.windows is None or not any(full.windows):
        return None
    return split_exact(full, 0, None)[0]


def split_sinks(full: ExactContext, sinks: int) -> tuple[ExactContext, ExactContext]:
    """(the first `sinks` tokens, the rest): sinks stay exact, a module learns the rest."""
    return split_exact(full, sinks, None)


def split_exact(full: ExactContext, skip: int, chosen: list[Tensor] | None) -> tuple[ExactContext, ExactContext]:
    """(exact tokens: the first `skip` and each head's `chosen` ones; the rest, with the chosen masked out).

    The exact part has the same count per head but not the same tokens, unless `chosen` pads a head's row
    with -1: then its padded slots hold zeros and a -inf bias. Its keys are post-RoPE, so their positions
    come with them. The rest's mask makes a module's targets cover exactly what is left. A sliding layer
    keeps the tail its window sees as its exact part, and leaves nothing to a module.
    """
    keys, values, rest_keys, rest_values, bias, padding = [], [], [], [], [], []
    for layer, (k, v) in enumerate(zip(full.keys, full.values)):
        if full.slides(layer):
            tail = full.tail(layer)
            keys.append(tail.keys)
            values.append(tail.values)
            rest_keys.append(k[:, :0])
            rest_values.append(v[:, :0])
            bias.append(torch.zeros(k.shape[0], 0, device=k.device))
            padding.append(None)
            continue
        pick = chosen[layer] if chosen is not None else torch.zeros(k.shape[0], 0, dtype=torch.long, device=k.device)
        real = pick >= 0
        index = pick.clamp_min(skip).unsqueeze(-1).expand(-1, -1, k.shape[-1])
        keys.append(torch.cat([k[:, :skip], k.gather(1, index) * real.unsqueeze(-1)], 1))
        values.append(torch.cat([v[:, :skip], v.gather(1, index) * real.unsqueeze(-1)], 1))
        rest_keys.append(k[:, skip:])
        rest_values.append(v[:, skip:])
        # Padded slots point at the first token past the sinks; they evict nothing (a -inf added to 0 only
        # where a real pick also points).
        evicted = torch.zeros(k.shape[0], k.shape[1] - skip, device=k.device)
        evicted.scatter_add_(1, pick.clamp_min(skip) - skip, real.float())
        bias.append(torch.zeros_like(evicted).masked_fill_(evicted > 0, float("-inf")))
        pad = torch.zeros(k.shape[0], skip, device=k.device)
        padding.append(None if real.all() else torch.cat([pad, torch.zeros_like(pick, dtype=pad.dtype)
                                                          .masked_fill_(~real, float("-inf"))], 1))
    shape = dict(windows=full.windows, end=full.end)
    return (ExactContext(keys, values, padding if any(p is not None for p in padding) else None, **shape),
            ExactContext(rest_keys, rest_values, bias if chosen is not None else None, **shape))
