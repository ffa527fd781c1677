"""Next-token fidelity against the full document cache (DESIGN section 6), for any set of methods.

A method is (context, kept) providers; all methods and the full-cache reference run through the same
split-attention path, batched identically, so their numbers are comparable.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .attach import bound
from .attention import ContextProvider, ExactContext, merge
from .fit import relative_error
from .generate import right_pad

Method = tuple[ContextProvider, "ExactContext | None"]


def _batch(pairs: list[tuple[list[int], list[int]]]):
    """Right-padded ids plus masks of the positions that predict question / answer tokens."""
    ids, _ = right_pad([q + a for q, a in pairs])
    predicts_q = torch.zeros(ids.shape, dtype=torch.bool)
    predicts_a = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (q, a) in enumerate(pairs):
        predicts_q[row, : len(q) - 1] = True  # position t predicts token t + 1
        predicts_a[row, len(q) - 1: len(q) + len(a) - 1] = True
    return ids, predicts_q, predicts_a


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, n: int, method: Method) -> torch.Tensor:
    with bound(model, *method):
        positions = (n + torch.arange(ids.shape[1])).expand(ids.shape[0], -1)
        logits = model(input_ids=ids.to(model.device), position_ids=positions.to(model.device)).logits
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def next_token_fidelity(
    model,
    pairs: list[tuple[list[int], list[int]]],
    n: int,
    reference: Method,
    methods: dict[str, Method],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {"answer"|"question": {"agreement": .., "kl": .., "tokens": ..}}}, teacher-forced on pairs."""
    sums = {name: {part: [0.0, 0.0, 0] for part in ("question", "answer")} for name in methods}
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluate", disable=not progress, leave=False):
        ids, predicts_q, predicts_a = _batch(pairs[start: start + batch_size])
        ref = _logprobs(model, ids, n, reference)
        for name, method in methods.items():
            out = _logprobs(model, ids, n, method)
            agree = ref.argmax(-1) == out.argmax(-1)
            kl = (ref.exp() * (ref - out)).sum(-1)
            for part, mask in (("question", predicts_q), ("answer", predicts_a)):
                acc = sums[name][part]
                acc[0] += agree[mask].float().sum().item()
                acc[1] += kl[mask].sum().item()
                acc[2] += int(mask.sum())
    return {
        name: {part: {"agreement": a / max(t, 1), "kl": k / max(t, 1), "tokens": t} for part, (a, k, t) in parts.items()}
        for name, parts in sums.items()
    }


def pool(parts: list[dict]) -> dict:
    """Token-weighted agreement and KL over several {"agreement", "kl", "tokens"} results."""
    tokens = sum(p["tokens"] for p in parts)
    out = {m: sum(p[m] * p["tokens"] for p in parts) / max(tokens, 1) for m in ("agreement", "kl")}
    out["tokens"] = tokens
    return out


def document_part(method: Method):
    """The whole stand-in a method keeps for the document (its context merged with any exact-kept tokens)."""
    context, kept = method
    if kept is None:
        return context

    def provider(layer: int, q: torch.Tensor, scaling: float):
        return merge(*kept(layer, q, scaling), *context(layer, q, scaling))

    return provider


@torch.no_grad()
def layer_errors(method: Method, store, kv_heads: int, scaling: float, chunk: int = 4096,
                 device: torch.device | str = "cpu") -> dict[str, list]:
    """Per-layer errors (DESIGN section 6) against a store captured with the full document as context:
    o_ctx relative, |lse_ctx| absolute (None where a method keeps nothing) and merged output relative.
    The store stays on the CPU; each chunk of queries visits `device`, where the method's tensors are."""
    provider = document_part(method)
    layers = store.q.shape[0] // kv_heads
    out: dict[str, list] = {"o_rel": [], "lse_abs": [], "merged_rel": []}
    for layer in range(layers):
        rows = slice(layer * kv_heads, (layer + 1) * kv_heads)
        sums = torch.zeros(3)
        for start in range(0, store.size, chunk):
            span = slice(start, start + chunk)
            q = store.q[rows, span].float().unsqueeze(0).to(device)
            o, lse = (t[0].cpu() for t in provider(layer, q, scaling))
            o_true, lse_true = store.o_ctx[rows, span].float(), store.lse_ctx[rows, span]
            o_loc, lse_loc = store.o_loc[rows, span].float(), store.lse_loc[rows, span]
            merged, _ = merge(o_true, lse_true, o_loc, lse_loc)
            approx, _ = merge(o.float(), lse.float(), o_loc, lse_loc)
            sums += torch.stack([relative_error(o, o_true).sum(), (lse - lse_true).abs().sum(),
                                 relative_error(approx, merged).sum()])
        mean = (sums / (kv_heads * store.size)).tolist()
        out["o_rel"].append(mean[0])
        out["lse_abs"].append(mean[1] if math.isfinite(mean[1]) else None)
        out["merged_rel"].append(mean[2])
    return out


def generation_match(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact-match rate and mean MiniLM cosine of greedy answers against the full-cache answers."""
    from .semantic import cosine

    exact = [a.strip() == r.strip() for a, r in zip(answers, references)]
    return {"exact_match": sum(exact) / max(1, len(exact)),
            "cosine": sum(cosine(a, r) for a, r in zip(answers, references)) / max(1, len(answers))}
