"""Which document tokens stay exact in each (layer, KV head): the first few, and those queries attend to most.

A module has to learn the attention over the tokens it stands in for. A few tokens take much of many
heads' attention (the first tokens, and, per head, the handful a head looks things up in); the module
learns the rest far more easily without them, and their exact keys and values cost 2 x head_dim numbers
each. Which tokens is measured on training queries, never on evaluation questions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import ExactContext


@torch.no_grad()
def most_attended(queries: Tensor, full: ExactContext, scaling: float, skip: int, count: int | Sequence,
                  power: float = 1.0, chunk: int = 2048) -> list[Tensor]:
    """Per layer, the [kv_heads, count] positions (all >= skip, sorted) of the document tokens with the
    largest attention summed over `queries` ([layers * kv_heads, N, d], layer-major as a capture store),
    each query's attention raised to `power`: 1 sums the mass; above 1 favours tokens that some queries
    attend to sharply, which a module smooths over, above tokens that many attend to a little.
    `count` is one number for every layer, or one per layer, each a number or one per KV head: a head that
    keeps fewer tokens than its layer's most has its row padded with -1 at the end."""
    kv = full.keys[0].shape[0]
    counts = [count] * len(full.keys) if isinstance(count, int) else list(count)
    chosen = []
    for layer, (keys, count) in enumerate(zip(full.keys, counts)):
        heads = [count] * kv if isinstance(count, int) else list(count)
        if not max(heads):
            chosen.append(torch.zeros(kv, 0, dtype=torch.long, device=keys.device))
            continue
        q, k = queries[layer * kv:(layer + 1) * kv], keys.float().to(queries.device)
        mass = torch.zeros(k.shape[:2], device=k.device)
        for start in range(0, q.shape[1], chunk):
            mass += torch.softmax(scaling * q[:, start: start + chunk].float() @ k.transpose(1, 2), -1).pow(power).sum(1)
        mass[:, :skip] = -1.0
        top = mass.topk(max(heads), -1).indices
        keep = torch.arange(top.shape[1], device=top.device) < torch.tensor(heads, device=top.device)[:, None]
        # Sorted positions first, padding (-1) after: sort with the padding pushed past every position.
        picked = torch.where(keep, top, k.shape[1]).sort(-1).values
        chosen.append(torch.where(picked < k.shape[1], picked, -1).to(keys.device))
    return chosen
