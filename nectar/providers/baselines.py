"""What else could stand in for the document's KV cache at the same bytes, each as a context provider.

Every baseline is fixed before any question is seen (query-agnostic), as a compiled document is:
no document at all, StreamingLLM's sinks + recent window, and KV-compression presses run through
NVIDIA's kvpress itself on the document alone. A subset of the document's keys is an `ExactContext`,
so every method is answered by the same split-attention code path as nectar.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention import ExactContext
from ..errors import NectarError
from ..model.models import attention_layers, attn_implementation

# name -> kvpress class; each keeps (1 - compression_ratio) of the document's tokens per layer.
PRESSES = {
    "knorm": "KnormPress",
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
    "kvzip": "KVzipPress",
}


def tokens_for_budget(n: int, budget: float) -> int:
    """Tokens whose exact K/V fit in `budget` x the document's KV bytes."""
    return max(1, int(budget * n))


def streaming_llm(full: ExactContext, budget: float, sinks: int = 4) -> ExactContext:
    """The first `sinks` tokens and the most recent ones (Xiao et al., 2023), in the global layers (a
    sliding layer keeps its window's tail exactly, for every method)."""
    n = max(k.shape[-2] for k in full.keys)
    keep = tokens_for_budget(n, budget)
    index = torch.cat([torch.arange(min(sinks, keep)), torch.arange(n - max(0, keep - sinks), n)]).unique()
    pick = [index[:0] if full.slides(layer) else index for layer in range(len(full.keys))]
    return ExactContext([k[:, i] for k, i in zip(full.keys, pick)], [v[:, i] for v, i in zip(full.values, pick)])


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


def context_tokens(context) -> float:
    """Tokens kept per (layer, head) on average by an exact context (0 for none)."""
    if not isinstance(context, ExactContext):
        return 0.0
    if context.bias is None:
        return sum(k.shape[-2] for k in context.keys) / len(context.keys)
    return sum(torch.isfinite(b).float().mean(0).sum().item() for b in context.bias) / len(context.bias)
