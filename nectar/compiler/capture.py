"""Record, per (layer, KV head), every post-document query with the exact attention it should produce.

Sequences run teacher-forced after the document, right-padded in batches, through the same split
attention used at inference with the exact document as context. A recorder copies the valid rows into
preallocated fp16 tensors, so memory is known up front: ~30k tokens of the default model take ~3 GB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runtime.binding import bound
from ..providers.attention import ContextProvider, ExactContext
from ..model.models import head_dim, modeled_layers
from ..model.padding import right_pad, right_padded_positions


@dataclass
class Store:
    """Captured targets, modules stacked layer-major: index layer * kv_heads + head. N rows each."""

    q: Tensor  # [M, N, d] fp16
    o_ctx: Tensor  # [M, N, d] fp16
    lse_ctx: Tensor  # [M, N] fp32
    o_loc: Tensor | None  # [M, N, d] fp16 (None in training batches)
    lse_loc: Tensor  # [M, N] fp32

    @property
    def size(self) -> int:
        return self.q.shape[1]

    def rows(self, index: Tensor) -> "Store":
        return Store(*(None if t is None else t[:, index]
                       for t in (self.q, self.o_ctx, self.lse_ctx, self.o_loc, self.lse_loc)))

    def to(self, device) -> "Store":
        return Store(*(None if t is None else t.to(device) for t in (self.q, self.o_ctx, self.lse_ctx, self.o_loc,
                                                                        self.lse_loc)))


class _Recorder:
    """Copies each layer's (q, o_ctx, lse_ctx, o_loc, lse_loc) of the batch's real tokens into the store."""

    def __init__(self, store: Store):
        self.store = store
        self.valid: Tensor | None = None  # [b, L] for the batch in flight
        self.offset = 0

    def __call__(self, layer, q, o_ctx, lse_ctx, o_loc, lse_loc):
        b, h, _, _ = q.shape
        length = self.valid.shape[1]
        keep = self.valid.view(b, 1, length).expand(b, q.shape[2] // length, length).reshape(b, -1)
        rows = slice(layer * h, (layer + 1) * h)
        span = slice(self.offset, self.offset + int(keep.sum()))
        for target, source in ((self.store.q, q), (self.store.o_ctx, o_ctx), (self.store.lse_ctx, lse_ctx),
                               (self.store.o_loc, o_loc), (self.store.lse_loc, lse_loc)):
            # [b, h, m, ...] -> [h, rows of valid (b, m)]
            target[rows, span] = source.transpose(0, 1)[:, keep].to(target.dtype)


@torch.no_grad()
def capture(
    model,
    sequences: list[list[int]],
    n: int,
    context: ContextProvider,
    sinks: ExactContext | None = None,
    batch_size: int = 16,
    desc: str | None = "capture",
    drive: ContextProvider | None = None,
    on_logits: Callable[[list[int], Tensor], None] | None = None,
) -> Store:
    """Every post-document query of `sequences`, teacher-forced, with exact targets from `context` (+ `sinks`).

    With `drive` (a fitted bank), the model runs on it instead: each layer's queries are those the modules
    below it actually produce at inference, while the targets stay those of `context`. `on_logits` receives
    each batch's (sequence indices, next-token logits at every position).
    """
    cfg = model.config
    layers, kv_heads = len(modeled_layers(cfg)), cfg.num_key_value_heads
    d = head_dim(cfg)
    groups = cfg.num_attention_heads // kv_heads
    rows = groups * sum(len(s) for s in sequences)
    M = layers * kv_heads
    half = dict(dtype=torch.float16)
    store = Store(torch.empty(M, rows, d, **half), torch.empty(M, rows, d, **half),
                  torch.empty(M, rows), torch.empty(M, rows, d, **half), torch.empty(M, rows))
    recorder = _Recorder(store)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
    driver = context if drive is None else drive
    with bound(model, driver, sinks, recorder, reference=None if drive is None else context):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            index = order[start: start + batch_size]
            ids, valid = right_pad([sequences[i] for i in index])
            ids = ids.to(model.device)
            recorder.valid = valid
            out = model(input_ids=ids, position_ids=right_padded_positions(n, ids),
                        logits_to_keep=0 if on_logits else 1)
            if on_logits:
                on_logits(index, out.logits)
            recorder.offset += groups * int(valid.sum())
    return store
