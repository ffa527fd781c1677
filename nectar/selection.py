"""Which document tokens stay exact in each (layer, KV head): the first few, and those queries attend to most.

A module has to learn the attention over the tokens it stands in for. A few tokens take much of many
heads' attention (the first tokens, and, per head, the handful a head looks things up in); the module
learns the rest far more easily without them, and their exact keys and values cost 2 x head_dim numbers
each. Which tokens is measured on training queries, never on evaluation questions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .attention import ExactContext


@torch.no_grad()
def most_attended(queries: Tensor, full: ExactContext, scaling: float, skip: int, count: int,
                  chunk: int = 2048) -> list[Tensor]:
    """Per layer, the [kv_heads, count] positions (all >= skip, sorted) of the document tokens with the
    largest attention mass summed over `queries` ([layers * kv_heads, N, d], layer-major as a capture store)."""
    kv = full.keys[0].shape[0]
    chosen = []
    for layer, keys in enumerate(full.keys):
        q, k = queries[layer * kv:(layer + 1) * kv], keys.float().to(queries.device)
        mass = torch.zeros(k.shape[:2], device=k.device)
        for start in range(0, q.shape[1], chunk):
            mass += torch.softmax(scaling * q[:, start: start + chunk].float() @ k.transpose(1, 2), -1).sum(1)
        mass[:, :skip] = -1.0
        chosen.append(mass.topk(count, -1).indices.sort(-1).values.to(keys.device))
    return chosen


def split_exact(full: ExactContext, skip: int, chosen: list[Tensor] | None) -> tuple[ExactContext, ExactContext]:
    """(exact tokens: the first `skip` and each head's `chosen` ones; the rest, with the chosen masked out).

    The exact part has the same count per head but not the same tokens; its keys are post-RoPE, so
    their positions come with them. The rest's mask makes a module's targets cover exactly what is left.
    """
    keys, values, rest_keys, rest_values, bias = [], [], [], [], []
    for layer, (k, v) in enumerate(zip(full.keys, full.values)):
        pick = chosen[layer] if chosen is not None else torch.zeros(k.shape[0], 0, dtype=torch.long, device=k.device)
        index = pick.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        keys.append(torch.cat([k[:, :skip], k.gather(1, index)], 1))
        values.append(torch.cat([v[:, :skip], v.gather(1, index)], 1))
        rest_keys.append(k[:, skip:])
        rest_values.append(v[:, skip:])
        b = torch.zeros(k.shape[0], k.shape[1] - skip, device=k.device)
        bias.append(b.scatter_(1, pick - skip, float("-inf")))
    return ExactContext(keys, values), ExactContext(rest_keys, rest_values, bias if chosen is not None else None)
