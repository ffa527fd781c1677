"""Attention Matching (Zweiger et al., 2026): the most attended keys, NNLS biases and ridge-fitted values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import ExactContext
from .base import Inputs, context_tokens


@dataclass(frozen=True)
class AttentionMatching:
    name: str = "attention_matching"

    def build(self, inputs: Inputs, budget: float) -> tuple[ExactContext, float]:
        """(the context fitted on the queries nectar trains on, so that both see the same data; its bytes / the
        global layers' KV bytes, a bias per kept token included)."""
        context = attention_matching(inputs.full, inputs.queries(), budget, inputs.scaling)
        return context, matched_bytes(context, inputs.n)


@torch.no_grad()
def attention_matching(full: ExactContext, queries: torch.Tensor, budget: float, scaling: float,
                       max_queries: int = 4096, ridge: float = 1e-3) -> ExactContext:
    """Attention Matching (Zweiger et al., 2026): per (layer, KV head), the document tokens with the most
    attention mass over `queries` ([layers * kv_heads, N, d], as a capture store holds them), a log-mass
    bias per token fitted by non-negative least squares so that they reproduce the full partition
    function, and values refitted by ridge regression so that they reproduce the full output.

    Closed form: no gradient steps. Each kept token costs its key, its value and its bias.
    """
    kv, d = full.keys[0].shape[0], full.keys[0].shape[-1]
    n = max(k.shape[-2] for k in full.keys)
    count = max(1, int(budget * n * 2 * d / (2 * d + 1)))
    step = max(1, queries.shape[1] // max_queries)
    keys, values, biases = [], [], []
    slot = -1  # the queries hold the global layers only: a sliding layer keeps nothing here
    for layer, (k_all, v_all) in enumerate(zip(full.keys, full.values)):
        if full.slides(layer):
            keys.append(k_all[:, :0])
            values.append(v_all[:, :0])
            biases.append(torch.zeros(kv, 0))
            continue
        slot += 1
        layer_keys, layer_values, layer_bias = [], [], []
        for head in range(kv):
            q = queries[slot * kv + head, ::step].float().cpu()
            k, v = k_all[head].float().cpu(), v_all[head].float().cpu()
            probs = torch.softmax(scaling * q @ k.T, -1)  # [N, n], rows sum to 1
            pick, bias = _matched_mass(probs, min(count, n))
            weights = torch.softmax(scaling * q @ k[pick].T + bias, -1).nan_to_num(0.0)
            gram = weights.T @ weights + ridge * torch.eye(len(pick))
            fitted = torch.linalg.solve(gram, weights.T @ (probs @ v) + ridge * v[pick])
            layer_keys.append(k[pick])
            layer_values.append(fitted)
            layer_bias.append(bias)
        like = dict(dtype=k_all.dtype, device=k_all.device)
        keys.append(torch.stack(layer_keys).to(**like))
        values.append(torch.stack(layer_values).to(**like))
        biases.append(torch.stack(layer_bias).to(k_all.device))
    return ExactContext(keys, values, biases)


# Above this many candidates an exact active-set NNLS takes minutes per head: its cost grows about with the
# cube of the candidates (a 10% budget of MPL's 3.7k tokens, 744 of them, took 8 min over 90 heads; a 25% one
# was stopped after 16), so the screening round that only ranks them runs projected gradient instead; the
# final fit stays exact.
EXACT_SCREEN = 1024


def _matched_mass(probs: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`count` token positions, their log-mass biases): exp(bias) >= 0 fitted by NNLS so that the kept tokens'
    reweighted probability sums to 1 for every query. Candidates are twice as many of the most attended
    tokens; those NNLS zeroes out give way to the next, so no byte of the budget is left unused."""
    from scipy.optimize import nnls

    ones = torch.ones(probs.shape[0], dtype=torch.float64).numpy()
    candidates = probs.sum(0).topk(min(2 * count, probs.shape[1])).indices
    if len(candidates) <= EXACT_SCREEN:
        mass = torch.from_numpy(nnls(probs[:, candidates].double().numpy(), ones)[0])
    else:
        mass = _projected_nnls(probs[:, candidates].double())
    order = mass.argsort(descending=True)[:count]
    pick = candidates[order].sort().values
    mass, _ = nnls(probs[:, pick].double().numpy(), ones)
    return pick, torch.from_numpy(mass).float().log()


def _projected_nnls(a: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """argmin ||a x - 1|| over x >= 0, approximately: accelerated projected gradient on the Gram matrix."""
    gram, target = a.T @ a, a.T @ torch.ones(a.shape[0], dtype=a.dtype)
    step = 1.0 / torch.linalg.eigvalsh(gram)[-1]
    x = y = torch.zeros_like(target)
    for t in range(steps):
        x_next = (y - step * (gram @ y - target)).clamp_min(0)
        y, x = x_next + t / (t + 3) * (x_next - x), x_next
    return x


def matched_bytes(context: ExactContext, n: int) -> float:
    """Bytes of an attention-matching context (keys, values and a bias per kept token) / the full KV's."""
    d = context.keys[0].shape[-1]
    return context_tokens(context) * (2 * d + 1) / (2 * d * n)
