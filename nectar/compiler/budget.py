"""How a budget of bytes is split: numbers per module, per layer, and tokens kept exact.

A budget is module numbers + exact keys and values per (layer, KV head) against the document's KV cache
at the same dtype. Splits move capacity between layers but never exceed the uniform total, so that
every allocation compares with the uniform one at the same bytes.
"""
from __future__ import annotations

import torch

from ..config import CompileConfig
from ..errors import NectarError
from ..model.models import head_dim
from ..providers.quant import token_numbers


def params_per_module(cfg, n: int, config: CompileConfig, exact: int = 0) -> int:
    """Numbers per (layer, KV head) module, on a model of config `cfg`, so that modules + exact K/V = budget x
    the document's KV."""
    d = head_dim(cfg)
    per_module = config.budget * 2 * n * d - config.sink_tokens * 2 * d - exact_numbers(exact, d, config)
    if per_module < 4 * d:
        raise NectarError(f"budget {config.budget} leaves no room for modules beside {config.sink_tokens + exact} "
                          "exact tokens per head: raise --budget, or lower exact_share or sink_tokens")
    return int(per_module)


def exact_numbers(tokens: int, d: int, config: CompileConfig) -> float:
    """16-bit numbers that `tokens` exact keys and values of one (layer, KV head) take, their scales included."""
    if not tokens:
        return 0.0
    return token_numbers(tokens, d, config.exact_bits) + token_numbers(tokens, d, config.value_bits, values=True)


def uniform_exact(n: int, config: CompileConfig, d: int) -> int:
    """Tokens kept exact per (layer, head) beyond the sinks when spread evenly: `exact_share` of the budget's
    bytes at their storage's bits (8-bit keys pay one token's worth of 16-bit numbers in scales)."""
    numbers = config.exact_share * config.budget * n * 2 * d
    per_token = exact_numbers(2, d, config) - exact_numbers(1, d, config)
    fixed = exact_numbers(1, d, config) - per_token  # per-channel scales, paid once
    return max(0, int((numbers - fixed) / per_token + 1e-9))


def allocate(difficulty: list[float], per_module: int, low: float = 0.25, high: float = 3.0) -> list[int]:
    """Split a uniform budget across layers in proportion to difficulty, each within [low, high] x uniform.

    The total never exceeds the uniform one, so both allocations compare at the same bytes.
    """
    share = torch.tensor(difficulty, dtype=torch.float64).clamp_min(1e-9)
    share = share / share.mean()
    for _ in range(50):  # clamping moves mass: rescale the unclamped layers until the mean is 1 again
        share = share.clamp(low, high)
        free = (share > low) & (share < high)
        excess = share.sum() - len(share)
        if abs(excess) < 1e-6 or not free.any():
            break
        share = torch.where(free, share - excess * share / share[free].sum(), share)
    share = share.clamp(low, high)
    share = share / max(1.0, share.mean().item())
    return [int(per_module * s) for s in share.tolist()]


def head_gaps(layer_gaps: list[float], measured: dict[int, list[float]], kv_heads: int) -> list[float]:
    """Per (layer, KV head), layer-major, its share of its layer's KL: in proportion to the KL each head
    causes alone where that was measured (`measured[layer]`), else an equal one. A layer's heads differ
    by orders of magnitude: on MPL one head of layer 18 carried half the answer KL, its two others none."""
    out = []
    for layer, gap in enumerate(layer_gaps):
        heads = torch.tensor(measured.get(layer, [1.0] * kv_heads), dtype=torch.float64).clamp_min(0)
        share = heads / heads.sum() if heads.sum() > 0 else torch.full((kv_heads,), 1 / kv_heads)
        out += (gap * share).tolist()
    return out
