"""Which document tokens stay exact in each (layer, KV head): the first few, and those queries depend on most.

A module has to learn the attention over the tokens it stands in for. A few tokens take much of many
heads' attention (the first tokens, and, per head, the handful a head looks things up in); the module
learns the rest far more easily without them, and their exact keys and values cost 2 x head_dim numbers
each. Which tokens is measured on training queries, never on evaluation questions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..measure.metrics import BLOCK_NUMBERS
from ..model.models import has_fast_bf16
from ..providers.attention import ExactContext




@dataclass(frozen=True)
class TokenChoice:
    """How a head ranks the tokens it keeps exact, each training query's attention p to a token raised to
    `power` (1 sums the mass; above 1 favours tokens that some queries attend to sharply, as a quote does):
    by that attention alone (`by="mass"`), or times the distance of the token's value from the query's output
    (`"output"`): to first order, the output error that leaving the token to a module would cause. A token many
    queries read but whose value is what they would read anyway (a sink, a repeated word) costs the module
    little; one whose value stands out is where a smooth module goes wrong."""

    by: str = "mass"
    power: float = 1.0

    @classmethod
    def of(cls, config) -> TokenChoice:
        return cls(config.exact_by, config.exact_power)


@torch.no_grad()
def choose_tokens(queries: Tensor, full: ExactContext, scaling: float, skip: int, count: int | Sequence,
                  choice: TokenChoice = TokenChoice(), chunk: int | None = None) -> list[Tensor]:
    """Per layer, the [kv_heads, count] positions (all >= skip, sorted) of the document tokens that rank
    highest over `queries` ([modeled layers * kv_heads, N, d], layer-major as a capture store, which holds no
    sliding-window layer) as `choice` says. `count` is one number for every layer, or one per layer, each a
    number or one per KV head: a head that keeps fewer tokens than its layer's most has its row padded with
    -1 at the end. A sliding layer keeps none. Queries go `chunk` at a time (default: a BLOCK_NUMBERS block)."""
    kv = full.keys[0].shape[0]
    counts = [count] * len(full.keys) if isinstance(count, int) else list(count)
    chosen, device = [], queries.device
    slots = [layer for layer in range(len(full.keys)) if not full.slides(layer)]  # the store's layer order
    # A ranking needs no fp32 products: bf16 where the hardware runs them natively, the softmax in fp32.
    dtype = torch.bfloat16 if has_fast_bf16(device) else torch.float32
    for layer, (keys, count) in enumerate(zip(full.keys, counts)):
        heads = [count] * kv if isinstance(count, int) else list(count)
        if not max(heads) or full.slides(layer):
            chosen.append(torch.zeros(kv, 0, dtype=torch.long, device=keys.device))
            continue
        slot = slots.index(layer)
        q = queries[slot * kv:(slot + 1) * kv]
        k, v = keys.to(device, dtype), full.values[layer].to(device, dtype)
        score = torch.zeros(k.shape[:2], device=device)
        rows = chunk or max(64, BLOCK_NUMBERS // (kv * k.shape[1]))
        for start in range(0, q.shape[1], rows):
            score += _rank_sums(q[:, start: start + rows].to(dtype), k, v, scaling, choice)
        score[:, :skip] = -1.0
        top = score.topk(max(heads), -1).indices
        keep = torch.arange(top.shape[1], device=top.device) < torch.tensor(heads, device=top.device)[:, None]
        # Sorted positions first, padding (-1) after: sort with the padding pushed past every position.
        picked = torch.where(keep, top, k.shape[1]).sort(-1).values
        chosen.append(torch.where(picked < k.shape[1], picked, -1).to(keys.device))
    return chosen


def _rank_sums(q: Tensor, k: Tensor, v: Tensor, scaling: float, choice: TokenChoice) -> Tensor:
    """[kv_heads, tokens]: what the queries together say of each token under `choice`, summed in fp32."""
    p = torch.softmax((q * scaling) @ k.transpose(1, 2), -1, dtype=torch.float32)
    if choice.power != 1:
        p = p.pow(choice.power)
    if choice.by != "output":
        return p.sum(1)
    p_low = p.to(v.dtype)
    o = p_low @ v  # |v - o|^2 = |v|^2 - 2 o.v + |o|^2, without a [queries, tokens, d] difference
    norms = (o * o).sum(-1, keepdim=True) + (v * v).sum(-1)[:, None]
    distance = torch.baddbmm(norms, o, v.transpose(1, 2), alpha=-2).clamp_min_(0).sqrt_()
    return torch.sum(p_low * distance, 1, dtype=torch.float32)
