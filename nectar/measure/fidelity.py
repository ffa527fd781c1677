"""Next-token fidelity against the full document cache, for any set of methods, and per-layer errors.

A method is (context, sinks) providers; all methods and the full-cache reference run through the same
split-attention path, batched identically, so their numbers are comparable.
"""
from __future__ import annotations

import math
from typing import NamedTuple
import sys

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..runtime.binding import bound
from ..providers.attention import ContextProvider, ExactContext, NoContext
from ..providers.kernels import merge
from .metrics import bank_errors, bootstrap_interval, module_errors, pooled_kinds
from ..model.padding import right_pad, right_padded_positions


class Method(NamedTuple):
    """A stand-in for the document as every measurement takes it: the provider of the document part, and the
    exact tokens (sinks, sliding tails) held beside it. Plain (context, sinks) tuples are read the same."""

    context: ContextProvider
    sinks: ExactContext | None = None


QUESTION_KINDS = ("self_study", "generic", "direct")  # answered in the model's words; recall quotes verbatim
LOGIT_NUMBERS = 2**27  # log-probabilities held per forward pass: 512 MB of fp32, whatever the vocabulary
# A position where the full cache's top two tokens lie at least this many logits apart is one it has decided.
# Nearly every flip of nectar's sits below it (2%: 47 of 54 on pydoc, 90 of 97 on MPL; docs/log/), where a
# tenth of a logit turns the greedy answer and costs the KL almost nothing: agreement on decided positions says
# how often nectar errs where the answer was not a coin toss.
DECIDED_LOGITS = 0.5


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
def _logprobs(model, ids: torch.Tensor, n: int, method: Method, scored: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [positions, vocab] at the `scored` positions [b, L] only: the vocabulary-wide work
    (softmax, argmax, KL) is a third of a gap cell, and padding and unscored positions need none of it."""
    ids = ids.to(model.device)
    with bound(model, *method):
        logits = model(input_ids=ids, position_ids=right_padded_positions(n, ids)).logits
    return F.log_softmax(logits[scored.to(logits.device)].float(), dim=-1).cpu()


@torch.no_grad()
def next_token_fidelity(
    model,
    pairs: list[tuple[list[int], list[int]]],
    n: int,
    reference: Method,
    methods: dict[str, Method],
    batch_size: int = 8,
    progress: bool = True,
    models: dict | None = None,
    parts: tuple[str, ...] = ("question", "answer"),
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {part: {"agreement": .., "kl": .., "tokens": .., "decided_agreement": .., "decided_tokens": ..}}}
    for each of `parts` ("question", "answer"), teacher-forced on pairs; decided: where the reference's top two
    lie DECIDED_LOGITS apart (None where none do). `models` names another model (the same weights in another
    dtype) that runs a method instead of `model`."""
    models = models or {}
    # per part: agreeing tokens, KL sum, tokens, agreeing decided tokens, decided tokens
    sums = {name: {part: [0.0, 0.0, 0, 0.0, 0] for part in parts} for name in methods}
    # Batches shrink where the vocabulary is large: 16 rows of 100 tokens over Gemma's 262k ids hold 1.7 GB
    # of log-probabilities per copy, and a comparison holds several.
    longest = max((len(q) + len(a) for q, a in pairs), default=1)
    batch_size = max(1, min(batch_size, LOGIT_NUMBERS // (longest * model.config.vocab_size)))
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluate", disable=not progress, leave=False):
        ids, predicts_q, predicts_a = _batch(pairs[start: start + batch_size])
        masks = {part: mask for part, mask in (("question", predicts_q), ("answer", predicts_a)) if part in parts}
        scored = torch.stack(list(masks.values())).any(0)
        masks = {part: mask[scored] for part, mask in masks.items()}  # over the scored positions, in order
        ref = _logprobs(model, ids, n, reference, scored)
        sure, probs, top = decided(ref), ref.exp(), ref.argmax(-1)  # once a batch, not once a method (a gap cell)
        for name, method in methods.items():
            out = _logprobs(models.get(name, model), ids, n, method, scored)
            agree = top == out.argmax(-1)
            kl = (probs * (ref - out)).sum(-1)
            for part, mask in masks.items():
                acc = sums[name][part]
                acc[0] += agree[mask].float().sum().item()
                acc[1] += kl[mask].sum().item()
                acc[2] += int(mask.sum())
                acc[3] += agree[mask & sure].float().sum().item()
                acc[4] += int((mask & sure).sum())
    return {name: {part: _fidelity(*acc) for part, acc in by_part.items()} for name, by_part in sums.items()}


def decided(logprobs: torch.Tensor, margin: float = DECIDED_LOGITS) -> torch.Tensor:
    """Positions whose top two tokens lie at least `margin` logits apart (log-probs differ as logits do)."""
    top = logprobs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1] >= margin


def _fidelity(agree: float, kl: float, tokens: int, agree_decided: float, decided_tokens: int) -> dict:
    return {"agreement": agree / max(tokens, 1), "kl": kl / max(tokens, 1), "tokens": tokens,
            "decided_agreement": agree_decided / decided_tokens if decided_tokens else None,
            "decided_tokens": decided_tokens}


class Replay:
    """The exact document part, kept per layer for the batch in flight. A cell that swaps layer l (or one head
    of it) sees the reference's hidden states up to l, so there it reads the reference's outputs back instead
    of attending over the whole document again: on a 4k document that attention is about half a forward pass."""

    def __init__(self, full):
        self.full, self.outputs = full, {}

    def __call__(self, layer, q, scaling):
        self.outputs[layer] = self.full(layer, q, scaling)
        return self.outputs[layer]


class OneLayer:
    """A provider that is `provider` at one layer (or one KV head of it) and the exact document elsewhere;
    up to that layer read back from `below` (a `Replay` the reference just ran through) where given."""

    def __init__(self, layer: int, provider, full, head: int | None = None, below: Replay | None = None):
        self.layer, self.provider, self.full, self.head, self.below = layer, provider, full, head, below

    def _exact(self, layer, q, scaling):
        """Up to the cell's own layer the queries are the reference's, and so are the outputs `below` kept."""
        if self.below is not None and layer <= self.layer:
            return self.below.outputs[layer]
        return self.full(layer, q, scaling)

    def __call__(self, layer, q, scaling):
        if layer != self.layer:
            return self._exact(layer, q, scaling)
        if self.head is None:
            return self.provider(layer, q, scaling)
        (o, lse), (mo, mlse) = self._exact(layer, q, scaling), self.provider(layer, q, scaling)
        h = slice(self.head, self.head + 1)
        return torch.cat([o[:, :h.start], mo[:, h], o[:, h.stop:]], 1), torch.cat([lse[:, :h.start], mlse[:, h],
                                                                                     lse[:, h.stop:]], 1)


def layer_gaps(model, pairs, n: int, full, method: Method, layers: list[int], tails=None,
               batch_size: int = 8, heads: list[int | None] | None = None, replay: bool = True) -> list[float]:
    """Answer-token KL when only layer l uses `method` and every other layer the exact document, per layer;
    with `heads`, only that KV head of layer l (one head per entry of `layers`).

    One call with every layer as a method: the full-cache reference runs once per batch, not per layer, and
    (`replay`) its document part serves each cell up to the cell's layer, where the queries are its own.
    """
    provider, reference = document_part(method), Replay(full) if replay else full
    cells = list(zip(layers, heads or [None] * len(layers)))
    below = reference if replay else None
    swapped = {str(i): (OneLayer(layer, provider, full, head, below), tails) for i, (layer, head) in enumerate(cells)}
    # The reference reads sliding layers' tails from `tails`, as the cells do: a Replay holds none itself.
    fid = next_token_fidelity(model, pairs, n, (reference, tails), swapped, batch_size, parts=("answer",))
    return [fid[str(i)]["answer"]["kl"] for i in range(len(cells))]


def document_part(method: Method):
    """The whole stand-in a method keeps for the document (its context merged with any sink tokens)."""
    context, sinks = method
    if sinks is None:
        return context

    def provider(layer: int, q: torch.Tensor, scaling: float):
        return merge(*sinks(layer, q, scaling), *context(layer, q, scaling))

    return provider


def layer_errors(method: Method, store, kv_heads: int, scaling: float, device: torch.device | str = "cpu",
                 layers: list[int] | None = None) -> dict[str, list]:
    """Per-layer mean errors (o_ctx relative, |lse_ctx| absolute, merged output relative) of a method against
    a store captured with the whole document as context. |lse| is None where a method keeps nothing.
    `layers`: the model layer of each of the store's (the global ones, when some slide)."""
    provider = document_part(method)

    def predict(rows: slice, q: torch.Tensor):
        index = rows.start // kv_heads
        o, lse = provider(index if layers is None else layers[index], q.float().unsqueeze(0), scaling)
        return o[0], lse[0]

    errors = module_errors(predict, store, block=kv_heads, chunk=4096, device=device)
    out = {name: e.view(-1, kv_heads).mean(1).tolist() for name, e in errors.items()}
    out["lse_abs"] = [v if math.isfinite(v) else None for v in out["lse_abs"]]
    return out


def generation_match(answers: list[str], references: list[str]) -> dict:
    """Exact-match rate and MiniLM cosine of greedy answers against the full-cache answers: the mean, each
    question's (`cosines`) and a 95% bootstrap interval of the mean over questions (`cosine_interval`)."""
    from .semantic import cosine

    exact = [a.strip() == r.strip() for a, r in zip(answers, references)]
    cosines = [cosine(a, r) for a, r in zip(answers, references)]
    return {"exact_match": sum(exact) / max(1, len(exact)), "cosine": sum(cosines) / max(1, len(cosines)),
            "cosines": cosines, "cosine_interval": bootstrap_interval(cosines)}


def validation_metrics(model, bank, sinks: ExactContext, full: ExactContext, n: int, val_prompts: list,
                       val_store, batch_size: int) -> dict:
    """A compile's report card on its held-out prompts: per-layer module errors, and next-token fidelity
    per prompt kind beside no document at all."""
    kv = model.config.num_key_value_heads
    per_layer = {k: v.view(-1, kv).mean(1).tolist() for k, v in bank_errors(bank, val_store).items()}
    methods = {"nectar": (bank, sinks), "no_document": (NoContext(), None)}
    fidelity = {}
    for kind in sorted({p.kind for p in val_prompts}):
        pairs = [(p.question_ids, p.answer_ids) for p in val_prompts if p.kind == kind]
        fidelity[kind] = next_token_fidelity(model, pairs, n, (full, None), methods, batch_size)
    questions = {m: pooled_kinds({k: f[m] for k, f in fidelity.items()}, QUESTION_KINDS) for m in methods}
    return {"validation": {k: sum(v) / len(v) for k, v in per_layer.items()}, "per_layer": per_layer,
            "fidelity": fidelity, "questions": questions, "val_prompts": len(val_prompts)}


def warn_if_useless(questions: dict) -> None:
    """A compile that does worse than no document at all is worth nothing: say so where the user looks."""
    from ..manifest import useless_warning

    warning = useless_warning({"metrics": {"questions": questions}})
    if warning:
        print(warning, file=sys.stderr)
