"""How close a stand-in for the document comes to it: one definition of each number, used everywhere.

Per module (a layer's KV head) over captured queries: the relative error of the document output
o_ctx, the absolute error of its log-normalizer lse_ctx, and the relative error of the merged output
(document part blended with the exact local part), which is what the next layer reads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..providers.kernels import blend

ERRORS = ("o_rel", "lse_abs", "merged_rel")
# Numbers in one large fp32 temporary (validation chunks, ranking scores, log-probabilities): 16 MB stays under
# glibc's 32 MB mmap threshold, so each block reuses freed heap memory instead of faulting fresh pages in.
BLOCK_NUMBERS = 4 * 2**20
Predict = Callable[[slice, Tensor], tuple[Tensor, Tensor]]  # (module rows, q [m, N, d]) -> (o, lse)


def relative_error(approx: Tensor, true: Tensor) -> Tensor:
    """|approx - true| / |true| over the last dimension."""
    return (approx - true).norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-6)


def context_share(lse_ctx: Tensor, lse_loc: Tensor) -> Tensor:
    """Weight of the document part in the merged output."""
    return torch.sigmoid(lse_ctx - lse_loc)


@torch.no_grad()
def module_errors(predict: Predict, store, block: int | None = None, chunk: int | None = None,
                  device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Mean errors per module [M] of `predict` on a store captured with the exact document.

    `block` modules are predicted per call (all of them by default); the store stays where it is and each
    chunk of queries visits `device`, where the predictor's weights are (default: BLOCK_NUMBERS a tensor).
    lse_abs is inf for a stand-in that keeps nothing (lse = -inf).
    """
    M, size = store.q.shape[0], store.size
    block = block or M
    chunk = chunk or max(64, BLOCK_NUMBERS // (block * store.q.shape[-1]))
    sums = torch.zeros(len(ERRORS), M)
    for first in range(0, M, block):
        rows = slice(first, min(first + block, M))
        for start in range(0, size, chunk):
            span = slice(start, min(start + chunk, size))
            q = store.q[rows, span]
            o, lse = (t.float() for t in predict(rows, q if device is None else q.to(device)))
            # The errors are computed where the prediction is (the GPU in a GPU fit); only sums come back.
            here = dict(device=o.device)
            o_true, lse_true = store.o_ctx[rows, span].to(**here).float(), store.lse_ctx[rows, span].to(**here)
            o_loc, lse_loc = store.o_loc[rows, span].to(**here).float(), store.lse_loc[rows, span].to(**here)
            merged, approx = blend(o_true, lse_true, o_loc, lse_loc), blend(o, lse, o_loc, lse_loc)
            sums[:, rows] += torch.stack([relative_error(o, o_true).sum(1), (lse - lse_true).abs().sum(1),
                                          relative_error(approx, merged).sum(1)]).cpu()
    return dict(zip(ERRORS, sums / size))


def pooled(parts: list[dict]) -> dict:
    """Token-weighted agreement and KL over several {"agreement", "kl", "tokens"} results, and agreement on
    decided positions where every part has it."""
    tokens = sum(p["tokens"] for p in parts)
    out = {m: sum(p[m] * p["tokens"] for p in parts) / max(tokens, 1) for m in ("agreement", "kl")}
    out["tokens"] = tokens
    if parts and all("decided_tokens" in p for p in parts):
        decided = sum(p["decided_tokens"] for p in parts)
        agree = sum((p["decided_agreement"] or 0.0) * p["decided_tokens"] for p in parts)
        out["decided_agreement"] = agree / decided if decided else None  # none decided: nothing to agree on
        out["decided_tokens"] = decided
    return out


def pooled_kinds(fidelity: dict, kinds, part: str = "answer") -> dict:
    """One method's fidelity on `part` tokens pooled over several prompt kinds present in `fidelity`."""
    return pooled([fidelity[k][part] for k in kinds if k in fidelity])


def bootstrap_interval(values: list[float], level: float = 0.95, draws: int = 4000, seed: int = 0) -> list[float]:
    """Percentile interval of the mean of `values` over resampled items (questions): how far the mean of ~40
    greedy answers, each of which may flip on a near-tie, can move by the luck of which questions were asked.
    Pass paired differences to compare two methods on the same questions."""
    x = torch.tensor(values, dtype=torch.float64)
    if len(x) < 2:
        return [float(x.mean()), float(x.mean())] if len(x) else [float("nan"), float("nan")]
    picks = torch.randint(len(x), (draws, len(x)), generator=torch.Generator().manual_seed(seed))
    tail = (1 - level) / 2
    return torch.quantile(x[picks].mean(1), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()


def bank_errors(bank, store) -> dict[str, Tensor]:
    """Per-module mean errors of a training bank on a capture store (all modules in one call)."""
    return module_errors(lambda rows, q: bank.predict(q, rows), store)
