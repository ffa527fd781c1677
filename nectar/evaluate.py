"""Next-token fidelity against the full document cache (DESIGN section 6), for any set of methods.

A method is (context, kept) providers; all methods and the full-cache reference run through the same
split-attention path, batched identically, so their numbers are comparable.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .attach import bound
from .attention import ContextProvider
from .generate import right_pad

Method = tuple[ContextProvider, "ContextProvider | None"]


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
